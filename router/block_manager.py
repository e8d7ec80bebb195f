"""KV block accounting with prefix caching.

The router owns the block ids; every stage allocates the same number of blocks and uses the
router's ids, so one block table per sequence serves all stages.

Prefix caching shares FULL blocks whose KV has been computed. A block is identified by a
chained hash: the digest of (parent block's digest, the block's token ids). Chaining makes a
block's identity depend on everything before it, which attention requires: the same 16
tokens after a different prefix have different KV.

Free blocks sit in one LRU queue. A freed block keeps its hash (and its KV on the stages),
so it can be hit again until it is taken for new content. Blocks that hold nothing reusable
go to the front of the queue so that they are taken before any cached block.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import OrderedDict
from collections.abc import Iterable

from router.sequence import Sequence


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        shuffle_seed: int | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        order = list(range(num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        # Front = taken next. An OrderedDict gives O(1) removal from the middle, which a
        # prefix hit on a free cached block needs.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(order)
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ----------------------------------------------------------------- queries

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self._num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    @property
    def prefix_cache_hit_rate(self) -> float:
        if self.num_queried_tokens == 0:
            return 0.0
        return self.num_hit_tokens / self.num_queried_tokens

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq: Sequence, total_tokens: int) -> int:
        """Blocks to add to `seq`'s table so it covers `total_tokens` tokens."""
        return max(0, self.num_blocks_for(total_tokens) - len(seq.block_ids))

    def can_append(self, seq: Sequence, total_tokens: int) -> bool:
        return self.num_blocks_needed(seq, total_tokens) <= len(self._free)

    # ------------------------------------------------------------- allocation

    def allocate_prompt(self, seq: Sequence) -> bool:
        """Gives a sequence being admitted blocks for all of its current tokens.

        Reuses the longest run of cached blocks matching the sequence's tokens (prompt and
        output: a preempted sequence comes back with its outputs). Returns False, changing
        nothing, when the pool is too short.
        """
        assert not seq.block_ids, f"sequence {seq.seq_id} already holds blocks"
        num_tokens = seq.num_tokens
        hits: list[int] = []
        if self.enable_prefix_caching:
            # At least one token must be computed to produce logits, so the hit stops short of
            # the last token; this also means a shared block is never written.
            max_hit_blocks = (num_tokens - 1) // self.block_size
            self._extend_hashes(seq, max_hit_blocks)
            for block_hash in seq.block_hashes[:max_hit_blocks]:
                block_id = self._hash_to_block.get(block_hash)
                if block_id is None:
                    break
                hits.append(block_id)
        num_fresh = self.num_blocks_for(num_tokens) - len(hits)
        # A hit on a free cached block takes it out of the free queue as well.
        num_free_hits = sum(1 for b in hits if self._ref_counts[b] == 0)
        if num_fresh + num_free_hits > len(self._free):
            return False

        # Hits first: taking fresh blocks may evict, and must not evict a block just matched.
        for block_id in hits:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
        table = hits + [self._take_free_block() for _ in range(num_fresh)]
        seq.block_ids = table
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_prompt_tokens = seq.num_computed_tokens
        # Hit blocks are registered already; the rest are registered once computed.
        seq.num_registered_blocks = len(hits)
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += seq.num_computed_tokens
        return True

    def append_slots(self, seq: Sequence, total_tokens: int) -> list[int]:
        """Grows `seq`'s table to cover `total_tokens` tokens; returns the added block ids."""
        needed = self.num_blocks_needed(seq, total_tokens)
        if needed > len(self._free):
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {needed} more blocks but only "
                f"{len(self._free)} are free; check can_append first"
            )
        new_blocks = [self._take_free_block() for _ in range(needed)]
        seq.block_ids.extend(new_blocks)
        return new_blocks

    def mark_computed(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Offers the blocks that are now full and computed to the prefix cache.

        Call only once a step's result has arrived: before that the stages may not have
        written the KV, and a hit would read garbage.
        """
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        assert num_full <= len(seq.block_ids), (
            f"sequence {seq.seq_id}: {num_computed_tokens} computed tokens exceed its "
            f"{len(seq.block_ids)} blocks"
        )
        if num_full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block_id = seq.block_ids[i]
            block_hash = seq.block_hashes[i]
            # When another sequence computed the same content first, its block stays the
            # cached one and this block simply remains unshared.
            if self._block_hash[block_id] is None and block_hash not in self._hash_to_block:
                self._block_hash[block_id] = block_hash
                self._hash_to_block[block_hash] = block_id
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drops `seq`'s references; unreferenced blocks return to the free queue."""
        # Reversed so that, among cached blocks, a chain's tail is evicted before its head:
        # the head is what more prompts share, and without it the tail cannot be hit anyway.
        for block_id in reversed(seq.block_ids):
            self._ref_counts[block_id] -= 1
            assert self._ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._block_hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block (say after the stages lost their KV)."""
        for block_hash, block_id in self._hash_to_block.items():
            self._block_hash[block_id] = None
        self._hash_to_block.clear()

    # ---------------------------------------------------------------- internal

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        old_hash = self._block_hash[block_id]
        if old_hash is not None:
            # Evicted: its content is about to be overwritten.
            assert self._hash_to_block[old_hash] == block_id
            del self._hash_to_block[old_hash]
            self._block_hash[block_id] = None
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        """Makes seq.block_hashes cover its first `num_blocks` full blocks."""
        start = len(seq.block_hashes)
        if start >= num_blocks:
            return
        bs = self.block_size
        tokens = seq.token_ids_slice(start * bs, num_blocks * bs)
        parent = seq.block_hashes[-1] if seq.block_hashes else b""
        for i in range(num_blocks - start):
            # int64 covers any vocabulary; a fixed width keeps the byte encoding unambiguous.
            content = array("q", tokens[i * bs : (i + 1) * bs]).tobytes()
            parent = hashlib.sha256(parent + content).digest()
            seq.block_hashes.append(parent)

    def check_invariants(self, seqs: Iterable[Sequence] | None = None) -> None:
        """For tests: raises AssertionError if the pool's bookkeeping is inconsistent.

        With `seqs` (every sequence holding blocks), also checks each block's reference count
        against the tables that name it.
        """
        assert len(self._free) == len(set(self._free)), "a block is twice in the free queue"
        for block_id in range(self._num_blocks):
            ref = self._ref_counts[block_id]
            in_free = block_id in self._free
            assert ref >= 0, f"block {block_id} has ref count {ref}"
            assert (ref == 0) == in_free, (
                f"block {block_id}: ref count {ref} but {'in' if in_free else 'not in'} free queue"
            )
            block_hash = self._block_hash[block_id]
            if block_hash is not None:
                assert self._hash_to_block.get(block_hash) == block_id, (
                    f"block {block_id} carries a hash the cache maps elsewhere"
                )
        for block_hash, block_id in self._hash_to_block.items():
            assert self._block_hash[block_id] == block_hash, (
                f"hash map names block {block_id} which carries another hash"
            )
        if seqs is not None:
            counts = [0] * self._num_blocks
            for seq in seqs:
                assert len(set(seq.block_ids)) == len(seq.block_ids), (
                    f"sequence {seq.seq_id} names a block twice"
                )
                for block_id in seq.block_ids:
                    counts[block_id] += 1
            assert counts == self._ref_counts, "ref counts differ from the block tables"
