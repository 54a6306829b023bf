"""Frequency samplers for negative sampling.

Negatives are drawn over the whole vocabulary with probability ∝ count^α (word2vec's unigram^0.75
table); positives are drawn among an image's own tags with probability ∝ count^(−β) ("scaled
inverse frequency": β = 0 is uniform, β = 1 inverse frequency).

Both samplers take an explicit ``torch.Generator`` so that a checkpoint can save and restore the
exact random state, and neither does O(V) work per batch: the negative CDF is built once and
sampled with a binary search, positives only look at the B×T tag matrix of the batch.

A batch's tags arrive as a padded LongTensor (B, T) with ``PAD = -1`` in unused slots: this is
what the data pipeline's collate function produces.
"""

from __future__ import annotations

import torch

from im2vec.errors import BadValue
from im2vec.tags import PAD


class NegativeSampler:
    """Draws tag ids ∝ count^alpha with a precomputed CDF (O(log V) per draw, O(V) once)."""

    def __init__(self, counts: torch.Tensor, alpha: float = 0.75):
        if (counts < 0).any():
            raise BadValue(f"negative sampler: counts must be non-negative (tag {int((counts < 0).nonzero()[0])} "
                             f"has {int(counts[counts < 0][0])})")
        weights = torch.where(counts > 0, counts.double().pow(alpha), 0.0)  # (V,); unseen tags never
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise BadValue("negative sampler: counts must be non-negative with a positive sum", "check the vocabulary file")
        self.alpha = alpha
        self.probs = (weights / weights.sum()).float()  # (V,) kept for tests and diagnostics
        cdf = torch.cumsum(weights, 0)
        self.cdf = cdf / cdf[-1]  # (V,) float64: float32 loses the tail of a 600k-row CDF
        self.num_tags = counts.numel()

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        ids = torch.searchsorted(self.cdf, u, right=True)
        return ids.clamp_(max=self.num_tags - 1)  # u can round to exactly 1.0

    def sample_excluding(
        self,
        own: torch.Tensor,
        k: int,
        generator: torch.Generator | None = None,
        rounds: int = 4,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K negatives per image that avoid the image's own tags ``own`` (B, T, PAD-padded).

        Collisions are redrawn a few times; the rare ones that remain are returned masked out
        (weight 0), so the result is exactly "count^α restricted to the other tags" in
        distribution up to that tiny remainder. Returns (ids (B, K), weight (B, K) float).
        """
        ids = self.sample((own.shape[0], k), generator)  # (B, K)
        hit = collides(ids, own)  # (B, K) bool
        for _ in range(rounds):
            if not hit.any():
                break
            ids[hit] = self.sample((int(hit.sum()),), generator)
            hit = collides(ids, own)
        return ids, (~hit).float()


def collides(ids: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: whether ids[b, k] is one of own[b, :]."""
    return (ids.unsqueeze(2) == own.unsqueeze(1)).any(2)  # (B, K, T) -> (B, K)


class PositiveSampler:
    """Draws P of an image's own in-vocabulary tags with probability ∝ count^(−beta)."""

    def __init__(self, counts: torch.Tensor, beta: float = 0.0):
        if (counts < 0).any():
            raise BadValue(f"positive sampler: counts must be non-negative (tag {int((counts < 0).nonzero()[0])} "
                             f"has {int(counts[counts < 0][0])})")
        self.beta = beta
        # (V,) per-tag log weight −β·log count, kept as a log: count^(−β) itself underflows float32 to 0 for
        # large β and million-count tags (then every weight of an image can be 0); the +1 slot is PAD's (−inf)
        lw = (-beta * counts.double().clamp_min(1).log()).float()
        self.log_weights = torch.cat([lw, torch.tensor([-float("inf")])])

    def sample(self, tags: torch.Tensor, p: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """tags (B, T) PAD-padded -> (B, P) tag ids, drawn with replacement."""
        if tags.numel() == 0 or (tags[:, 0] == PAD).any():
            raise ValueError("positive sampler: every image needs at least one in-vocabulary tag")
        lw = self.log_weights[tags]  # (B, T); PAD maps to the last slot (−inf: weight 0)
        w = (lw - lw.max(dim=1, keepdim=True).values).exp()  # each row's largest weight is 1: never all zero
        slot = torch.multinomial(w, p, replacement=True, generator=generator)  # (B, P)
        return tags.gather(1, slot)
