"""Paged attention: the plain-torch reference (CPU and GPU) and the Triton fast path (GPU).

The reference writes the step's new K/V into the paged cache, then attends sequence by
sequence over the sequence's whole context gathered through its block table. Correct for
prefill, chunked prefill continuing a cached prefix, decode and mixed batches; not fast.
The Triton path (layers/triton_attention.py) computes the same function in one launch that
reads K/V through the block tables in place, and is what CUDA graphs capture; the tests
hold it to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage_worker.attention_metadata import AttentionMetadata
from stage_worker.layers.layer_kv_cache import LayerKVCache


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_queries_per_kv = num_heads // num_kv_heads
        # Set by KVCache.bind. Not buffers: the cache is sized after the model is built.
        self.kv_cache: LayerKVCache | None = None
        # See layers/kernel_backend.py.
        self.kernel_backend = "reference"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """query [num_tokens, heads * head_dim], key/value [num_tokens, kv_heads * head_dim]
        -> [num_tokens, heads * head_dim]."""
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_dim)
        k = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        md = attn_metadata
        if self.kernel_backend == "triton" and md.use_cache:
            return self._forward_triton(q, k, v, md).view(num_tokens, self.num_heads * self.head_dim)
        out = torch.empty_like(q)  # [num_tokens, heads, head_dim]
        if md.use_cache:
            assert self.kv_cache is not None, "KV cache not bound: call KVCache.bind(model) first"
            self.kv_cache.write(md.slot_mapping, k, v)
        for i in range(md.num_seqs):
            q_start, q_end = md.query_start_loc[i], md.query_start_loc[i + 1]
            if q_end == q_start:
                continue
            if md.use_cache:
                assert md.context_lens[i] == md.start_positions[i] + (q_end - q_start)
                seq_k, seq_v = self._gather_context(i, md, q.dtype)
            else:
                seq_k, seq_v = k[q_start:q_end], v[q_start:q_end]
            out[q_start:q_end] = self._attend(q[q_start:q_end], seq_k, seq_v)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _forward_triton(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        from stage_worker.layers.triton_attention import paged_attention, store_kv_cache

        assert self.kv_cache is not None, "KV cache not bound: call KVCache.bind(model) first"
        assert md.block_tables_tensor is not None, "the Triton path needs the device metadata"
        cache = self.kv_cache
        store_kv_cache(k, v, cache.key, cache.value, md.slot_mapping, cache.key_scale, cache.value_scale)
        return paged_attention(
            q,
            cache.key,
            cache.value,
            md.query_start_loc_tensor,
            md.context_lens_tensor,
            md.block_tables_tensor,
            md.max_query_len,
            self.scale,
            k_scale=cache.key_scale,
            v_scale=cache.value_scale,
        )

    def _gather_context(
        self, i: int, md: AttentionMetadata, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's first context_lens[i] cached K/V rows, each [context_len, kv_heads, head_dim]
        in `dtype`."""
        context_len = md.context_lens[i]
        num_blocks = (context_len + md.block_size - 1) // md.block_size
        blocks = md.block_tables[i][:num_blocks]
        assert blocks.numel() == num_blocks, (
            f"block table of sequence {i} has {blocks.numel()} blocks, {num_blocks} needed"
        )
        return self.kv_cache.gather(blocks, context_len, dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [q_len, heads, head_dim]: the last q_len positions of k/v [ctx_len, kv_heads, head_dim]."""
        q_len, ctx_len = q.shape[0], k.shape[0]
        qh = q.transpose(0, 1)  # [heads, q_len, head_dim]
        # Query head h reads kv head h // num_queries_per_kv (HF's repeat_kv order).
        kh = k.transpose(0, 1).repeat_interleave(self.num_queries_per_kv, dim=0)  # [heads, ctx_len, head_dim]
        vh = v.transpose(0, 1).repeat_interleave(self.num_queries_per_kv, dim=0)
        mask = None
        if q_len > 1:
            # The queries are the last q_len positions of the keys' span: query j sits at
            # key index ctx_len - q_len + j and sees keys up to and including it.
            q_idx = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            k_idx = torch.arange(ctx_len, device=q.device)
            mask = k_idx[None, :] <= q_idx[:, None]  # [q_len, ctx_len]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        return out.transpose(0, 1)  # [q_len, heads, head_dim]

