"""Output layers: sampled negative-sampling losses, sampled and in-batch softmax, and the full
one-vs-all (BCE) head.

For one image with vector u, positives v_p (P of them) and negatives v_n (K of them):

    loss = (1/P) Σ_p −log σ(v_p·u)  +  Σ_n w_n · (−log σ(−v_n·u))

With P = 1 this is exactly word2vec's negative-sampling objective (shared/DESIGN.md); with P > 1
the positive term is averaged so the balance between pulling and pushing does not depend on P.
w_n ∈ {0, 1} masks negatives that happen to be one of the image's own tags. The batch loss is
the mean over images.

The softmax losses (``sampled_softmax_loss``, ``in_batch_softmax_loss``) score the same candidates
with a cross-entropy over the positive and its negatives, each logit corrected by the candidate's
log sampling probability; see their docstrings.
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


def sampled_softmax_loss(s_pos: Tensor, s_neg: Tensor, log_q_pos: Tensor, log_q_neg: Tensor,
                         neg_weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sampled softmax with the logQ correction (Jean et al. 2015; Bengio & Senécal 2008).

    s_pos (B, P) and s_neg (B, K) are scores v·u; log_q_* the log of each candidate's sampling
    probability (up to a constant shared by all candidates: it cancels). For each positive p:

        loss_p = −log [ exp(s_p − log q_p) / (exp(s_p − log q_p) + Σ_n w_n exp(s_n − log q_n)) ]

    averaged over the positives and the batch. Subtracting log q makes the sampled softmax an
    estimate of the full softmax over the vocabulary, so v_t·u estimates log p(t|x) up to a
    per-image constant: ranking by v·u needs no γ (with β = 0). w_n ∈ {0, 1} removes negatives
    that are one of the image's own tags ("accidental hits").
    """
    logits_neg = s_neg - log_q_neg  # (B, K)
    if neg_weight is not None:
        logits_neg = logits_neg.masked_fill(neg_weight <= 0, -torch.inf)
    logits_pos = s_pos - log_q_pos  # (B, P)
    return _softmax_over(logits_pos, torch.logsumexp(logits_neg, 1), s_pos, s_neg, neg_weight)


def in_batch_softmax_loss(u: Tensor, pos: Tensor, log_q: Tensor, own: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In-batch negatives (Yi et al. 2019): each image's candidates are every positive of the batch.

    u (B, d); pos (B, P, d) the rows of the drawn positives; log_q (B, P) the log of each
    positive's frequency as a positive (the correction); own (B, B·P) bool: candidate c is one of
    image b's own tags (masked, except the positive scored). Softmax cross-entropy per positive,
    averaged.
    """
    b, p = pos.shape[:2]
    s = (u @ pos.reshape(b * p, -1).t()).float()  # (B, B·P)
    logits = s - log_q.reshape(1, b * p)
    others = torch.logsumexp(logits.masked_fill(own, -torch.inf), 1)  # (B,): the candidates not the image's own
    idx = torch.arange(b, device=u.device).unsqueeze(1) * p + torch.arange(p, device=u.device)  # (B, P) own columns
    s_pos = s.gather(1, idx)
    return _softmax_over(logits.gather(1, idx), others, s_pos, s, (~own).float())


def _softmax_over(logits_pos: Tensor, lse_others: Tensor, s_pos: Tensor, s_neg: Tensor,
                  neg_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy of each positive against itself plus the others (log-sum-exp ``lse_others`` (B,))."""
    lse = torch.logaddexp(logits_pos, lse_others.unsqueeze(1))  # (B, P)
    loss = (lse - logits_pos).mean(1).mean()
    if neg_weight is not None:
        mean_neg = (s_neg * neg_weight).sum() / neg_weight.sum().clamp_min(1)
    else:
        mean_neg = s_neg.mean()
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
