"""The training's optimizer settings (``optim.*``: AdamW for the trunk + W, the table's own sparse optimizer),
their schedule (linear warmup, then cosine to a floor, counted in batches) and the precisions they allow."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from im2vec.errors import BadValue


@dataclass
class OptimConfig:
    lr: float = 5e-3  # AdamW, trunk + W
    weight_decay: float = 0.05
    warmup_batches: int = 50
    min_lr_ratio: float = 0.05  # cosine floor, as a fraction of the peak
    grad_clip: float = 1.0  # max gradient norm of the trunk + W (0: off)
    table_optimizer: str = "sparse_adam"  # fused SparseAdam; "row_adagrad" when Adam's 2·V·d moments don't fit;
    # "torch_sparse_adam": the stock torch.optim.SparseAdam (same results, slower)
    table_lr: float = 0.02
    table_init_std: float = 0.01
    # the table's CPU work (draw, dedup, gather + copy of step i+1; update of step i) on a worker thread beside
    # the trunk, with the serial step's exact arithmetic (im2vec/wide/pipeline.py): "auto" = on when the trunk is on a
    # GPU and the table is not sharded; true / false
    overlap: str | bool = "auto"
    # sharded (trainer=ddp): the rows kept on every rank, their gradients all-reduced (im2vec/wide/hot_rows.py):
    # 0 none, N the N most drawn, a fraction τ in (0, 1) those a rank's batch draws with probability ≥ τ
    hot_rows: int | float = 0

    def __post_init__(self):
        if self.overlap not in ("auto", True, False):
            raise BadValue(f"optim.overlap={self.overlap!r}", "use auto, true or false")


FP16 = ("16", "16-mixed", "16-true", "fp16")


def check_precision(precision) -> None:
    """fp16 is refused: its loss scaler would unscale the table's gradient, stepped on its own (CPU) optimizer
    between the trunk's, with a scale that may change in between, and clip the trunk's scaled gradients."""
    if str(precision) in FP16:
        raise BadValue(f"trainer.precision={precision}: fp16 training needs a loss scaler, which im2vec's two "
                       "optimizers (the trunk's and the CPU table's) do not support",
                       "use trainer.precision=bf16-mixed on a GPU (same speed, no scaler) or 32-true")


def warmup_cosine(warmup: int, total: int, floor: float):
    """LR multiplier per batch: linear warmup, then cosine down to ``floor``."""
    def f(batch: int) -> float:
        if batch < warmup:
            return (batch + 1) / warmup
        t = min(1.0, (batch - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def dense_optimizer(params: list, o: OptimConfig, device: torch.device, say: bool = True, table: str = "",
                    undecayed: torch.nn.Module | None = None):
    """AdamW over what trains on the trunk's device: conv and linear weights decayed, biases, norm scales and
    ``undecayed``'s parameters (the word-vector map A) not (the groups printed, with ``table`` saying what the
    table's optimizer is); on a GPU the fused kernel (one launch for all parameters, no step counter read back to
    the host). A is not decayed because the rows r are not (the table's own optimizer): decaying A alone would
    move what A·w carries into r over a run, and a tag never seen with an image has only A·w (README, zero-shot)."""
    keep = {id(p) for p in undecayed.parameters()} if undecayed is not None else set()
    decay = [p for p in params if p.ndim >= 2 and id(p) not in keep]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in keep]
    if say:
        print(f"im2vec: AdamW on {sum(p.numel() for p in decay):,} decayed + {sum(p.numel() for p in no_decay):,} "
              f"undecayed trunk parameters; {table}")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, **fused)
