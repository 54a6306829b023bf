"""Validation over a sharded table, run in spawned gloo processes by tests/test_dist_validation.py (spawn children
import them by name): every rank scores its own rows, rank 0 merges the top-k lists."""

from __future__ import annotations

from unittest import mock

import torch
import torch.distributed as dist

V, D, N = 401, 8, 45  # V prime: the shards differ in size whatever W
GAMMAS = [0.0, 0.5, 1.0, 2.0]
PROJECTOR, MAX_IMAGES = 10, 30


def problem(ties: bool, tag_vectors: bool):
    """counts, table (V, D), tag map (or None), u (N, D), observed and clean tags, keys, images. ``ties``: small
    integers and three counts, so that scores are exact in fp32 and many tags tie, within a rank's rows, across
    ranks and at the k-th place."""
    from im2vec.wide.tag_vectors import TagVectorMap

    g = torch.Generator().manual_seed(7)
    if ties:
        counts = torch.tensor([1, 2, 4])[torch.randint(0, 3, (V,), generator=g)]
        table = torch.randint(-1, 2, (V, D), generator=g).float()
        u = torch.randint(-1, 2, (N, D), generator=g).float()
    else:
        counts = torch.randint(1, 500, (V,), generator=g)
        table = torch.randn(V, D, generator=g)
        u = torch.randn(N, D, generator=g)
    tag_map = None
    if tag_vectors:  # every third tag has a word vector: v = r + A·w
        found = torch.arange(0, V, 3)
        tag_map = TagVectorMap(V, D, found, torch.randn(len(found), 5, generator=g))
        tag_map.proj.weight.data.copy_(torch.randn(D, 5, generator=g))
    obs = torch.randint(0, V, (N, 3), generator=g)
    clean = torch.randint(0, V, (N, 2), generator=g)
    clean[::5] = -1  # some images without clean tags
    keys = [f"img{i:04d}" for i in range(N)]
    images = torch.rand(N, 3, 8, 8, generator=g)
    return counts, table, tag_map, u, obs, clean, keys, images


def report(counts):
    from im2vec.eval.validation import ValidationReport

    return ValidationReport([f"t{i}" for i in range(V)], counts, torch.arange(0, V, 7), 0.5, GAMMAS, PROJECTOR, 4)


def batches(rank: int, world: int, empty_rank: int = -1):
    """Rank r's batches of 8 images, dealt round-robin as shards are (none on ``empty_rank``)."""
    if rank == empty_rank:
        return []
    return [slice(lo, lo + 8) for lo in range(rank * 8, N, world * 8)]


def sharded_validation(rank: int, world: int, port: int, out: str, ties: bool, tag_vectors: bool,
                       empty_rank: int) -> None:
    """A sharded TagHead and a report on every rank; ValidationReport.compute_across as training calls it, with
    ShardedTagTable.assemble refused and nothing of more than the projector's rows assembled."""
    from dist_workers import init

    import im2vec.wide.tag_head as tag_head
    from im2vec.wide.head import SamplerConfig
    from im2vec.wide.sharded_table import ShardedTagTable, shard_rows

    init(rank, world, port)
    counts, table, tag_map, u, obs, clean, keys, images = problem(ties, tag_vectors)
    head = tag_head.TagHead(counts, D, SamplerConfig(), 0.01, 0, shard=(rank, world), tag_map=tag_map)
    head.table.weight.data.copy_(table[rank::world])
    head.shard(rank, world, 60.0)

    def refuse(*a, **kw):
        raise AssertionError("validation assembled the table")

    ShardedTagTable.assemble = refuse
    real = tag_head.assemble_rows

    def bounded(local, total, *a, **kw):
        assert total <= PROJECTOR, f"{total} rows assembled on rank 0"
        return real(local, total, *a, **kw)

    tag_head.assemble_rows = bounded
    r = report(counts)
    for sl in batches(rank, world, empty_rank):
        r.add(u[sl], obs[sl], clean[sl], keys[sl], images[sl])
    rows, projector = head.own_vectors(PROJECTOR)
    assert rows.shape == (shard_rows(V, rank, world), D)
    metrics, size = r.compute_across(rows, head.table.log_counts, 0, MAX_IMAGES, "cpu", head.group, rank, world)
    result = {"metrics": metrics, "gamma": r.gamma, "size": size}
    if rank == 0:
        result.update(grid=r.image_keys, top=r._top, projector=projector)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(result, gathered, dst=0)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def embedded(ties: bool) -> dict:
    """What heldout.embed_shards returns for the test images of ``problem`` (some with no clean tag)."""
    counts, table, tag_map, u, obs, clean, keys, images = problem(ties, False)
    obs = obs.clone()
    obs[::6, 1:] = -1  # images with one observed tag
    return {"u": [u], "obs": obs, "clean": clean, "keys": keys, "thumbs": images, "skipped": 3}


def closing_figures(table, counts, ties: bool, group=None, rank: int = 0, world: int = 1) -> dict:
    """heldout.heldout_figures (training's closing test figures) on ``embedded`` (embed_shards replaced: on rank 0
    only), with ``table`` this rank's rows."""
    import im2vec.eval.heldout as heldout

    def embed(*a, **kw):
        assert rank == 0, "only rank 0 embeds the test images"
        return embedded(ties)

    log_counts = counts.double().clamp_min(1).log().float()
    with mock.patch.object(heldout, "embed_shards", embed):  # put back afterwards: the test's process calls it too
        return heldout.heldout_figures(torch.nn.Linear(2, 2), table, log_counts, [f"t{i}" for i in range(V)], 0.5,
                                       [], 32, torch.arange(0, V, 7), GAMMAS, group=group, rank=rank, world=world)


def sharded_closing_figures(rank: int, world: int, port: int, out: str, ties: bool) -> None:
    """heldout_figures on every rank with its own rows; ShardedTagTable.assemble and assemble_rows refused."""
    from dist_workers import init

    import im2vec.wide.sharded_table as sharded

    init(rank, world, port)
    group = dist.new_group(backend="gloo")

    def refuse(*a, **kw):
        raise AssertionError("the closing figures assembled the table")

    sharded.ShardedTagTable.assemble = sharded.assemble_rows = refuse
    counts, table = problem(ties, False)[:2]
    m = closing_figures(table[rank::world].clone(), counts, ties, group, rank, world)
    got = [None] * world if rank == 0 else None
    dist.gather_object(m, got, dst=0)
    if rank == 0:
        torch.save(got, out)
    dist.destroy_process_group()
