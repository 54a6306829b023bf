"""Tagging scores over the whole vocabulary, in chunks (never a full N×V matrix at large V).

s(t|x) = v_t·u + γ·log count(t)   (shared/DESIGN.md, "Scoring"): a negative-sampling model's raw
score v_t·u is PMI-like and buries every frequent tag; γ adds back the tag's prior.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def topk_tags(
    u: Tensor, table: Tensor, log_counts: Tensor, gammas: list[float], k: int, chunk: int = 65536
) -> dict[float, tuple[Tensor, Tensor]]:
    """u (N, d), table (V, d), log_counts (V,) -> {γ: (scores (N, k), tag ids (N, k))}.

    One matrix product per chunk of tags serves every γ: only the cheap add and top-k are repeated.
    """
    u = u.float().cpu()
    k = min(k, table.shape[0])
    best = {g: (torch.full((u.shape[0], 0), -torch.inf), torch.zeros(u.shape[0], 0, dtype=torch.long)) for g in gammas}
    for start in range(0, table.shape[0], chunk):
        raw = u @ table[start : start + chunk].t()  # (N, c)
        lc = log_counts[start : start + chunk]  # (c,)
        for g in gammas:
            s, i = torch.topk(raw + g * lc, min(k, raw.shape[1]), dim=1)  # (N, ≤k)
            s, i = torch.cat([best[g][0], s], 1), torch.cat([best[g][1], i + start], 1)
            top = torch.topk(s, k, dim=1)  # merge with the best so far
            best[g] = (top.values, i.gather(1, top.indices))
    return best


def prior_topk(counts: Tensor, n: int, k: int) -> Tensor:
    """The frequency prior: every image gets the k most frequent tags. -> (n, k) ids."""
    return torch.topk(counts.float(), min(k, counts.numel())).indices.expand(n, -1)
