"""Checkpoints of a sharded table as DCP folders (im2vec/wide/row_checkpoint.py): every rank writes its own rows,
any number of processes reads them back bit-exact; a folder is complete or absent; evaluation and prediction
read a folder as they read a file; ``python -m im2vec.export`` makes one file of it."""

from __future__ import annotations

import json
from pathlib import Path

import dcp_workers as w
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from test_dist import free_port

from im2vec.errors import UserError
from im2vec.wide.row_checkpoint import (LAYOUT, ROW_SHARDS, RowLoadPlanner, block_offsets, read_metadata, read_sharded,
                                        swap_into_place)
from im2vec.wide.sharded_table import shard_of

ROOT = Path(__file__).resolve().parents[1]
BEFORE = ROOT / "tests" / "data" / "before-subpackages.ckpt"  # a small real checkpoint (table 196 × 16)


def spawn(fn, world: int, *args, join: bool = True):
    return mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=join, start_method="spawn")


def at(ckpt: dict, key: str):
    for part in key.split("/"):
        ckpt = ckpt[int(part) if part.isdigit() else part]
    return ckpt


def assert_holds(got: dict, want: dict, rank: int, world: int) -> None:
    """``got`` (read as rank ``rank`` of ``world``) holds that rank's rows of every per-row tensor of ``want``,
    bit for bit, and everything else whole."""
    for key in w.ROW_KEYS:
        assert torch.equal(at(got, key), shard_of(at(want, key), rank, world)), (key, rank, world)
    assert at(got, "optimizer_states/1/state/0/step") == 20
    for key in ("state_dict/table.log_counts", "state_dict/encoder.proj.weight", "optimizer_states/0/state/0/exp_avg",
                "optimizer_states/0/state/0/step", "im2vec/rngs/0"):
        assert torch.equal(at(got, key), at(want, key)), key
    assert got["im2vec"]["tags"] == want["im2vec"]["tags"] and got["global_step"] == want["global_step"]


def test_saved_on_2_ranks_reads_bit_exact_on_1_2_and_3(tmp_path):
    path = tmp_path / "last.ckpt"
    spawn(w.save, 2, str(path))
    md = read_metadata(path)
    assert md.planner_data[LAYOUT]["world"] == 2
    # no assembly: each rank's rows are in its own file, in several chunks (1,000-byte chunks here)
    files = {md.storage_data[i].relative_path for i in md.storage_data if i.fqn == w.ROW_KEYS[0]}
    assert files == {"__0_0.distcp", "__1_0.distcp"}
    assert len(md.state_dict_metadata[w.ROW_KEYS[0]].chunks) > 4
    want = w.whole(0)
    for world in (1, 2, 3):  # reading needs no collective: each rank of W′ plans its own reads
        for rank in range(world):
            assert_holds(read_sharded(path, rank, world), want, rank, world)
    lazy = read_sharded(path, rank=None)  # a resumed run: the rows stay on disk until the head reads its own
    assert type(lazy["state_dict"]["table.embedding.weight"]).__name__ == "SavedRows"
    assert lazy[ROW_SHARDS]["world"] == 2


@pytest.mark.parametrize("rows,saved,loaded", [(1001, 2, 3), (1001, 3, 2), (1000, 4, 6), (17, 5, 3), (7, 3, 1),
                                               (3, 5, 2), (64, 8, 4), (64, 4, 8), (101, 6, 9)])
def test_the_load_planner_puts_every_saved_row_where_id_mod_w_puts_it(rows, saved, loaded):
    """The planner's arithmetic alone, against a saved rank-major tensor (rank q's rows q, q+W, … as block q, in
    chunks of 3 rows): reads as DCP's reader does them (narrow the chunk, resolve, copy, commit)."""
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                       TensorStorageMetadata)

    ids = torch.arange(rows)
    offs = block_offsets(rows, saved)
    rank_major = torch.cat([ids[q::saved] for q in range(saved)])  # (rows,): position -> global id
    chunks = [ChunkStorageMetadata(offsets=torch.Size([lo]), sizes=torch.Size([min(lo + 3, offs[q + 1]) - lo]))
              for q in range(saved) for lo in range(offs[q], offs[q + 1], 3)]
    md = TensorStorageMetadata(TensorProperties(dtype=torch.long), torch.Size([rows]), chunks)
    seen = torch.zeros(rows, dtype=torch.long)
    for rank in range(loaded):
        dest = torch.full((len(range(rank, rows, loaded)),), -1)
        planner = RowLoadPlanner(["t"], rank, loaded)
        planner.state_dict = {"t": dest}
        for item in planner._row_reads("t", md, saved, dest):
            lo = item.storage_index.offset[0] + item.storage_offsets[0]
            data = rank_major[lo: lo + item.lengths[0]]
            target = planner.resolve_tensor(item)
            target.copy_(data)
            planner.commit_tensor(item, target)
        assert torch.equal(dest, ids[rank::loaded]), (rank, dest)
        seen[dest] += 1
    assert torch.equal(seen, torch.ones(rows, dtype=torch.long)), "every row read by exactly one rank"


@pytest.mark.parametrize("old", ["folder", "file", None])
def test_a_finished_save_replaces_the_checkpoint_in_one_step(tmp_path, old):
    path, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp-dcp"
    if old == "folder":
        path.mkdir()
        (path / "old").write_text("old")
    elif old == "file":
        path.write_text("old")
    tmp.mkdir()
    (tmp / ".metadata").write_text("new")
    swap_into_place(tmp, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (path / ".metadata").read_text() == "new"


@pytest.mark.slow  # the fast test of the same: test_a_finished_save_replaces_the_checkpoint_in_one_step
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    """Rank 1 is killed with SIGKILL after writing its part of the second checkpoint: the folder still holds the
    first one, complete and bit-exact; the half-written one is only in ``last.ckpt.tmp-dcp``."""
    path = tmp_path / "last.ckpt"
    ctx = spawn(w.save, 2, str(path), 1000, True, join=False)
    with pytest.raises(Exception):
        while not ctx.join(timeout=120):
            pass
    for p in ctx.processes:
        p.join(5)
    assert ctx.processes[1].exitcode == -9
    assert (tmp_path / "last.ckpt.tmp-dcp" / "__1_0.distcp").is_file()  # the second save had begun
    assert not (tmp_path / "last.ckpt.tmp-dcp" / ".metadata").exists()
    for world in (1, 2):
        for rank in range(world):
            assert_holds(read_sharded(path, rank, world), w.whole(0), rank, world)


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])  # 1: written in this process
def test_load_model_tagger_and_export_read_a_folder_as_the_file(tmp_path, world):
    from im2vec.export import main as export
    from im2vec.train.checkpoint import read_checkpoint, set_gamma
    from im2vec.use.predict import Tagger, load_model

    folder = tmp_path / "last.ckpt"
    if world == 1:
        w.save_file_rows(str(BEFORE), str(folder))
    else:
        spawn(w.save_file, world, str(BEFORE), str(folder))
    a, b = load_model(BEFORE), load_model(folder)
    assert torch.equal(a.table, b.table) and torch.equal(a.log_counts, b.log_counts)
    assert all(torch.equal(x, y) for x, y in zip(a.encoder.state_dict().values(), b.encoder.state_dict().values()))
    assert (a.tags, a.gamma) == (b.tags, b.gamma)
    want = json.loads(BEFORE.with_suffix(".json").read_text())  # what that commit's Tagger gave on this image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    got = Tagger.from_checkpoint(folder).tag([img], k=want["k"])[0]
    assert [t for t, _ in got] == [t for t, _ in want["tags"]]
    assert [s for _, s in got] == pytest.approx([s for _, s in want["tags"]], abs=1e-6)
    assert export([str(folder), str(tmp_path / "one.ckpt")]) == 0
    one, orig = read_checkpoint(tmp_path / "one.ckpt"), read_checkpoint(BEFORE)
    assert set(one) == set(orig) and all(torch.equal(one["state_dict"][k], v) for k, v in orig["state_dict"].items())
    set_gamma(folder, 1.75)  # a folder is written once: the γ chosen afterwards is recorded beside it
    assert load_model(folder).gamma == 1.75 and read_checkpoint(tmp_path / "one.ckpt")["im2vec"]["gamma"] == a.gamma


def test_a_folder_without_metadata_is_refused_in_one_line(tmp_path):
    from im2vec.train.checkpoint import read_checkpoint

    (tmp_path / "cut.ckpt").mkdir()
    (tmp_path / "cut.ckpt" / "__0_0.distcp").write_bytes(b"x" * 100)
    with pytest.raises(UserError, match="without .metadata"):
        read_checkpoint(tmp_path / "cut.ckpt")


def test_a_resumed_rank_reads_only_its_rows_of_a_folder(tmp_path):
    """Lightning's load (AtomicCheckpointIO) leaves the table's rows on disk; the module of rank 1 of 3 takes its
    own rows of the table and of the table optimizer's moments from the folder."""
    from test_dist import _module

    from im2vec.train.resilience import AtomicCheckpointIO
    from im2vec.wide.row_checkpoint import save_sharded
    from im2vec.wide.sharded_table import ShardedTagTable

    m = _module(seed=5)
    full = torch.randn(30, 8)
    keys = ["state_dict/table.embedding.weight", "optimizer_states/1/state/0/exp_avg",
            "optimizer_states/1/state/0/exp_avg_sq"]
    g = torch.Generator().manual_seed(1)
    ckpt = {"global_step": 8, "state_dict": {"table.embedding.weight": full},
            "optimizer_states": [{"state": {}, "param_groups": []},
                                 {"state": {0: {"step": 4, "exp_avg": full * 2, "exp_avg_sq": full * 3}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "im2vec": {"num_tags": 30, "dim": 8, "fingerprint": m.fingerprint, "world_size": 1, "gamma": 0.5,
                       "sampler_rng": g.get_state(), "torch_rng": torch.get_rng_state(), "cuda_rng": []},
            ROW_SHARDS: {"rank": 0, "world": 1, "rows": 30, "keys": keys}}
    save_sharded(ckpt, tmp_path / "last.ckpt", 0, 1)
    loaded = AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert type(loaded["state_dict"]["table.embedding.weight"]).__name__ == "SavedRows"
    m.head.table = m.table = ShardedTagTable(m.head.counts, 8, 0.01, rank=1, world=3)  # setup, rank 1 of 3
    m.on_load_checkpoint(loaded)
    assert torch.equal(loaded["state_dict"]["table.embedding.weight"], full[1::3])
    st = m.head._table_opt_state["state"][0]
    assert torch.equal(st["exp_avg"], (full * 2)[1::3]) and torch.equal(st["exp_avg_sq"], (full * 3)[1::3])
    assert st["step"] == 4 and loaded["optimizer_states"][1]["state"] == {}  # kept out of Lightning's restore


def test_with_a_sharded_table_every_rank_writes_the_checkpoint():
    """Lightning's strategies write a checkpoint on rank 0 only; RowShardedDDP has every rank write its part when
    the checkpoint names row shards, and leaves other checkpoints to rank 0."""
    from im2vec.train.resilience import RowShardedDDP

    calls = []

    class IO:
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            calls.append(path)

    class OnRank(RowShardedDDP):
        rank = 1

        @property
        def is_global_zero(self) -> bool:
            return self.rank == 0

    s = OnRank()
    s._checkpoint_io = IO()
    s.save_checkpoint({ROW_SHARDS: {}}, "a")  # rank 1 writes its rows
    s.save_checkpoint({}, "b")  # a one-file checkpoint: rank 0's business
    s.rank = 0
    s.save_checkpoint({}, "c")
    assert calls == ["a", "c"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_folder_whose_metadata_would_run_code_is_refused(tmp_path):
    """DCP's .metadata is a pickle: it is read with DCP's classes, torch's sizes and dtypes allowed, nothing else."""
    import pickle

    from im2vec.train.checkpoint import read_checkpoint

    folder, marker = tmp_path / "evil.ckpt", tmp_path / "ran"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match="not allowed"):
        read_checkpoint(folder)
    assert not marker.exists()
