"""Block manager: allocation, prefix caching by chained hash, LRU eviction, no leaks."""

from __future__ import annotations

import random

import pytest

from router.block_manager import BlockManager
from router.sequence import Sequence

_next_id = iter(range(10**9))


def make_seq(tokens: list[int], max_new_tokens: int = 8) -> Sequence:
    seq_id = next(_next_id)
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        prompt_token_ids=list(tokens),
        max_new_tokens=max_new_tokens,
    )


def computed(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence admitted and fully prefilled (its full blocks are in the cache)."""
    seq = make_seq(tokens)
    assert bm.allocate_prompt(seq)
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq, seq.num_tokens)
    return seq


def test_allocation_covers_tokens_and_free_returns_all() -> None:
    bm = BlockManager(num_blocks=10, block_size=16)
    seq = make_seq(list(range(35)))
    assert bm.allocate_prompt(seq)
    assert len(seq.block_ids) == 3  # ceil(35 / 16)
    assert len(set(seq.block_ids)) == 3
    assert seq.num_computed_tokens == 0 and seq.num_cached_prompt_tokens == 0
    assert bm.num_free_blocks == 7
    assert bm.usage == pytest.approx(0.3)
    bm.check_invariants([seq])

    assert bm.num_blocks_needed(seq, 48) == 0
    assert bm.num_blocks_needed(seq, 49) == 1
    new = bm.append_slots(seq, 49)
    assert len(new) == 1 and seq.block_ids[-1] == new[0] and new[0] not in seq.block_ids[:-1]
    assert bm.append_slots(seq, 49) == []
    bm.check_invariants([seq])

    bm.free(seq)
    assert seq.block_ids == []
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    bm.check_invariants([seq])


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    holder = computed(bm, list(range(8)))  # 2 blocks, both cached
    big = make_seq(list(range(8)) + [100] * 9)  # 17 tokens: 5 blocks > 4
    assert not bm.allocate_prompt(big)
    assert big.block_ids == [] and big.num_computed_tokens == 0
    assert bm.num_free_blocks == 2
    assert bm.num_queried_tokens == 8  # the failed attempt is not counted
    bm.check_invariants([holder, big])
    assert not bm.can_append(holder, 8 + 9)
    with pytest.raises(RuntimeError, match="can_append"):
        bm.append_slots(holder, 8 + 9)


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed(bm, list(range(10)))  # blocks [0..3], [4..7] cached, [8, 9] partial
    b = make_seq(list(range(8)) + [50, 51, 52])
    assert bm.allocate_prompt(b)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert b.num_computed_tokens == 8 and b.num_cached_prompt_tokens == 8
    bm.check_invariants([a, b])  # shared blocks have ref count 2

    free_before = bm.num_free_blocks
    bm.free(a)
    # Only a's unshared partial block comes back; the two shared ones are still b's.
    assert bm.num_free_blocks == free_before + 1
    bm.check_invariants([b])
    bm.free(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants([])
    assert bm.num_hit_tokens == 8 and bm.num_queried_tokens == 21
    assert bm.prefix_cache_hit_rate == pytest.approx(8 / 21)


def test_freed_blocks_can_be_hit_again() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, list(range(9)))
    cached = a.block_ids[:2]
    bm.free(a)
    again = make_seq(list(range(9)))
    assert bm.allocate_prompt(again)
    assert again.block_ids[:2] == cached and again.num_computed_tokens == 8
    bm.check_invariants([again])


def test_chained_hash_same_block_after_other_prefix_does_not_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    x, y, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    a = computed(bm, x + y + [0])  # caches x, then y-after-x
    c = computed(bm, w + [0])  # caches w
    b = make_seq(w + y + [0])
    assert bm.allocate_prompt(b)
    # Block 0 (w) hits c; block 1 holds y like a's block 1 but after w, so it must miss.
    assert b.block_ids[0] == c.block_ids[0]
    assert b.block_ids[1] != a.block_ids[1]
    assert b.num_computed_tokens == 4
    bm.check_invariants([a, b, c])


def test_hit_leaves_at_least_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, list(range(8)))  # two full cached blocks
    same = make_seq(list(range(8)))
    assert bm.allocate_prompt(same)
    # (8 - 1) // 4 = 1 block may hit: the last block is recomputed in a fresh, unshared block.
    assert same.num_computed_tokens == 4
    assert same.block_ids[0] == a.block_ids[0]
    assert same.block_ids[1] != a.block_ids[1]
    bm.check_invariants([a, same])
    # One token longer: both full blocks hit.
    longer = make_seq(list(range(9)))
    assert bm.allocate_prompt(longer)
    assert longer.num_computed_tokens == 8 and longer.block_ids[:2] == a.block_ids
    bm.check_invariants([a, same, longer])


def test_preempted_sequence_hits_its_own_outputs() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq([1, 2, 3])
    assert bm.allocate_prompt(seq)
    seq.output_token_ids += [4, 5, 6]  # 6 tokens, 5 computed (the last sampled is not yet)
    bm.append_slots(seq, 6)
    bm.mark_computed(seq, 5)
    first_block = seq.block_ids[0]
    bm.free(seq)
    assert bm.allocate_prompt(seq)
    assert seq.block_ids[0] == first_block and seq.num_computed_tokens == 4
    bm.check_invariants([seq])


def test_eviction_is_lru_and_chain_tail_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a_tokens, b_tokens = list(range(9)), list(range(100, 109))
    a = computed(bm, a_tokens)  # 3 blocks: 2 cached + 1 partial
    b = computed(bm, b_tokens)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    # Needs 3 fresh blocks: the two partial (uncached) blocks go first, then the least
    # recently freed cached block, which is the tail of a's chain.
    c = make_seq(list(range(200, 209)))
    assert bm.allocate_prompt(c) and c.num_computed_tokens == 0
    assert bm.num_cached_blocks == 3
    bm.check_invariants([c])
    bm.free(c)  # uncached: taken before the cached blocks below
    a2, b2 = make_seq(a_tokens), make_seq(b_tokens)
    assert bm.allocate_prompt(b2)
    assert b2.num_computed_tokens == 8
    assert bm.allocate_prompt(a2)
    assert a2.num_computed_tokens == 4  # a's head survived, its tail was evicted
    bm.check_invariants([a2, b2])


def test_eviction_order_follows_free_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    first = computed(bm, [1, 2, 3])  # 2 blocks, 1 cached
    second = computed(bm, [4, 5, 6])
    bm.free(second)  # freed first: evicted first
    bm.free(first)
    filler = make_seq([7, 8, 9, 10, 11, 12])  # 3 blocks: 2 uncached + the oldest cached
    assert bm.allocate_prompt(filler)
    bm.free(filler)
    hit_first, hit_second = make_seq([1, 2, 3]), make_seq([4, 5, 6])
    assert bm.allocate_prompt(hit_first) and hit_first.num_computed_tokens == 2
    assert bm.allocate_prompt(hit_second) and hit_second.num_computed_tokens == 0


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = computed(bm, list(range(9)))
    b = make_seq(list(range(9)))
    assert bm.allocate_prompt(b)
    assert b.num_computed_tokens == 0 and not set(a.block_ids) & set(b.block_ids)
    assert bm.num_cached_blocks == 0
    bm.check_invariants([a, b])


def test_shuffle_seed_gives_deterministic_noncontiguous_ids() -> None:
    def table(seed: int | None) -> list[int]:
        bm = BlockManager(num_blocks=64, block_size=4, shuffle_seed=seed)
        seq = make_seq(list(range(40)))
        assert bm.allocate_prompt(seq)
        bm.check_invariants([seq])
        return seq.block_ids

    assert table(None) == list(range(10))
    shuffled = table(7)
    assert shuffled == table(7)
    assert shuffled != table(8)
    assert any(b - a != 1 for a, b in zip(shuffled, shuffled[1:]))


def test_constructor_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_keeps_cache_content_correct_and_leaks_nothing(seed: int) -> None:
    """Simulates the stages' KV: a hit must only ever expose blocks holding exactly the KV
    of the hitting sequence's own prefix."""
    rng = random.Random(seed)
    bs = 4
    bm = BlockManager(num_blocks=40, block_size=bs, shuffle_seed=seed)
    # kv[block][slot] = the token prefix whose last token's KV sits there.
    kv: dict[int, dict[int, tuple[int, ...]]] = {}
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: list[Sequence] = []
    all_seqs: list[Sequence] = []

    def compute(seq: Sequence, upto: int) -> None:
        tokens = seq.all_token_ids
        others = {b for s in live if s is not seq for b in s.block_ids}
        for pos in range(seq.num_computed_tokens, upto):
            assert seq.block_ids[pos // bs] not in others, "writing into a shared block"
            kv.setdefault(seq.block_ids[pos // bs], {})[pos % bs] = tuple(tokens[: pos + 1])
        seq.num_computed_tokens = upto
        bm.mark_computed(seq, upto)

    for _ in range(600):
        op = rng.random()
        if op < 0.35:
            tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 10))]
            seq = make_seq(tokens or [0])
            if bm.allocate_prompt(seq):
                tokens = seq.all_token_ids
                for pos in range(seq.num_computed_tokens):
                    assert kv[seq.block_ids[pos // bs]][pos % bs] == tuple(tokens[: pos + 1])
                compute(seq, rng.randint(seq.num_computed_tokens, seq.num_tokens))
                live.append(seq)
                all_seqs.append(seq)
        elif op < 0.75 and live:
            seq = rng.choice(live)
            if seq.num_computed_tokens < seq.num_tokens:
                compute(seq, seq.num_tokens)  # finish the prefill
            elif bm.can_append(seq, seq.num_tokens + 1):
                seq.output_token_ids.append(rng.randrange(5))
                bm.append_slots(seq, seq.num_tokens)
                compute(seq, seq.num_tokens)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        bm.check_invariants(all_seqs)

    for seq in live:
        bm.free(seq)
    bm.check_invariants(all_seqs)
    assert bm.num_free_blocks == bm.num_total_blocks
    assert bm.num_hit_tokens > 0  # the workload did exercise the cache
