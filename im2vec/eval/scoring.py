"""Tagging scores over the whole vocabulary, in chunks (never a full N×V matrix at large V).

s(t|x) = v_t·u + γ·log count(t)   (shared/DESIGN.md, "Scoring"): a negative-sampling model's raw
score v_t·u is PMI-like and buries every frequent tag; γ adds back the tag's prior.

Scoring runs on ``device`` (default: the CPU). The table stays in host memory: it goes to the device
one chunk of rows at a time (through pinned buffers, asynchronously, on CUDA), so device memory is
bounded by the chunk and the score budget whatever V is; on the CPU a chunk is a view of the table
(no copy) and the same code runs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from im2vec.errors import BadValue

ROWS = 65536  # table rows sent to the device at once: 64 MB at d = 256
IMAGES = 1 << 16  # images held on the device at once (more: one more pass over the table per group)


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
        _refuse(name, bad)


def _refuse(name: str, bad: int) -> None:
    if bad:
        raise BadValue(f"ranking: {name} has {bad:,} NaN or infinite value(s)",
                       "a diverged model (check the training loss) or a bad γ; scores must be finite")


def as_device(device: str | torch.device | None) -> torch.device:
    """None: the CPU (scoring's default)."""
    return torch.device("cpu") if device is None else torch.device(device)


class FiniteCheck:
    """check_finite on tensors of a scoring pass: at once on the CPU; on another device the counts add up
    there and ``done`` raises, so that the pass never waits for the device in between."""

    def __init__(self, device: torch.device):
        self.eager = device.type == "cpu"
        self.bad: dict[str, Tensor] = {}

    def __call__(self, **named: Tensor) -> None:
        if self.eager:
            check_finite(**named)
            return
        for name, x in named.items():
            n = (~torch.isfinite(x)).sum()
            self.bad[name] = self.bad[name] + n if name in self.bad else n

    def done(self) -> None:
        for name, n in self.bad.items():
            _refuse(name, int(n))
        self.bad = {}


@contextmanager
def fp32_scores(device: torch.device) -> Iterator[None]:
    """Products in IEEE fp32 on a CUDA device: not TF32 (whatever torch.set_float32_matmul_precision
    asked for the trunk) and not under autocast; a ranking is decided by small differences. No-op on
    the CPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def row_chunks(device: torch.device, rows: int, *tensors: Tensor) -> Iterator[tuple[int, list[Tensor]]]:
    """(start, [rows start:start+rows of each tensor, on ``device``]) over host tensors of V rows.

    On the CPU the chunks are views (nothing is copied). On CUDA each chunk goes through one of two
    pinned buffers with an asynchronous copy: the host fills the next buffer while the device works on
    the last chunk; a buffer is refilled only once its previous copy has finished. Nothing of the
    tensors but two chunks ever sits on the device (the caller drops each chunk when it is done)."""
    v = tensors[0].shape[0]
    rows = max(1, min(rows, v))
    if device.type != "cuda":
        for start in range(0, v, rows):
            yield start, [t[start : start + rows].to(device) for t in tensors]
        return
    stage = [[torch.empty((rows, *t.shape[1:]), dtype=t.dtype, pin_memory=True) for t in tensors] for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    for j, start in enumerate(range(0, v, rows)):
        c, slot = min(rows, v - start), j % 2
        if copied[slot] is not None:
            copied[slot].synchronize()  # the copy out of this buffer (two chunks ago) has finished
        out = []
        for buf, t in zip(stage[slot], tensors):
            buf[:c].copy_(t[start : start + c])
            out.append(buf[:c].to(device, non_blocking=True))
        copied[slot] = torch.cuda.Event()
        copied[slot].record()
        yield start, out


@torch.no_grad()
def topk_tags(
    u: Tensor, table: Tensor, log_counts: Tensor, gammas: list[float], k: int, chunk: int = ROWS,
    budget: int | None = None, device: str | torch.device | None = None, images: int = IMAGES,
    ids: Tensor | None = None,
) -> dict[float, tuple[Tensor, Tensor]]:
    """u (N, d), table (V, d), log_counts (V,) -> {γ: (scores (N, k), tag ids (N, k))}, on the CPU.
    Equal scores are taken in tag-id order (whatever the chunks: a sharded pass merges to the same lists).
    ``ids`` (V,) ascending: the tags' ids when ``table`` holds some rows of a larger one (a rank's shard).

    One pass over the table, ``chunk`` rows at a time (copied to ``device``, default the CPU, once per
    pass), and one matrix product per chunk and batch of images serves every γ: only the cheap add and
    top-k are repeated per γ. ``budget`` bounds the scores held at once (images × tags of one
    product; default 2^23 on the CPU, 2^26 on another device): the images go through in batches, so
    memory does not grow with N (5,000 images × 65,536 tags would be 1.3 GB per matrix). At most
    ``images`` image vectors are on the device at once (more: one pass over the table per group).
    """
    dev = as_device(device)
    budget = budget or (1 << 23 if dev.type == "cpu" else 1 << 26)
    u, ids = u.float().cpu(), None if ids is None else ids.to(dev)
    check_finite(u=u, log_counts=log_counts, **{f"gamma {g}": g for g in gammas})  # the table: chunk by chunk
    n, v = u.shape[0], table.shape[0]
    k = min(k, v)
    chunk = max(1, min(chunk, v, budget))
    batch = max(1, budget // chunk)
    images = batch * max(1, images // batch)  # groups of whole batches: the products of a pass without groups
    out = {g: (torch.empty(n, k), torch.empty(n, k, dtype=torch.long)) for g in gammas}
    with fp32_scores(dev):
        for i0 in range(0, n, images):
            ug = u[i0 : i0 + images].to(dev)  # (G, d)
            starts = range(0, ug.shape[0], batch)
            empty = (torch.full((0,), -torch.inf, device=dev), torch.zeros(0, dtype=torch.long, device=dev))
            best = {g: [tuple(e.expand(min(batch, ug.shape[0] - b0), 0) for e in empty) for b0 in starts]
                    for g in gammas}
            finite = FiniteCheck(dev)
            for start, (rows, lc) in row_chunks(dev, chunk, table, log_counts):
                finite(table=rows)
                for j, b0 in enumerate(starts):
                    raw = ug[b0 : b0 + batch] @ rows.t()  # (B, c)
                    finite(scores=raw)  # finite inputs can still overflow
                    for g in gammas:
                        s, i = topk_by_index(raw + g * lc, min(k, raw.shape[1]))  # (B, ≤k)
                        # raw, γ and lc finite: a sum that overflows is ±inf, and decides the top k only if in it
                        finite(scores=s)
                        i = i + start if ids is None else ids[i + start]
                        # merge with the best so far (chunks may be < k)
                        best[g][j] = first_k(torch.cat([best[g][j][0], s], 1), torch.cat([best[g][j][1], i], 1), k)
            finite.done()
            for g in gammas:
                out[g][0][i0 : i0 + ug.shape[0]] = torch.cat([s for s, _ in best[g]]).cpu()
                out[g][1][i0 : i0 + ug.shape[0]] = torch.cat([i for _, i in best[g]]).cpu()
    return out


def first_k(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of a few candidates per row, equal scores in tag-id order."""
    by_id = torch.argsort(ids, dim=1)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def topk_by_index(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk, except that equal scores are taken in index order (torch.topk picks any of them):
    rows whose k-th score ties with scores left out (the (k+1)-th equals it) are sorted stably instead."""
    if k < 1 or k >= s.shape[1]:  # all of them (or none): which ones is not in question
        ts, ti = torch.topk(s, k, dim=1)
        return first_k(ts, ti, k)
    ts, ti = torch.topk(s, k + 1, dim=1)
    cut = (ts[:, k] == ts[:, k - 1]).nonzero().flatten()
    ts, ti = ts[:, :k].contiguous(), ti[:, :k].contiguous()
    if len(cut):
        srt = torch.sort(s[cut], dim=1, descending=True, stable=True)
        ts[cut], ti[cut] = srt.values[:, :k], srt.indices[:, :k]
    return first_k(ts, ti, k)


def prior_topk(counts: Tensor, n: int, k: int) -> Tensor:
    """The frequency prior: every image gets the k most frequent tags. -> (n, k) ids."""
    return torch.topk(counts.float(), min(k, counts.numel())).indices.expand(n, -1)
