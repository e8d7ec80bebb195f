"""Vocabulary-parallel embedding and LM head.

The vocabulary is padded to a multiple of tp * 64 so that every rank holds the same number
of rows (and the rows stay aligned for matmuls); rank r owns rows
[r * rows_per_rank, (r + 1) * rows_per_rank). Padded rows are zero and the logits of padded
ids are trimmed before anyone sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage_worker.distributed import get_tp_group
from stage_worker.layers.linear import Loaded, check_loaded_shape, new_parameter

VOCAB_PADDING_MULTIPLE = 64


def pad_vocab_size(vocab_size: int, tp_size: int, multiple: int = VOCAB_PADDING_MULTIPLE) -> int:
    step = multiple * tp_size
    return (vocab_size + step - 1) // step * step


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, tp.size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // tp.size
        self.vocab_start_index = tp.rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        if weight is None:
            weight = new_parameter((self.num_embeddings_per_partition, embedding_dim), dtype, device)
            weight.weight_loader = self.weight_loader
        else:
            # Tied to another module's parameter (same shard layout), loaded once through it.
            assert tuple(weight.shape) == (self.num_embeddings_per_partition, embedding_dim)
        self.weight = weight

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        check_loaded_shape(loaded, (self.num_embeddings, self.embedding_dim), "vocabulary matrix")
        # The last ranks may hold only padding (or part of it).
        real_end = min(self.vocab_end_index, self.num_embeddings)
        num_real = max(0, real_end - self.vocab_start_index)
        if num_real > 0:
            param.data[:num_real].copy_(loaded[self.vocab_start_index : real_end])
        param.data[num_real:].zero_()

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, embedding_dim]. With reduce=False each rank returns
        only its vocab shard's contribution (zeros elsewhere), for the caller to reduce
        (sequence parallelism reduce-scatters it instead of all-reducing)."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by other ranks look up row 0 and are zeroed; the all-reduce then sums
        # exactly one non-zero contribution per token.
        in_shard = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start_index, 0)
        out = F.embedding(local_ids, self.weight)  # [num_tokens, embedding_dim]
        out = out.masked_fill(~in_shard.unsqueeze(-1), 0)
        return get_tp_group().all_reduce(out) if reduce else out


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states onto the vocabulary; every rank computes its vocab shard."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding; call compute_logits")

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, vocab_size] in the model dtype, same on every TP
        rank. Not converted to float32 here: the sampler converts a chunk of rows at a time, so
        no float32 copy of every row's logits is held at once."""
        logits = F.linear(hidden_states, self.weight)  # [num_tokens, vocab_per_partition]
        logits = get_tp_group().all_gather(logits, dim=-1)  # [num_tokens, vocab_padded]
        return logits[:, : self.num_embeddings]
