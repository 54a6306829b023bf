"""The zero-shot figures (``evaluate.py`` on a checkpoint that held tags out): each held-out image's unseen
tags ranked among themselves by v = A·w, beside random word vectors through the same A and the tags' prior
(the protocol of Zhang et al. 2016, "Fast zero-shot image tagging")."""

from __future__ import annotations

import torch
from torch import Tensor

from im2vec.eval.ranking import KS, rank_prior, rank_tags, tagging_metrics
from im2vec.tags import PAD
from im2vec.wide.tag_vectors import mapped_vectors, random_like


def split_truths(truth: Tensor, num_seen: int) -> tuple[Tensor, Tensor]:
    """Truth ids (N, T) in an extended vocabulary [seen tags, unseen tags] -> (seen ids, unseen ids counted
    from 0), PAD elsewhere."""
    seen = truth.masked_fill(truth >= num_seen, PAD)
    unseen = torch.where(truth >= num_seen, truth - num_seen, torch.full_like(truth, PAD))
    return seen, unseen


def unseen_figures(u: Tensor, a: Tensor, words: Tensor, prior_counts: Tensor, truths: dict[str, Tensor],
                   seed: int = 0, device: str | torch.device | None = None) -> dict[str, float]:
    """Tagging over the unseen tags only (the zero-shot protocol): each image's unseen tags ranked by v·u with
    v = A·w (γ plays no part: no unseen tag has a count of its own), P@k, R@k and mAP, beside two controls
    ranked the same way: ``random/`` (random unit vectors in place of the words' vectors w, through the same
    A: what the map gives without the words' meaning) and ``prior/`` (the unseen tags by their count in the
    vocabulary file, one list for every image). ``words``: the unseen tags' vectors w (n, d_w); ``truths``:
    {"": observed, "clean/": clean} ids among the unseen tags (N, T)."""
    names, zeros, m = list(truths), torch.zeros(len(words)), {}
    for who in ("", "random/", "prior/"):
        if who == "prior/":
            r = rank_prior(prior_counts.double().clamp_min(1).log().float(), [truths[n] for n in names], max(KS))
        else:
            table = mapped_vectors(a, words if who == "" else random_like(words, seed))
            r = rank_tags(u, table, zeros, 0.0, [truths[n] for n in names], kmax=max(KS), device=device)
        for i, n in enumerate(names):
            m.update(tagging_metrics(r, i, KS, None, len(words), prefix=f"{who}{n}"))
    return m
