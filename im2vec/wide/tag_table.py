"""The wide part: a V×d table of tag vectors that always stays on the CPU in fp32.

Lightning moves a whole LightningModule with ``.to(device)`` (and precision plugins may cast it).
Both go through ``nn.Module._apply``; this wrapper's ``_apply`` ignores them, so the table stays
where it is while remaining an ordinary submodule: ``state_dict``, checkpoints and
``ModelCheckpoint`` include it like any other parameter.

Training reads rows with ``gather``: the sampled ids are deduplicated once, each distinct row is
read once (in parallel) and sent once to the trunk's device, scored there, and its gradient comes
back to the CPU summed, as a coalesced sparse (V, d) tensor. A step therefore reads and writes
only the distinct sampled rows, whatever V is, and the optimizer (``im2vec.wide.sparse_optim``) never
has to coalesce. ``lookup`` (a plain sparse ``nn.Embedding`` read) serves everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from im2vec.wide.allocator import empty_hugepages
from im2vec.wide.sparse_optim import (
    RowAdagrad,
    SparseAdam,
    gather_rows,
    make_table_optimizer,
)

__all__ = ["CPUTagTable", "RowAdagrad", "SparseAdam", "make_table_optimizer"]  # optimizers re-exported


class CPUTagTable(nn.Module):
    """Tag vectors (V, d) plus each tag's log count (used by the tagging score)."""

    def __init__(self, counts: Tensor, dim: int, init_std: float = 0.01):
        super().__init__()
        weight = empty_hugepages(counts.numel(), dim)  # 2 MiB pages: rows are read at random
        nn.init.normal_(weight, std=init_std)
        self.embedding = nn.Embedding(counts.numel(), dim, sparse=True, _weight=weight)
        self.register_buffer("log_counts", counts.double().clamp_min(1).log().float())  # (V,)

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    @property
    def num_tags(self) -> int:
        return self.embedding.num_embeddings

    @property
    def dim(self) -> int:
        return self.embedding.embedding_dim

    def _apply(self, fn, recurse=True):  # noqa: D401 - see module docstring
        return self  # never moved, never cast: the table lives in host memory, fp32

    def lookup(self, ids: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
        """ids (...) on the CPU -> rows (..., d) on ``device`` in the trunk's ``dtype`` (the gradient
        returns to the CPU as a sparse fp32 tensor)."""
        rows = self.embedding(ids.cpu())  # (..., d) fp32, CPU
        return rows.to(device=device, dtype=dtype, non_blocking=True)

    def gather(self, ids: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
        """ids (...) on the CPU -> rows (..., d) on ``device``, each distinct row read and sent once.

        The table's gradient is one coalesced sparse (V, d) tensor over the distinct ids.
        """
        uniq, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)  # (n,), ids.shape
        rows = _DistinctRows.apply(self.embedding.weight, uniq)  # (n, d) CPU fp32
        rows = rows.to(device=device, dtype=dtype, non_blocking=True)
        return rows.index_select(0, inverse.flatten().to(rows.device)).view(*ids.shape, rows.shape[1])

    def forward(self, ids: Tensor) -> Tensor:
        return self.embedding(ids)


class _DistinctRows(torch.autograd.Function):
    """weight[uniq] for sorted distinct ids; backward: the gradient as a coalesced sparse tensor."""

    @staticmethod
    def forward(ctx, weight: Tensor, uniq: Tensor) -> Tensor:
        ctx.save_for_backward(uniq)
        ctx.shape = weight.shape
        return gather_rows(weight.detach(), uniq)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (uniq,) = ctx.saved_tensors
        values = grad.to("cpu", torch.float32).contiguous()
        return torch.sparse_coo_tensor(uniq.unsqueeze(0), values, ctx.shape, is_coalesced=True,
                                       check_invariants=False), None
