"""Tagging scores over the whole vocabulary, in chunks (never a full N×V matrix at large V).

s(t|x) = v_t·u + γ·log count(t)   (shared/DESIGN.md, "Scoring"): a negative-sampling model's raw
score v_t·u is PMI-like and buries every frequent tag; γ adds back the tag's prior.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from im2vec.errors import BadValue


def check_finite(**named: Tensor | float) -> None:
    """Refuse NaN or ±inf in the inputs of a ranking: a NaN score has no place in an order (every
    comparison with it is false), so a ranking of one would be silently wrong."""
    for name, x in named.items():
        if x is None:
            continue
        if isinstance(x, Tensor):
            bad = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
        else:
            bad = 0 if math.isfinite(float(x)) else 1
        if bad:
            raise BadValue(f"ranking: {name} has {bad:,} NaN or infinite value(s)",
                           "a diverged model (check the training loss) or a bad γ; scores must be finite")


@torch.no_grad()
def topk_tags(
    u: Tensor, table: Tensor, log_counts: Tensor, gammas: list[float], k: int, chunk: int = 65536,
    budget: int = 1 << 23,
) -> dict[float, tuple[Tensor, Tensor]]:
    """u (N, d), table (V, d), log_counts (V,) -> {γ: (scores (N, k), tag ids (N, k))}.

    One matrix product per chunk of tags serves every γ: only the cheap add and top-k are repeated.
    ``budget`` bounds the scores held at once (images × tags of one product): the images go through in
    batches, so memory does not grow with N (5,000 images × 65,536 tags would be 1.3 GB per matrix).
    """
    u = u.float().cpu()
    check_finite(u=u, table=table, log_counts=log_counts, **{f"gamma {g}": g for g in gammas})
    n, v = u.shape[0], table.shape[0]
    k = min(k, v)
    chunk = max(1, min(chunk, v, budget))
    batch = max(1, budget // chunk)
    out = {g: (torch.empty(n, k), torch.empty(n, k, dtype=torch.long)) for g in gammas}
    for b0 in range(0, n, batch):
        ub = u[b0 : b0 + batch]  # (B, d)
        best = {g: (torch.full((ub.shape[0], 0), -torch.inf), torch.zeros(ub.shape[0], 0, dtype=torch.long))
                for g in gammas}
        for start in range(0, v, chunk):
            raw = ub @ table[start : start + chunk].t()  # (B, c)
            check_finite(scores=raw)  # finite inputs can still overflow
            lc = log_counts[start : start + chunk]  # (c,)
            for g in gammas:
                s, i = torch.topk(raw + g * lc, min(k, raw.shape[1]), dim=1)  # (B, ≤k)
                # raw, γ and lc finite: a sum that overflows is ±inf, and decides the top k only if it is in it
                check_finite(scores=s)
                s, i = torch.cat([best[g][0], s], 1), torch.cat([best[g][1], i + start], 1)
                top = torch.topk(s, min(k, s.shape[1]), dim=1)  # merge with the best so far (chunks may be < k)
                best[g] = (top.values, i.gather(1, top.indices))
        for g in gammas:
            out[g][0][b0 : b0 + batch], out[g][1][b0 : b0 + batch] = best[g]
    return out


def prior_topk(counts: Tensor, n: int, k: int) -> Tensor:
    """The frequency prior: every image gets the k most frequent tags. -> (n, k) ids."""
    return torch.topk(counts.float(), min(k, counts.numel())).indices.expand(n, -1)
