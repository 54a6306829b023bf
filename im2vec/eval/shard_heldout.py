"""Training's closing test figures over a table sharded by rows, without assembling it.

Rank 0 embeds the test images (as on one device) and sends the vectors and tags to every rank (N × d: small).
Then, per metric, each rank works on its own rows (ids r, r + W, …) and sends rank 0 only what is as large as
the images, never V rows:

- tagging (precision@k, recall@k, mAP, …: ``ranking.rank_tags`` on the shard): every true tag's score, computed
  by its owner (the same product as one pass's) and summed over the ranks (the others add 0); for each true tag,
  how many of the rank's tags score above it and at least as high, summed on rank 0; each image's top 10 with
  global ids, merged on rank 0 as in validation (im2vec/eval/shard_scoring.py).
- retrieval: the rows of the tags present in the test images (at most N × T), summed on rank 0 from their owners.
- the γ sweep: each rank's top 5 per γ, merged.
- the prior: the counts alone (every rank has them).

The sums are exact (one rank adds the value, the others 0; counts are integers), so rank 0's figures are one
process's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from im2vec.errors import UserError
from im2vec.eval.metrics import noise_share, precision_at_k
from im2vec.eval.ranking import KS, TagRanks, rank_prior, rank_tags, retrieval_metrics, tag_groups, tagging_metrics
from im2vec.eval.shard_scoring import merge_to_rank0, own_ids, shard_topk
from im2vec.tags import PAD


def share_images(data: dict | UserError | None, group) -> dict:
    """Rank 0's embedded test images (``heldout.embed_shards``, without the thumbnails) to every rank; rank 0's
    user error (no usable image) raised on every rank, so that none waits for the others."""
    box = [None]
    if isinstance(data, UserError):
        box = [str(data)]
    elif data is not None:
        box = [{k: v for k, v in data.items() if k != "thumbs"}]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if isinstance(box[0], str):
        raise data if isinstance(data, UserError) else UserError(box[0])
    return box[0]


def _to_rank0(x: Tensor, group) -> Tensor:
    """The sum over the ranks, on rank 0 (the others' ``x`` is left undefined)."""
    dist.reduce(x, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return x


def true_scores(u: Tensor, rows: Tensor, log_counts: Tensor, gamma: float, ids: Tensor, rank: int, world: int,
                group, batch: int = 256) -> Tensor:
    """Every true tag's score (N, T) on every rank, each computed by the rank that holds its row: the product of
    ``rank_tags`` (images ``batch`` at a time, (B, T, d) rows), summed over the ranks (the others add 0)."""
    safe = ids.clamp(min=0)
    mine = safe % world == rank
    out = torch.zeros(ids.shape)
    for b0 in range(0, len(u), batch):
        m, s = mine[b0 : b0 + batch], safe[b0 : b0 + batch]
        true_rows = torch.zeros(*s.shape, rows.shape[1])  # (B, T, d): this rank's rows, 0 for the others'
        true_rows[m] = rows[s[m] // world].float()
        st = torch.einsum("bd,btd->bt", u[b0 : b0 + batch].float(), true_rows) + gamma * log_counts.float()[s]
        out[b0 : b0 + batch] = torch.where(m, st, 0.0)
    dist.all_reduce(out, group=group)
    return out


def shard_rank_tags(u: Tensor, rows: Tensor, log_counts: Tensor, gamma: float, truths: list[Tensor], rank: int,
                    world: int, group, kmax: int = 10, device=None) -> TagRanks | None:
    """``rank_tags`` over all ranks' rows -> one process's TagRanks on rank 0, None elsewhere."""
    v, n = log_counts.shape[0], u.shape[0]
    ids, widths = torch.cat(truths, 1), [t.shape[1] for t in truths]
    st = true_scores(u, rows, log_counts, gamma, ids, rank, world, group)
    mine = own_ids(v, rank, world)
    r = rank_tags(u, rows, log_counts[mine], gamma, truths, kmax, device=device, row_ids=mine, true_scores=st)
    counts = _to_rank0(torch.cat(r.n_gt + r.n_ge, 1), group)  # (N, 2T)
    k = min(kmax, v)
    scores, top = torch.full((1, n, k), -torch.inf), torch.full((1, n, k), v, dtype=torch.long)
    scores[0, :, : r.top_ids.shape[1]], top[0, :, : r.top_ids.shape[1]] = r.top_scores, r.top_ids
    merged = merge_to_rank0(scores, top, group, rank, world)
    if merged is None:
        return None
    st = torch.where(ids != PAD, st, 0.0)
    split = lambda x: list(torch.split(x, widths, dim=1))  # noqa: E731
    t = sum(widths)
    return TagRanks(merged[1][0], list(truths), split(counts[:, :t]), split(counts[:, t:]), split(st), merged[0][0])


def shard_retrieval(u: Tensor | None, truth: Tensor, present: Tensor, present_rows: Tensor, prefix: str,
                    device=None) -> dict:
    """``retrieval_metrics`` on rank 0 with the rows of the tags present (``present`` ascending) instead of the
    table: the truth renumbered 0.. in the same order, so the queries and their order are those of before.
    ``u`` None: the prior (every image ties)."""
    local = torch.where(truth != PAD, torch.searchsorted(present, truth.clamp(min=0)), PAD)
    if u is None:
        u, present_rows = torch.zeros(truth.shape[0], 1), torch.zeros(len(present), 1)
    return retrieval_metrics(u, present_rows, local, None, prefix=prefix, device=device)[0]


def shard_score_model(u: Tensor, rows: Tensor, log_counts: Tensor, gamma: float, gammas: list[float], obs: Tensor,
                      clean: Tensor | None, noise_ids: Tensor | None, rank: int, world: int, group,
                      device=None) -> dict | None:
    """heldout.score_model for the model and the prior, and heldout.gamma_sweep, over all ranks' rows -> the
    flat figures on rank 0 (None elsewhere)."""
    truths = [obs] + ([clean] if clean is not None else [])
    r = shard_rank_tags(u, rows, log_counts, gamma, truths, rank, world, group, max(KS), device)
    every = torch.cat([t[t != PAD] for t in truths])
    present = torch.unique(every)  # (P,) ≤ N × T
    mine = present % world == rank
    present_rows = torch.zeros(len(present), rows.shape[1])
    present_rows[mine] = rows[present[mine] // world].float()
    present_rows = _to_rank0(present_rows, group)
    sweep = shard_topk(u, rows, log_counts, gammas, 5, rank, world, device)
    tops = merge_to_rank0(*sweep, group, rank, world)
    if rank != 0:
        return None
    v, rare = log_counts.shape[0], tag_groups(log_counts)
    m = {}
    for prefix, ranks, uu in (("", r, u), ("prior/", rank_prior(log_counts, truths, kmax=max(KS)), None)):
        m.update(tagging_metrics(ranks, 0, KS, noise_ids, v, prefix=f"{prefix}tagging/", groups=rare))
        if clean is not None:
            m.update(tagging_metrics(ranks, 1, KS, None, v, prefix=f"{prefix}tagging/clean/", groups=rare))
        for name, truth in (("", obs), ("clean/", clean)):
            if truth is not None:
                m.update(shard_retrieval(uu, truth, present, present_rows, f"{prefix}retrieval/{name}", device))
    k5 = min(5, v)
    for j, g in enumerate(gammas):
        top = tops[1][j, :, :k5]
        m[f"gamma_sweep/precision@5/{g:g}"] = precision_at_k(top, obs, 5)
        if clean is not None:
            m[f"gamma_sweep/clean_precision@5/{g:g}"] = precision_at_k(top, clean, 5)
        if noise_ids is not None:
            m[f"gamma_sweep/noise_share@5/{g:g}"] = noise_share(top, noise_ids, 5)
    return m
