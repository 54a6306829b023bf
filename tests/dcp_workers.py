"""Functions run in spawned gloo processes by tests/test_dcp.py (spawn children import them by name)."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dist_workers import init
from im2vec.wide import row_checkpoint
from im2vec.wide.row_checkpoint import ROW_SHARDS, save_sharded
from im2vec.wide.sharded_table import shard_of

V, D = 1001, 8  # V not a multiple of 2 or 3: ranks hold different numbers of rows
ROW_KEYS = ["state_dict/table.embedding.weight", "optimizer_states/1/state/0/exp_avg",
            "optimizer_states/1/state/0/exp_avg_sq", "optimizer_states/1/state/0/row_step"]


def whole(seed: int = 0) -> dict:
    """A Lightning-like checkpoint as one device holds it: the whole table and its per-row optimizer state."""
    g = torch.Generator().manual_seed(seed)
    return {"epoch": 3, "global_step": 40 + seed,
            "state_dict": {"table.embedding.weight": torch.randn(V, D, generator=g),
                           "table.log_counts": torch.rand(V, generator=g),
                           "encoder.proj.weight": torch.randn(D, 5, generator=g)},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(20.0), "exp_avg": torch.randn(D, 5, generator=g)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]},
                                 {"state": {0: {"step": 20, "exp_avg": torch.randn(V, D, generator=g),
                                                "exp_avg_sq": torch.rand(V, D, generator=g),
                                                "row_step": torch.randint(0, 20, (V,), generator=g, dtype=torch.int32)}},
                                  "param_groups": [{"lr": 0.05, "params": [0]}]}],
            "im2vec": {"tags": [f"t{i}" for i in range(V)], "gamma": 0.5,
                       "rngs": [torch.Generator().manual_seed(5).get_state()]}}


def local(ckpt: dict, rank: int, world: int) -> dict:
    """What rank ``rank`` holds of ``ckpt`` when the table is sharded: its rows of every per-row tensor."""
    out = {**ckpt, "state_dict": dict(ckpt["state_dict"])}
    out["state_dict"]["table.embedding.weight"] = shard_of(ckpt["state_dict"]["table.embedding.weight"], rank, world)
    st = ckpt["optimizer_states"][1]["state"][0]
    mine = {k: shard_of(v, rank, world) if k != "step" else v for k, v in st.items()}
    out["optimizer_states"] = [ckpt["optimizer_states"][0], {**ckpt["optimizer_states"][1], "state": {0: mine}}]
    out[ROW_SHARDS] = {"rank": rank, "world": world, "rows": V, "keys": ROW_KEYS}
    return out


def save(rank: int, world: int, port: int, path: str, chunk_bytes: int = 1000, kill_second: bool = False) -> None:
    """Rank ``rank`` writes its part of ``whole(0)`` to ``path`` (small chunks: several per rank). With
    ``kill_second``: then a second save (``whole(1)``) during which rank 1 is killed with SIGKILL right after its
    data file is written (rank 0 has written its own and waits for it, the checkpoint's metadata not written)."""
    init(rank, world, port)
    row_checkpoint.CHUNK_BYTES = chunk_bytes
    group = dist.new_group(backend="gloo")
    save_sharded(local(whole(0), rank, world), path, rank, world, group)
    if kill_second:
        if rank == 1:
            write = dcp.FileSystemWriter.write_data

            def write_then_die(self, plan, planner):
                fut = write(self, plan, planner)
                fut.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            dcp.FileSystemWriter.write_data = write_then_die
        save_sharded(local(whole(1), rank, world), path, rank, world, group)
    dist.destroy_process_group()


def save_file(rank: int, world: int, port: int, src: str, path: str) -> None:
    """Rank ``rank`` writes its rows of the one-file checkpoint ``src`` (and, rank 0, the rest) to ``path``."""
    init(rank, world, port)
    save_file_rows(src, path, rank, world, dist.new_group(backend="gloo"))
    dist.destroy_process_group()


def save_file_rows(src: str, path: str, rank: int = 0, world: int = 1, group=None) -> None:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    sd["table.embedding.weight"] = shard_of(sd["table.embedding.weight"], rank, world)
    ckpt[ROW_SHARDS] = {"rank": rank, "world": world, "rows": ckpt["im2vec"]["num_tags"],
                        "keys": ["state_dict/table.embedding.weight"]}
    save_sharded(ckpt, path, rank, world, group)
