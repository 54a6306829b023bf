"""Per-image tagging metrics on top-k predictions against PAD(-1)-padded sets of true tag ids."""

from __future__ import annotations

import torch
from torch import Tensor


def hits(pred: Tensor, truth: Tensor) -> Tensor:
    """pred (N, k) ids, truth (N, T) PAD-padded -> (N, k) bool: pred[i, j] is one of image i's tags."""
    valid = truth >= 0
    return ((pred.unsqueeze(2) == truth.unsqueeze(1)) & valid.unsqueeze(1)).any(2)  # (N, k, T) -> (N, k)


def precision_per_image(pred: Tensor, truth: Tensor, k: int) -> Tensor:
    """(N,) float64: |top-k ∩ truth| / k per image, NaN for an image without any true tag."""
    out = hits(pred[:, :k], truth).double().sum(1).div(k)
    return out.masked_fill_(~(truth >= 0).any(1), float("nan"))


def recall_per_image(pred: Tensor, truth: Tensor, k: int) -> Tensor:
    """(N,) float64: |top-k ∩ truth| / |truth| per image, NaN for an image without any true tag."""
    n_true = (truth >= 0).sum(1)
    return hits(pred[:, :k], truth).double().sum(1) / n_true  # 0 / 0 = NaN


def image_mean(values: Tensor) -> float:
    """The mean over the images that have a value (NaN when none has)."""
    values = values[~values.isnan()]
    return values.mean().item() if len(values) else float("nan")


def precision_at_k(pred: Tensor, truth: Tensor, k: int) -> float:
    """Mean over images of |top-k ∩ truth| / k (images without any true tag are left out)."""
    return image_mean(precision_per_image(pred, truth, k))  # float64: equal hits, equal figures


def recall_at_k(pred: Tensor, truth: Tensor, k: int) -> float:
    """Mean over images of |top-k ∩ truth| / |truth| (images without any true tag are left out)."""
    return image_mean(recall_per_image(pred, truth, k))


def noise_share(pred: Tensor, noise_ids: Tensor, k: int) -> float:
    """Share of all top-k predictions that are known noise tags."""
    return torch.isin(pred[:, :k], noise_ids).float().mean().item()
