"""Tagging and retrieval metrics over the whole vocabulary: exact, in chunks, ties handled.

Tagging ranks all V tags of an image by s(t|x) = v_t·u + γ·log count(t). One pass over the
table, in chunks of tags (never an N×V matrix), keeps each image's top k and, for every true tag t,
how many tags score above it (n_gt) and at least as high (n_ge, t itself included). From these:

- precision@k, recall@k, F1@k: expected values when ties are broken at random (a true tag whose
  tie group spans ranks a..b is in the top k with probability (k − a + 1)/(b − a + 1), clipped
  to [0, 1]); averaged over the images with at least one true tag.
- mAP: per image, average precision over the full ranking with tied scores ranked pessimistically,
  (1/R) Σ_t |{true t': s_t' ≥ s_t}| / |{t': s_t' ≥ s_t}| (scikit-learn's average_precision_score
  and label_ranking_average_precision_score per image); mean over images with a true tag. This is
  the image-centric "MiAP" of Li et al. (2016, "Socializing the semantic gap"), whose test images
  all have a true tag.
- map_all_images: the same per-image AP averaged over all images, an image without any true tag
  counting 0 (= mAP × the share of images with a true tag).
- noise share@k, per-tag (macro) precision@k and recall@k: from the top-k lists (equal scores
  taken in tag-index order, whatever the chunking).

Retrieval ranks the held-out images for a tag t by v_t·u (γ·log count(t) is the same for every
image: it does not change the order): AP (pessimistic ties) and expected precision@10 per query.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from im2vec.eval.metrics import hits
from im2vec.eval.scoring import (
    IMAGES,
    ROWS,
    FiniteCheck,
    as_device,
    check_finite,
    first_k as _first_k,
    fp32_scores,
    row_chunks,
    topk_by_index as _topk_by_index,
)
from im2vec.tags import PAD

KS = (1, 3, 5, 10)


@dataclass
class TagRanks:
    top_ids: Tensor  # (N, kmax) best tags first
    truths: list[Tensor]  # each (N, T) true tag ids, PAD-padded
    n_gt: list[Tensor]  # each (N, T): tags scoring strictly above the true tag
    n_ge: list[Tensor]  # each (N, T): tags scoring at least as high, the tag itself included
    true_scores: list[Tensor]  # each (N, T)
    top_scores: Tensor | None = None  # (N, kmax) the scores of top_ids


@torch.no_grad()
def rank_tags(u: Tensor, table: Tensor, log_counts: Tensor, gamma: float, truths: list[Tensor],
              kmax: int = 10, batch: int = 256, budget: int | None = None, device: str | torch.device | None = None,
              rows: int | None = None, images: int = IMAGES, row_ids: Tensor | None = None,
              true_scores: Tensor | None = None) -> TagRanks:
    """One chunked pass over the V tags for every image of ``u`` (N, d); see the module docstring.

    A rank's shard of the tags (im2vec/eval/shard_heldout.py): ``row_ids`` (n,) ascending, the global ids of
    ``table``'s rows (``log_counts`` theirs too), and ``true_scores`` (N, T) every true tag's score, computed
    where its row is; the counts and the top list (global ids) are then over these rows only.

    ``budget`` bounds the scores held at once (a batch of at most ``batch`` images × a chunk of tags,
    budget // images of the batch; default 2^22 on the CPU, 2^24 on another device). The pass runs on
    ``device`` (default: the CPU): the table goes there ``rows`` rows at a time (default: 65,536
    rounded to whole chunks of a full batch; on the CPU the whole table, a view, so that the products
    are those of a pass without copies, to the last bit), once for up to ``images`` images; the
    results come back to the CPU. A chunk of tags never spans two copies (a last, smaller batch's
    wider chunks are cut at their ends)."""
    dev = as_device(device)
    budget = budget or (1 << 22 if dev.type == "cpu" else 1 << 24)
    u, log_counts = u.float().cpu(), log_counts.float().cpu()
    check_finite(u=u, log_counts=log_counts, gamma=gamma)  # the table: chunk by chunk, on the device
    n, v = u.shape[0], table.shape[0]
    kmax = min(kmax, v)
    widths = [t.shape[1] for t in truths]
    ids = torch.cat([t.cpu() for t in truths], 1)  # (N, T)
    loc = ids.clamp(min=0) if row_ids is None else _row_of(ids.clamp(min=0), row_ids)  # (N, T): row in table or -1
    cols = max(1, budget // max(1, min(batch, n)))  # tags per product of a full batch
    if rows is None and dev.type == "cpu":
        rows = max(1, v)  # the whole table, a view: every batch's chunks of tags are those of before
    else:
        rows = cols * max(1, (rows or ROWS) // cols)  # table rows per copy: whole chunks of a full batch
    images = batch * max(1, images // batch)  # groups of whole batches
    out_top, out_top_s = torch.empty(n, kmax, dtype=torch.long), torch.empty(n, kmax)
    row_ids = None if row_ids is None else row_ids.to(dev)
    out = [torch.zeros(n, sum(widths), dtype=torch.long) for _ in range(2)] + [torch.zeros(n, sum(widths))]
    with fp32_scores(dev):
        for i0 in range(0, n, images):  # a group of images on the device: one pass over the table
            ug = u[i0 : i0 + images].to(dev)
            state = []  # per batch of images: what the pass over the tags needs and accumulates
            for b0 in range(0, ug.shape[0], batch):
                ub = ug[b0 : b0 + batch]  # (B, d)
                idb = ids[i0 + b0 : i0 + b0 + ub.shape[0]]  # (B, T)
                safe = idb.clamp(min=0)
                if true_scores is None:
                    true_rows = table[safe].float().to(dev)  # (B, T, d): the true tags' rows, gathered on the host
                    st = torch.einsum("bd,btd->bt", ub, true_rows) + gamma * log_counts[safe].to(dev)  # (B, T)
                else:
                    st = true_scores[i0 + b0 : i0 + b0 + ub.shape[0]].float().to(dev)
                # thresholds: each true score, and the float just below it (s > that ⟺ s ≥ the true score)
                below = torch.nextafter(st, torch.full_like(st, -torch.inf))
                thr, order = torch.sort(torch.cat([st, below], 1), dim=1)
                state.append({"ub": ub, "cols": max(1, budget // ub.shape[0]),  # a last, smaller batch: wider
                              "valid": (idb != PAD).to(dev), "safe": loc[i0 + b0 : i0 + b0 + ub.shape[0]].to(dev),
                              "st": st, "thr": thr,
                              "order": order, "gt": torch.zeros(idb.shape, dtype=torch.long, device=dev),
                              "ge": torch.zeros(idb.shape, dtype=torch.long, device=dev),
                              "best_s": torch.full((ub.shape[0], 0), -torch.inf, device=dev),
                              "best_i": torch.zeros(ub.shape[0], 0, dtype=torch.long, device=dev)})
            finite = FiniteCheck(dev)
            for r0, (trows, tlc) in row_chunks(dev, rows, table, log_counts):
                trows = trows.float()
                finite(table=trows)
                r1 = r0 + trows.shape[0]
                for b in state:
                    c0 = r0
                    while c0 < r1:  # chunks of tags at multiples of the batch's width, cut at the copy's end
                        c1 = min((c0 // b["cols"] + 1) * b["cols"], r1)
                        s = b["ub"] @ trows[c0 - r0 : c1 - r0].t() + gamma * tlc[c0 - r0 : c1 - r0]  # (B, C)
                        finite(scores=s)  # finite inputs can still overflow
                        ts, ti = _topk_by_index(s, min(kmax, s.shape[1]))
                        ti = ti + c0 if row_ids is None else row_ids[ti + c0]
                        b["best_s"], b["best_i"] = _first_k(torch.cat([b["best_s"], ts], 1),
                                                            torch.cat([b["best_i"], ti], 1), kmax)
                        above = _count_above(s, b["thr"], b["order"])  # (B, 2T): scores strictly above each threshold
                        t = b["st"].shape[1]
                        b["gt"] += above[:, :t]
                        b["ge"] += above[:, t:]
                        # a tag against itself is a tie, whatever rounding the two products took ("safe": its row)
                        valid, safe, st = b["valid"], b["safe"], b["st"]
                        own = valid & (safe >= c0) & (safe < c0 + s.shape[1])
                        s_own = s.gather(1, (safe - c0).clamp(0, s.shape[1] - 1))
                        b["gt"] -= (own & (s_own > st)).long()
                        b["ge"] += (own & (s_own < st)).long()
                        c0 = c1
            finite.done()
            for b0, b in zip(range(i0, n, batch), state):
                sl = slice(b0, b0 + b["ub"].shape[0])
                out_top[sl], out_top_s[sl] = b["best_i"].cpu(), b["best_s"].cpu()
                for o, x in zip(out, (b["gt"], b["ge"], b["st"])):
                    o[sl] = torch.where(b["valid"], x, torch.zeros_like(x)).cpu()
    split = lambda x: list(torch.split(x, widths, dim=1))  # noqa: E731
    return TagRanks(out_top, list(truths), split(out[0]), split(out[1]), split(out[2]), out_top_s)


def _row_of(ids: Tensor, row_ids: Tensor) -> Tensor:
    """The row of each id in a table of the tags ``row_ids`` (ascending), -1 where it has none."""
    if not len(row_ids):
        return torch.full_like(ids, -1)
    pos = torch.searchsorted(row_ids, ids).clamp(max=len(row_ids) - 1)
    return torch.where(row_ids[pos] == ids, pos, -1)


def rank_prior(log_counts: Tensor, truths: list[Tensor], kmax: int = 10) -> TagRanks:
    """rank_tags for the frequency prior (s = log count(t) for every image), without a pass per image:
    one sorted vector serves all of them."""
    n, v = truths[0].shape[0], log_counts.shape[0]
    lc = log_counts.float().cpu()
    check_finite(log_counts=lc)
    order = torch.sort(lc, descending=True, stable=True).indices  # equal counts in tag-index order
    asc = torch.sort(lc).values
    n_gt, n_ge, st = [], [], []
    for t in truths:
        valid = t != PAD
        sc = lc[t.clamp(min=0)]
        gt = v - torch.searchsorted(asc, sc, right=True)
        ge = v - torch.searchsorted(asc, sc, right=False)
        n_gt.append(torch.where(valid, gt, 0))
        n_ge.append(torch.where(valid, ge, 0))
        st.append(torch.where(valid, sc, 0.0))
    return TagRanks(order[: min(kmax, v)].expand(n, -1).clone(), list(truths), n_gt, n_ge, st)


def _count_above(s: Tensor, thr: Tensor, order: Tensor) -> Tensor:
    """For each row, how many of s (B, C) lie strictly above each threshold; thr (B, M) sorted with
    ``order`` its permutation of the caller's columns. One binary search per score and one histogram
    per row: much cheaper than comparing every score with every threshold."""
    b, m = thr.shape
    bucket = torch.searchsorted(thr, s, right=False)  # (B, C): thresholds strictly below each score
    rows = torch.arange(b, device=s.device)[:, None] * (m + 1)
    hist = torch.bincount((bucket + rows).flatten(), minlength=b * (m + 1))
    above_sorted = hist.view(b, m + 1).flip(1).cumsum(1).flip(1)[:, 1:]  # scores in buckets > j: above thr j
    return torch.empty_like(above_sorted).scatter_(1, order, above_sorted)


def tag_groups(log_counts: Tensor) -> dict[str, Tensor]:
    """The groups of tags the per-tag metrics are also given over: ``rare``, the rarer half of the vocabulary (training
    count at most the median), and ``le10``, the tags seen at most 10 times in training (YFCC's long tail)."""
    return {"rare": log_counts <= log_counts.median(), "le10": log_counts <= math.log(10) + 1e-6}


def tagging_metrics(r: TagRanks, which: int = 0, ks: tuple[int, ...] = KS, noise_ids: Tensor | None = None,
                    num_tags: int | None = None, prefix: str = "", groups: dict[str, Tensor] | None = None
                    ) -> dict[str, float]:
    """Metrics against truth ``which`` of ``r`` (see the module docstring), as flat keys. ``groups``
    ({name: (V,) bool}) adds the per-tag metrics over each group of tags as ``tag_precision@k/name``."""
    truth, n_gt, n_ge, st = r.truths[which], r.n_gt[which], r.n_ge[which], r.true_scores[which]
    valid = truth != PAD
    n_true = valid.sum(1)  # (N,)
    has = n_true > 0
    m: dict[str, float] = {f"{prefix}images": float(has.sum())}
    first = (n_gt + 1).float()  # the tie group of a true tag spans ranks first..last
    last = n_ge.float().clamp(min=1)
    for k in ks:
        p_in = ((k - first + 1) / (last - first + 1)).clamp(0, 1) * valid  # P(true tag in the top k)
        expected = p_in.sum(1)  # expected true tags in the top k
        prec, rec = expected / k, expected / n_true.clamp(min=1)
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(prec))
        for name, x in (("precision", prec), ("recall", rec), ("f1", f1)):
            m[f"{prefix}{name}@{k}"] = _mean(x[has])
    # average precision with pessimistic ties: true tags at least as high / all tags at least as high
    rel_ge = ((st[:, None, :] >= st[:, :, None]) & valid[:, None, :]).sum(-1).float()  # (N, T)
    ap = (rel_ge / last * valid).sum(1) / n_true.clamp(min=1)
    m[f"{prefix}map"] = _mean(ap[has])
    m[f"{prefix}map_all_images"] = float(ap[has].sum() / max(1, truth.shape[0]))
    most_noise = noise_ids.max() if noise_ids is not None and len(noise_ids) else 0
    v = num_tags if num_tags is not None else int(max(r.top_ids.max(), truth.max(), most_noise)) + 1
    for k in ks:
        top = r.top_ids[:, :k]
        hit = hits(top, truth) & has[:, None]  # (N, k)
        pred = torch.bincount(top[has].flatten(), minlength=v).float()
        correct = torch.bincount(top[hit], minlength=v).float()
        relevant = torch.bincount(truth[valid], minlength=v).float()
        seen = relevant > 0
        tag_p = torch.where(pred > 0, correct / pred.clamp(min=1), 0.0)  # (V,) a tag never predicted: 0
        tag_r = correct / relevant.clamp(min=1)
        m[f"{prefix}tag_precision@{k}"] = _mean(tag_p[seen])
        m[f"{prefix}tag_recall@{k}"] = _mean(tag_r[seen])
        for name, mask in (groups or {}).items():
            m[f"{prefix}tag_precision@{k}/{name}"] = _mean(tag_p[seen & mask[:v]])
            m[f"{prefix}tag_recall@{k}/{name}"] = _mean(tag_r[seen & mask[:v]])
        if noise_ids is not None:
            noise = torch.zeros(v, dtype=torch.bool)
            noise[noise_ids] = True
            m[f"{prefix}noise_share@{k}"] = _mean(noise[top].float().mean(1))
    return m


@torch.no_grad()
def retrieval_metrics(u: Tensor, table: Tensor, truth: Tensor, queries: Tensor | None = None, k: int = 10,
                      chunk: int = 256, prefix: str = "", budget: int = 1 << 24,
                      device: str | torch.device | None = None) -> tuple[dict[str, float], Tensor, Tensor]:
    """For each query tag (default: every tag true for at least one image) rank the N images by
    v_t·u: -> ({map, precision@k, queries, queries_without_images}, per-query AP, per-query
    precision@k). A given query tag that no image has is left out (AP is undefined) and counted.
    At most ``chunk`` queries at once, fewer where N × T × queries would pass ``budget``. The
    ranking runs on ``device`` (default: the CPU) with the image vectors and the query tags' rows
    only (never the table); the results come back to the CPU."""
    dev = as_device(device)
    u, table = u.float().cpu(), table.float().cpu()
    check_finite(u=u, table=table)
    chunk = max(1, min(chunk, budget // max(1, truth.numel())))
    truth = truth.cpu()
    valid = truth != PAD
    present = torch.unique(truth[valid])
    asked = len(queries) if queries is not None else len(present)
    queries = present if queries is None else queries.cpu()[torch.isin(queries.cpu(), present)]
    ud, truth_d, valid_d = u.to(dev), truth.to(dev), valid.to(dev)
    aps, pks = [], []
    finite = FiniteCheck(dev)
    with fp32_scores(dev):
        for q0 in range(0, len(queries), chunk):
            q = queries[q0 : q0 + chunk]  # (Q,)
            qd = q.to(dev)
            rel = ((truth_d[:, :, None] == qd[None, None, :]) & valid_d[:, :, None]).any(1).t()  # (Q, N)
            s = (ud @ table[q].to(dev).t()).t()  # (Q, N)
            finite(scores=s)
            order = torch.argsort(s, dim=1, descending=True, stable=True)
            neg = -s.gather(1, order)  # ascending
            rel_sorted = rel.gather(1, order)
            cum = torch.cumsum(rel_sorted.long(), 1)
            ge = torch.searchsorted(neg, neg, right=True)  # (Q, N): images scoring ≥ this one
            rel_ge = cum.gather(1, ge - 1)
            n_rel = rel.sum(1)
            aps.append(((rel_ge / ge) * rel_sorted).sum(1) / n_rel.clamp(min=1))
            pks.append(_expected_hits(neg, cum, k) / k)
    finite.done()
    ap, pk = (torch.cat(aps).cpu(), torch.cat(pks).cpu()) if aps else (torch.zeros(0), torch.zeros(0))
    return ({f"{prefix}map": _mean(ap), f"{prefix}precision@{k}": _mean(pk), f"{prefix}queries": float(len(ap)),
             f"{prefix}queries_without_images": float(asked - len(ap))}, ap, pk)


def _expected_hits(neg: Tensor, cum: Tensor, k: int) -> Tensor:
    """Relevant items among the first k of each row (sorted by neg ascending), ties at the k-th place
    shared out at random: the expected count."""
    n = neg.shape[1]
    if n <= k:
        return cum[:, -1].float()
    kth = neg[:, k - 1 : k].contiguous()
    above = torch.searchsorted(neg, kth, right=False).squeeze(1)  # items strictly better than the k-th
    upto = torch.searchsorted(neg, kth, right=True).squeeze(1)  # ... and the k-th's whole tie group
    zero = torch.zeros(neg.shape[0], 1, dtype=cum.dtype, device=cum.device)
    cum0 = torch.cat([zero, cum], 1)  # cum0[:, j]: relevant among the first j
    rel_above = cum0.gather(1, above[:, None]).squeeze(1).float()
    rel_group = (cum0.gather(1, upto[:, None]) - cum0.gather(1, above[:, None])).squeeze(1).float()
    return rel_above + (k - above).float() * rel_group / (upto - above).float()


def _mean(x: Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")
