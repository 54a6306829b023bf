"""The sampled tag head, without Lightning: what a training step does between the trunk and the table.

``draw_ids`` draws a batch's positive and negative tag ids on the CPU; ``sampled_loss`` gathers
their rows from the CPU tag table (each distinct row once), scores them against the image vectors
on the trunk's device and returns the negative-sampling loss. ``TagHead`` (im2vec/wide/tag_head.py) and the tag-head
benchmark (``python -m im2vec.bench``) both call these two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from im2vec.errors import BadValue
from im2vec.wide.loss import (
    in_batch_softmax_loss,
    negative_sampling_loss,
    sampled_softmax_loss,
    shared_negative_loss,
)
from im2vec.wide.sampler import NegativeSampler, PositiveSampler, collides
from im2vec.wide.tag_table import CPUTagTable

LOSSES = ("negative_sampling", "softmax", "in_batch")


@dataclass
class SamplerConfig:
    head: str = "sampled"  # "sampled" (the loss below over drawn rows), "full" (BCE over all V rows; small V only) or
    # "auto": full for a vocabulary of at most full_max_tags tags on one device, sampled otherwise (resolve_head)
    full_max_tags: int = 20_000
    loss: str = "negative_sampling"  # "negative_sampling" (word2vec), "softmax" (sampled softmax, logQ-corrected)
    # or "in_batch" (softmax over the batch's positives, frequency-corrected; no drawn negatives)
    logq: bool = True  # softmax losses: subtract each candidate's log sampling probability (off: an ablation)
    negatives: str = "per_example"  # "per_example": K rows per image; "shared": K rows per batch
    num_negatives: int = 20  # K
    num_positives: int = 1  # P, drawn from the image's own tags
    alpha: float = 0.75  # negatives ∝ count^alpha
    beta: float = 0.0  # positives ∝ count^(-beta): 0 uniform, 1 inverse frequency
    exclude_own: bool = True  # never use one of the image's own tags as its negative
    gamma: float = 0.2  # tagging score s = v·u + gamma·log count (chosen from the validation γ sweep)

    def __post_init__(self):
        if self.head not in ("sampled", "full", "auto"):
            raise BadValue(f"sampler.head={self.head!r}", "use 'sampled', 'full' or 'auto'")
        if self.loss not in LOSSES:
            raise BadValue(f"sampler.loss={self.loss!r}", f"use one of {', '.join(LOSSES)}")
        if self.negatives not in ("per_example", "shared"):
            raise BadValue(f"sampler.negatives={self.negatives!r}", "use 'per_example' or 'shared'")
        if self.num_negatives < 1 or self.num_positives < 1:
            raise BadValue("sampler.num_negatives and sampler.num_positives must be at least 1", "set them to 1 or more")


def resolve_head(s: SamplerConfig, num_tags: int, sharded: bool) -> str:
    """sampler.head=auto -> "full" where every row can be scored every step (at most ``full_max_tags`` tags, one
    device: on the real collections' vocabularies of 600 to 3,700 tags the full head learnt more per sample, README)
    and "sampled" where it cannot (YFCC's 600k tags; a table sharded over ranks)."""
    if s.head != "auto":
        return s.head
    return "full" if num_tags <= s.full_max_tags and not sharded else "sampled"


def draw_ids(s: SamplerConfig, pos_sampler: PositiveSampler, neg_sampler: NegativeSampler, tags: Tensor,
             gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor | None]:
    """The sampled head's ids for a batch's tags (B, T) on the CPU -> (positives (B, P), negatives
    (B, K) or (K,) when shared, negative weights (B, K) or None)."""
    b = tags.shape[0]
    if b == 0:  # an empty batch (data.decode=gpu: every JPEG failed): no ids, nothing drawn
        empty = torch.empty(0, dtype=torch.long)
        return empty.view(0, s.num_positives), empty.view(0, s.num_negatives), None
    pos_ids = pos_sampler.sample(tags, s.num_positives, gen)  # (B, P)
    weight = None
    if s.loss == "in_batch":  # the candidates are the batch's positives; an image's own tags are masked
        own = collides(pos_ids.flatten().expand(b, -1), tags)  # (B, B·P)
        return pos_ids, torch.empty(b, 0, dtype=torch.long), (~own).float()
    if s.negatives == "shared":
        neg_ids = neg_sampler.sample((s.num_negatives,), gen)  # (K,)
        if s.exclude_own:
            weight = (~collides(neg_ids.expand(b, -1), tags)).float()  # (B, K)
    elif s.exclude_own:
        neg_ids, weight = neg_sampler.sample_excluding(tags, s.num_negatives, gen)  # (B, K) x2
    else:
        neg_ids = neg_sampler.sample((b, s.num_negatives), gen)  # (B, K)
    return pos_ids, neg_ids, weight


def sampled_loss(s: SamplerConfig, table: CPUTagTable, u: Tensor, pos_ids: Tensor, neg_ids: Tensor,
                 weight: Tensor | None, dedupe: bool = True, row_map=None) -> tuple[Tensor, Tensor, Tensor]:
    """Negative-sampling loss of u (B, d) on the trunk's device against the drawn rows.

    One gather for all rows: each distinct row is read and sent once, and the table receives one
    coalesced sparse gradient per step. ``dedupe=False`` reads the rows with a plain sparse
    ``nn.Embedding`` lookup instead (duplicates and all: the stock path, for the benchmark).
    ``row_map(ids, rows) -> rows``: the tag vectors from the rows (``im2vec.wide.tag_vectors.TagVectorMap``).
    """
    ids = torch.cat([pos_ids.flatten(), neg_ids.flatten()])
    rows = (table.gather if dedupe else table.lookup)(ids, u.device, u.dtype)  # (B·P + #neg, d)
    if row_map is not None:
        rows = row_map(ids, rows)
    extras = {k: None if v is None else v.to(u.device) for k, v in head_extras(s, table.log_counts, pos_ids, neg_ids,
                                                                               weight).items()}
    return loss_on_rows(s, u, rows, tuple(pos_ids.shape), tuple(neg_ids.shape), extras)


def head_extras(s: SamplerConfig, log_counts: Tensor, pos_ids: Tensor, neg_ids: Tensor, weight: Tensor | None
                ) -> dict[str, Tensor | None]:
    """The small CPU tensors a head needs beside the rows: negative weights and, for the softmax losses,
    each candidate's log sampling probability."""
    extras = {"weight": weight}
    if s.loss == "in_batch":  # a tag's chance to be some image's positive ≈ count^(1-β) (up to a constant)
        extras["log_q_pos"] = _log_q(log_counts, pos_ids, 1.0 - s.beta, s.logq)  # (B, P)
    elif s.loss == "softmax":  # the negatives' proposal: count^α (the NegativeSampler's)
        extras["log_q_pos"] = _log_q(log_counts, pos_ids, s.alpha, s.logq)  # (B, P)
        extras["log_q_neg"] = _log_q(log_counts, neg_ids, s.alpha, s.logq)  # (B, K) or (K,)
    return extras


def loss_on_rows(s: SamplerConfig, u: Tensor, rows: Tensor, pos_shape: tuple[int, ...], neg_shape: tuple[int, ...],
                 extras: dict[str, Tensor | None]) -> tuple[Tensor, Tensor, Tensor]:
    """The loss from the flattened rows (B·P + #neg, d) of [positives, negatives], all on u's device."""
    b, n_pos = u.shape[0], pos_shape[0] * pos_shape[1]
    pos = rows[:n_pos].view(b, pos_shape[1], -1)  # (B, P, d)
    neg = rows[n_pos:].view(*neg_shape, rows.shape[1])  # (B, K, d) or (K, d)
    weight = extras.get("weight")
    weight = weight.to(u.dtype) if weight is not None else None
    if s.loss == "in_batch":
        return in_batch_softmax_loss(u, pos, extras["log_q_pos"], weight <= 0)
    shared = s.negatives == "shared"
    if s.loss == "softmax":
        s_pos = torch.einsum("bd,bpd->bp", u, pos).float()  # (B, P)
        s_neg = (u @ neg.t() if shared else torch.einsum("bd,bkd->bk", u, neg)).float()  # (B, K)
        return sampled_softmax_loss(s_pos, s_neg, extras["log_q_pos"], extras["log_q_neg"], weight)
    return (shared_negative_loss if shared else negative_sampling_loss)(u, pos, neg, weight)


def _log_q(log_counts: Tensor, ids: Tensor, power: float, on: bool) -> Tensor:
    """log of a sampling probability ∝ count^power for ``ids`` (zeros when the correction is off)."""
    return power * log_counts[ids] if on else torch.zeros(ids.shape)
