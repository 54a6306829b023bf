"""A trained model back from a training checkpoint, for evaluation and prediction.

Loading is weights-only (``torch.load(..., weights_only=True)``): a checkpoint is read as tensors
and plain containers, never by unpickling arbitrary objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from im2vec.model import ImageEncoder


@dataclass
class TrainedModel:
    encoder: ImageEncoder  # in eval mode, on the CPU
    table: Tensor  # (V, d) tag vectors, fp32
    log_counts: Tensor  # (V,) log of each tag's training count
    tags: list[str]
    gamma: float  # the tagging score's γ: chosen on validation in training (else sampler.gamma)
    image_size: int | None  # None in checkpoints written before it was recorded
    fingerprint: str
    path: str

    @property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tags)}


def load_model(path: str | os.PathLike) -> TrainedModel:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("im2vec") if isinstance(ckpt, dict) else None
    if meta is None:
        raise ValueError(f"{path}: not an im2vec training checkpoint (no 'im2vec' entry)")
    state = ckpt["state_dict"]
    encoder = ImageEncoder(meta["encoder"]["trunk"], meta["encoder"]["dim"], weights=None)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    encoder.eval()
    return TrainedModel(
        encoder=encoder, table=state["table.embedding.weight"].float(), log_counts=state["table.log_counts"].float(),
        tags=list(meta["tags"]), gamma=float(meta.get("gamma", meta["sampler"]["gamma"])), image_size=meta.get("image_size"),
        fingerprint=meta["fingerprint"], path=str(path),
    )


def set_gamma(path: str | os.PathLike, gamma: float) -> None:
    """Record ``gamma`` as a training checkpoint's tagging γ (written to a temporary file, then renamed)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["im2vec"]["gamma"] = float(gamma)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
