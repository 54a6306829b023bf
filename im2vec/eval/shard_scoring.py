"""Top-k tag lists over a table sharded by rows, without assembling it: every rank scores its own rows.

With W ranks, rank r holds the tags with id % W == r (im2vec/wide/sharded_table.py). Given every rank's
image vectors (N × d: small, all-gathered), each rank scores them against its own rows only, with the
tagging score s = v·u + γ·log count for every γ of the sweep (one pass, ``topk_tags`` on the shard with
its global ids), and keeps each image's top k. The lists then merge up a binary tree to rank 0 (at step
s = 1, 2, 4, …, rank r + s sends its lists to rank r, which keeps the k best of both): equal scores go in
tag-id order at every merge, as in one pass over the whole table, so rank 0 ends with one process's lists
(the score of a tag is the same float on a shard as in the whole table: one row's product with u).

What a rank holds: its rows (V/W × d, already there), the N image vectors, and while merging two lists of
(G, N, k) scores and ids (G the γs of the sweep). Nothing of size V crosses the network or lands on one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from im2vec.eval.scoring import first_k, topk_tags


def own_ids(num_tags: int, rank: int, world: int) -> Tensor:
    """The global ids of rank ``rank``'s rows, in its row order: rank, rank + world, …"""
    return torch.arange(rank, num_tags, world)


@torch.no_grad()
def shard_topk(u: Tensor, rows: Tensor, log_counts: Tensor, gammas: list[float], k: int, rank: int, world: int,
               device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
    """u (N, d), this rank's rows (n_r, d), the whole log_counts (V,) -> this rank's k best tags per γ and
    image: scores (G, N, k) and global ids (G, N, k); where the rank has fewer than k rows the lists are
    padded with -inf and id V (never chosen over a real tag: scores are finite)."""
    v = log_counts.shape[0]
    ids = own_ids(v, rank, world)
    top = topk_tags(u, rows, log_counts[ids], gammas, k, device=device, ids=ids)
    scores = torch.full((len(gammas), u.shape[0], k), -torch.inf)
    tags = torch.full((len(gammas), u.shape[0], k), v, dtype=torch.long)
    for j, g in enumerate(gammas):
        s, i = top[g]
        scores[j, :, : s.shape[1]], tags[j, :, : i.shape[1]] = s, i
    return scores, tags


def merge_to_rank0(scores: Tensor, ids: Tensor, group, rank: int, world: int) -> tuple[Tensor, Tensor] | None:
    """Every rank's (G, N, k) lists -> the k best of all of them on rank 0 (equal scores: smaller id first),
    None on the other ranks. A binary tree: log2(W) steps, each rank sends once and receives at most log2(W)
    times. Every rank must call it with lists of the same shape."""
    def peer(r: int) -> int:
        return dist.get_global_rank(group, r) if group is not None else r

    k, shape = scores.shape[-1], scores.shape
    step = 1
    while step < world:
        if rank % (2 * step) == step:  # this rank's lists go down the tree, and it is done
            dist.send(scores.contiguous(), dst=peer(rank - step), group=group)
            dist.send(ids.contiguous(), dst=peer(rank - step), group=group)
            return None
        if rank + step < world:
            s, i = torch.empty_like(scores), torch.empty_like(ids)
            dist.recv(s, src=peer(rank + step), group=group)
            dist.recv(i, src=peer(rank + step), group=group)
            both_s = torch.cat([scores, s], -1).view(-1, 2 * k)  # (G·N, 2k)
            both_i = torch.cat([ids, i], -1).view(-1, 2 * k)
            scores, ids = (x.view(shape) for x in first_k(both_s, both_i, k))
        step *= 2
    return scores, ids
