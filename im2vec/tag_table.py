"""The wide part: a V×d table of tag vectors that always stays on the CPU in fp32.

Lightning moves a whole LightningModule with ``.to(device)`` (and precision plugins may cast it).
Both go through ``nn.Module._apply``; this wrapper's ``_apply`` ignores them, so the table stays
where it is while remaining an ordinary submodule: ``state_dict``, checkpoints and
``ModelCheckpoint`` include it like any other parameter.

Rows are read with ``lookup`` (a sparse-gradient ``nn.Embedding``), sent to the trunk's device,
scored there, and their gradient flows back to the CPU as a sparse tensor, so a step reads and
writes only the B·(P+K) sampled rows, whatever V is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CPUTagTable(nn.Module):
    """Tag vectors (V, d) plus each tag's log count (used by the tagging score)."""

    def __init__(self, counts: Tensor, dim: int, init_std: float = 0.01):
        super().__init__()
        self.embedding = nn.Embedding(counts.numel(), dim, sparse=True)
        nn.init.normal_(self.embedding.weight, std=init_std)
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

    def forward(self, ids: Tensor) -> Tensor:
        return self.embedding(ids)


class RowAdagrad(torch.optim.Optimizer):
    """Row-wise sparse Adagrad: one accumulator value per row (V floats instead of Adam's 2·V·d).

    For the touched rows i with (coalesced) gradient g_i:
        G_i += mean(g_i²);   w_i -= lr · g_i / (sqrt(G_i) + eps)
    Untouched rows and their state are left exactly as they were.
    """

    def __init__(self, params, lr: float = 0.1, eps: float = 1e-10, initial_accumulator_value: float = 0.0):
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowAdagrad expects sparse gradients (nn.Embedding(sparse=True))")
                state = self.state[p]
                if not state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator_value"], dtype=p.dtype, device=p.device)
                grad = p.grad.coalesce()
                rows = grad.indices()[0]  # (n,) unique
                g = grad.values()  # (n, d)
                acc = state["sum"].index_add_(0, rows, g.pow(2).mean(1))[rows]  # (n,)
                p.index_add_(0, rows, g / (acc.sqrt() + group["eps"]).unsqueeze(1), alpha=-group["lr"])
        return loss


def make_table_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """'sparse_adam' (default) or 'row_adagrad' (for vocabularies whose Adam moments don't fit)."""
    if name == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=lr)
    if name == "row_adagrad":
        return RowAdagrad(params, lr=lr)
    raise ValueError(f"unknown table optimizer {name!r}: use 'sparse_adam' or 'row_adagrad'")
