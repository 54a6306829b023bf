"""Output layers: sampled negative-sampling losses and the full one-vs-all (BCE) head.

For one image with vector u, positives v_p (P of them) and negatives v_n (K of them):

    loss = (1/P) Σ_p −log σ(v_p·u)  +  Σ_n w_n · (−log σ(−v_n·u))

With P = 1 this is exactly word2vec's negative-sampling objective (shared/DESIGN.md); with P > 1
the positive term is averaged so the balance between pulling and pushing does not depend on P.
w_n ∈ {0, 1} masks negatives that happen to be one of the image's own tags. The batch loss is
the mean over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def negative_sampling_loss(
    u: Tensor, pos: Tensor, neg: Tensor, neg_weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example negatives: u (B, d), pos (B, P, d), neg (B, K, d), neg_weight (B, K).

    Returns (loss, mean positive score, mean negative score).
    """
    s_pos = torch.einsum("bd,bpd->bp", u, pos).float()  # (B, P)
    s_neg = torch.einsum("bd,bkd->bk", u, neg).float()  # (B, K)
    return _combine(s_pos, s_neg, neg_weight)


def shared_negative_loss(
    u: Tensor, pos: Tensor, neg: Tensor, neg_weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One set of K negatives for the whole batch: neg (K, d) scored as a (B, K) matrix product,
    so K can be in the thousands. neg_weight (B, K) masks each image's own tags."""
    s_pos = torch.einsum("bd,bpd->bp", u, pos).float()  # (B, P)
    s_neg = (u @ neg.t()).float()  # (B, K)
    return _combine(s_pos, s_neg, neg_weight)


def _combine(s_pos: Tensor, s_neg: Tensor, neg_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    l_pos = -F.logsigmoid(s_pos).mean(1)  # (B,)
    l_neg = -F.logsigmoid(-s_neg)  # (B, K)
    if neg_weight is not None:
        l_neg = l_neg * neg_weight
        mean_neg = (s_neg * neg_weight).sum() / neg_weight.sum().clamp_min(1)
    else:
        mean_neg = s_neg.mean()
    loss = (l_pos + l_neg.sum(1)).mean()
    return loss, s_pos.detach().mean(), mean_neg.detach()


def full_bce_loss(u: Tensor, table: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-vs-all head over all V rows: u (B, d), table (V, d), targets (B, V) multi-hot.

    Summed over tags and averaged over images, so its scale matches the sampled loss.
    Returns (loss, mean score of the image's tags, mean score of the others).
    """
    s = (u @ table.t()).float()  # (B, V)
    loss = F.binary_cross_entropy_with_logits(s, targets, reduction="sum") / u.shape[0]
    pos = targets > 0
    s = s.detach()
    return loss, s[pos].mean(), s[~pos].mean()


def multi_hot(tags: Tensor, num_tags: int) -> Tensor:
    """tags (B, T) PAD(-1)-padded -> (B, V) float multi-hot."""
    out = torch.zeros(tags.shape[0], num_tags + 1)
    out.scatter_(1, tags.clamp_min(-1) % (num_tags + 1), 1.0)  # PAD lands in the extra column
    return out[:, :num_tags]
