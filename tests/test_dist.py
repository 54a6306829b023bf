"""The sharded tag table in real multi-process gloo runs: a W-rank step equals one step of one process on
the concatenated batch (W = 1, 2, 3); validation split over ranks gives one process's figures."""

from __future__ import annotations

import socket

import dist_workers as w
import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="spawn")


@pytest.mark.parametrize("world,hot", [pytest.param(1, False, marks=pytest.mark.slow), (2, False), (2, True),
                                       pytest.param(3, False, marks=pytest.mark.slow),
                                       pytest.param(3, True, marks=pytest.mark.slow)])
def test_w_rank_steps_equal_one_big_batch(world, hot, tmp_path):
    """hot: rows replicated on every rank from the second step (their state synced from the sharded steps), another
    set from the third (the first flushed back into the shards): the same steps as one process."""
    out = tmp_path / "sharded.pt"
    spawn(w.head_steps, world, str(out), hot)
    got, want = torch.load(out), w.reference(world)
    for name in w.OPTIMIZERS:
        assert set(got[name]) == set(want[name]), name
        for key in want[name]:
            assert got[name][key].shape == want[name][key].shape, (name, key)
            torch.testing.assert_close(got[name][key].double(), want[name][key].double(), rtol=0, atol=1e-6,
                                       msg=f"{name} {key} differs at W={world}")
        moved = (want[name]["weight"] - w.problem(world)[1]).abs().sum(1) > 0
        assert 0 < int(moved.sum()) < w.V, "the steps touch some rows, not all"


@pytest.mark.parametrize("hot_rows,overlap", [(0, False), (60, False), (60, True)])
def test_an_empty_rank_neither_hangs_nor_crashes_and_adds_nothing(tmp_path, hot_rows, overlap):
    """Rank 1 of 2 has no image (a batch whose every JPEG failed): both ranks step (a hang ends at the groups'
    30-60 s timeouts, a crash fails the spawn). The step is then one process's step on rank 0's batch alone: its
    loss, the table and Adam's moments; u's gradient is that one's × W, which DDP's average divides back. With
    uneven batches (5 and 2 images) the table's step is one process's on the 7 concatenated. Also with hot rows
    replicated on both ranks, and with the step overlapped (the exchange on the worker thread): one process's."""
    out = tmp_path / "empty.pt"
    spawn(w.empty_rank_steps, 2, str(out), hot_rows, overlap)
    got, want = torch.load(out), w.empty_rank_reference(2)
    assert got["hot_rows"] == hot_rows  # (TagHead: the 60 rows most drawn, replicated from the first step)
    assert torch.isfinite(got["loss"]).all() and torch.equal(got["loss"], want["loss"])
    torch.testing.assert_close(got["u_grad"] / 2, want["u_grad"], rtol=0, atol=1e-7)
    for key in ("weight", "exp_avg", "exp_avg_sq", "uneven"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("head", ["sampled", "full"])
def test_an_empty_batch_on_one_device_has_loss_zero_and_leaves_the_table(head):
    from im2vec.wide.head import SamplerConfig
    from im2vec.wide.tag_head import TagHead

    h = TagHead(torch.arange(20, 0, -1), 4, SamplerConfig(head=head, num_negatives=3), 0.01, seed=0)
    before = h.table.weight.detach().clone()
    opt = h.make_optimizer("sparse_adam", 0.1)
    a = torch.randn(4, 4, requires_grad=True)  # a trunk's last layer
    u = torch.zeros(0, 4) @ a  # (0, d)
    loss, s_pos, s_neg = h.loss(u, h.prepare(torch.zeros(0, 2, dtype=torch.long), torch.device("cpu")))
    assert (loss.item(), s_pos.item(), s_neg.item()) == (0.0, 0.0, 0.0)  # not a mean over 0 images (NaN)
    h.backward(loss, lambda x: x.backward())
    h.step(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    assert torch.equal(a.grad, torch.zeros(4, 4)) and torch.equal(h.table.weight.detach(), before)


def test_a_sharded_table_refuses_lookup_and_forward_by_global_id():
    from im2vec.wide.sharded_table import ShardedTagTable

    table = ShardedTagTable(torch.ones(10), 4, 0.01, rank=1, world=2)
    for read in (lambda: table.lookup(torch.tensor([7]), "cpu"), lambda: table(torch.tensor([7]))):
        with pytest.raises(RuntimeError, match="rank 1 of 2 holds only the rows with id % W == rank.*gather"):
            read()


def test_sharded_reads_and_writes_only_the_shard():
    from im2vec.wide.sharded_table import shard_of, shard_rows

    full = torch.arange(11 * 3, dtype=torch.float32).view(11, 3)
    parts = [shard_of(full, r, 4) for r in range(4)]
    assert [p.shape[0] for p in parts] == [shard_rows(11, r, 4) for r in range(4)] == [3, 3, 3, 2]
    back = torch.empty_like(full)
    for r, p in enumerate(parts):
        back[r::4] = p
    assert torch.equal(back, full)


@pytest.mark.parametrize("empty_rank", [pytest.param(-1, marks=pytest.mark.slow), 1])  # 1: also an empty rank
def test_validation_over_ranks_gives_one_process_figures(tmp_path, empty_rank):
    from im2vec.eval.validation import ValidationReport

    out = tmp_path / "val.pt"
    spawn(w.validation_gather, 2, str(out), empty_rank)
    got = torch.load(out)
    counts, table, u, obs, clean, keys, images = w.validation_problem()
    if empty_rank == 1:  # rank 1 had no validation shard: the figures are those of rank 0's images alone
        sel = [i for i in range(len(u)) if (i // 8) % 2 == 0]
        u, obs, clean, images = u[sel], obs[sel], clean[sel], images[sel]
        keys = [keys[i] for i in sel]
    report = ValidationReport([f"t{i}" for i in range(w.V)], counts, torch.arange(0, w.V, 7), 0.2,
                              [0.0, 0.2, 0.5, 1.0], 10, 4)
    for lo in range(0, len(u), 8):
        report.add(u[lo:lo + 8], obs[lo:lo + 8], clean[lo:lo + 8], keys[lo:lo + 8], images[lo:lo + 8])
    want = report.compute(table, counts.double().clamp_min(1).log().float(), 0, max_images=30)
    assert got["gamma"] == report.gamma
    assert sorted(got["grid"]) == sorted(report.image_keys)  # the same images in the grid
    assert set(got["metrics"]) == set(want)
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k


def _module(seed: int = 0):
    from im2vec.deep.encoder import ImageEncoder
    from im2vec.train.module import Im2VecModule

    counts = torch.arange(30, 0, -1)
    return Im2VecModule(ImageEncoder("small_cnn", dim=8), [f"t{i}" for i in range(30)], counts, total_batches=4,
                        seed=seed, projector_tags=0, grid_images=0)


def test_ddp_leaves_the_table_and_its_cpu_buffers_alone():
    m = _module()
    ignored = set(m._ddp_params_and_buffers_to_ignore)
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    assert ignored == {n for n in params if n.startswith("table.")} | {n for n in buffers if n.startswith("table.")}
    assert "table.embedding.weight" in ignored and "table.log_counts" in ignored


def test_each_rank_restores_its_own_generator_and_rows():
    """A 2-rank checkpoint holds both ranks' sampler streams and the whole table; rank 1 takes its own."""
    from im2vec.wide.sharded_table import ShardedTagTable, rank_seed

    m = _module(seed=5)
    full = m.table.weight.detach().clone()
    streams = [torch.Generator().manual_seed(rank_seed(5, r)) for r in range(2)]
    for g in streams:
        torch.rand(3, generator=g)  # advanced, as after some steps
    assert not torch.equal(streams[0].get_state(), streams[1].get_state())
    ckpt = {"global_step": 8, "state_dict": {"table.embedding.weight": full.clone()},
            "optimizer_states": [{"state": {}, "param_groups": []},
                                 {"state": {0: {"step": 4, "exp_avg": full * 2, "exp_avg_sq": full * 3}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "im2vec": {"num_tags": 30, "dim": 8, "fingerprint": m.fingerprint, "world_size": 2, "gamma": 0.5,
                       "sampler_rngs": [g.get_state() for g in streams], "torch_rngs": [torch.get_rng_state()] * 2,
                       "sampler_rng": streams[0].get_state(), "torch_rng": torch.get_rng_state(), "cuda_rng": []}}
    m.head.table = m.table = ShardedTagTable(m.head.counts, 8, 0.01, rank=1, world=2, full=full)  # setup, rank 1 of 2
    m.on_load_checkpoint(ckpt)
    assert torch.equal(m.head.gen.get_state(), streams[1].get_state())
    assert torch.equal(ckpt["state_dict"]["table.embedding.weight"], full[1::2])
    st = m.head._table_opt_state["state"][0]
    assert torch.equal(st["exp_avg"], (full * 2)[1::2]) and torch.equal(st["exp_avg_sq"], (full * 3)[1::2])
    assert st["step"] == 4 and ckpt["optimizer_states"][1]["state"] == {}  # kept out of Lightning's restore
    # on 3 ranks the saved streams do not map onto the ranks: a new stream from (seed, rank, step)
    m3 = _module(seed=5)
    m3.head.table = m3.table = ShardedTagTable(m3.head.counts, 8, 0.01, rank=1, world=3, full=full)
    ckpt["state_dict"]["table.embedding.weight"] = full.clone()
    m3.on_load_checkpoint(ckpt)
    assert not torch.equal(m3.head.gen.get_state(), streams[1].get_state())
    assert torch.equal(ckpt["state_dict"]["table.embedding.weight"], full[1::3])


@pytest.mark.parametrize("total,d,world", [(1000, 64, 3), (997, 33, 2), (61, 8, 4), (5, 3, 2), (4099, 7, 5), (3, 2, 5)])
def test_each_rank_draws_its_rows_of_the_one_device_table_without_holding_it(total, d, world):
    from im2vec.wide.sharded_table import normal_rows, shard_rows
    from im2vec.wide.tag_table import CPUTagTable

    torch.manual_seed(3)
    whole = CPUTagTable(torch.ones(total), d, 0.01).weight.detach().clone()
    after = torch.rand(2)
    for r in range(world):
        torch.manual_seed(3)
        out = normal_rows(torch.empty(shard_rows(total, r, world), d), total, 0.01, r, world, chunk_rows=64)
        assert torch.equal(out, whole[r::world]), r
        assert torch.equal(torch.rand(2), after)  # the generator is where the whole draw leaves it


def test_a_module_built_for_rank_1_of_2_holds_rank_1s_rows_of_the_one_device_table():
    torch.manual_seed(11)
    whole = _module().table.weight.detach().clone()
    after = torch.rand(2)
    from im2vec.deep.encoder import ImageEncoder
    from im2vec.train.module import Im2VecModule

    torch.manual_seed(11)
    m = Im2VecModule(ImageEncoder("small_cnn", dim=8), [f"t{i}" for i in range(30)], torch.arange(30, 0, -1),
                     total_batches=4, projector_tags=0, grid_images=0, shard=(1, 2))
    assert m.sharded and m.table.num_tags == 30 and m.table.weight.shape == (15, 8)
    assert torch.equal(m.table.weight.detach(), whole[1::2])
    assert torch.equal(torch.rand(2), after)


@pytest.mark.parametrize("hot_rows,empty_rank", [(0, -1), (40, -1), (40, 1)])
def test_the_overlapped_sharded_step_equals_the_serial_one(tmp_path, hot_rows, empty_rank):
    """optim.overlap with trainer=ddp: share, draw and exchange on the worker thread (a gloo group of its own), the
    update queued from inside backward, beside an all-reduce on the default group in backward (DDP's), with a
    decaying LR: the same losses, u gradients, table and moments as the serial sharded step (a hang ends at the
    groups' 30-60 s timeouts; ``empty_rank`` has no images)."""
    got = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap{overlap}.pt"
        spawn(w.overlap_steps, 2, str(out), overlap, hot_rows, empty_rank)
        got[overlap] = torch.load(out)
    serial, overlapped = got[False], got[True]
    assert serial["hot_rows"] == overlapped["hot_rows"] == hot_rows
    assert overlapped["deferred"] and not serial["deferred"]  # else the main thread could step a half-set gradient
    assert overlapped["own_group"] and serial["own_group"]  # else the main thread's collectives could interleave
    assert float(serial["lr"]) < 0.05  # the schedule stepped
    for key in ("loss", "u_grad", "weight", "exp_avg", "exp_avg_sq", "lr"):
        torch.testing.assert_close(overlapped[key], serial[key], rtol=0, atol=1e-6, msg=key)
    moved = (serial["weight"] - w.problem(2)[1]).abs().sum(1) > 0
    assert int(moved.sum()) > 0
