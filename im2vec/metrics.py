"""Per-image tagging metrics on top-k predictions against PAD(-1)-padded sets of true tag ids."""

from __future__ import annotations

import torch
from torch import Tensor


def hits(pred: Tensor, truth: Tensor) -> Tensor:
    """pred (N, k) ids, truth (N, T) PAD-padded -> (N, k) bool: pred[i, j] is one of image i's tags."""
    valid = truth >= 0
    return ((pred.unsqueeze(2) == truth.unsqueeze(1)) & valid.unsqueeze(1)).any(2)  # (N, k, T) -> (N, k)


def precision_at_k(pred: Tensor, truth: Tensor, k: int) -> float:
    """Mean over images of |top-k ∩ truth| / k (images without any true tag are left out)."""
    has = (truth >= 0).any(1)
    if not has.any():
        return float("nan")
    return hits(pred[has, :k], truth[has]).double().sum(1).div(k).mean().item()  # float64: equal hits, equal figures


def recall_at_k(pred: Tensor, truth: Tensor, k: int) -> float:
    """Mean over images of |top-k ∩ truth| / |truth| (images without any true tag are left out)."""
    n_true = (truth >= 0).sum(1)
    has = n_true > 0
    if not has.any():
        return float("nan")
    return (hits(pred[has, :k], truth[has]).double().sum(1) / n_true[has]).mean().item()


def noise_share(pred: Tensor, noise_ids: Tensor, k: int) -> float:
    """Share of all top-k predictions that are known noise tags."""
    return torch.isin(pred[:, :k], noise_ids).float().mean().item()
