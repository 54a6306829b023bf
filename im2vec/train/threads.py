"""CPU threads per training process: the trunk's intra-op pool, the table's kernels, the loader's workers.

Left alone, torch's intra-op pool and numba's pool each size themselves to every core of the machine,
in every rank, beside the loader's worker processes (each of which keeps a core busy decoding): 8
ranks on a 16-core node then run 8 × (16 + 16) threads plus the workers on 16 cores. ``plan``
divides the cores this process may use (its affinity mask) among the ranks of the node, leaves one
per loader worker, and gives the rest to the trunk and the table:

- trunk on a GPU: the CPU side is the table (gather, update) and small torch ops (dedup, sampling):
  the table's kernels get the rest, torch's pool at most 4 (it only runs small ops);
- trunk on the CPU, serial step: trunk and table take turns: both get the rest;
- trunk on the CPU, overlapped step: the table's worker thread takes one core, the trunk the rest.

``threads.trunk`` / ``threads.table`` in the config override the plan (null: planned).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from im2vec.wide import sparse_optim


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    cores: int  # this process's share of the node's cores
    workers: int  # loader worker processes (one core each)
    trunk: int  # torch's intra-op threads
    table: int  # numba threads of the table's kernels

    def __str__(self) -> str:
        return (f"{self.cores} cores for this rank: {self.workers} loader worker(s), torch {self.trunk} thread(s), "
                f"table kernels {self.table}")


def plan(num_workers: int, local_ranks: int, gpu: bool, overlap: bool, cores: int | None = None,
         trunk: int | None = None, table: int | None = None) -> ThreadPlan:
    share = max(1, (cores or available_cores()) // max(1, local_ranks))
    rest = max(1, share - num_workers)
    if gpu:
        auto_trunk, auto_table = min(4, rest), rest
    elif overlap and rest > 1:
        auto_trunk, auto_table = rest - 1, 1
    else:  # the default run (2 cores, 1 worker), one session: 1 thread 35-40 s an epoch, 2 threads 40-53 s
        auto_trunk, auto_table = rest, rest
    return ThreadPlan(share, num_workers, trunk or auto_trunk, table or auto_table)


def apply(p: ThreadPlan) -> None:
    torch.set_num_threads(p.trunk)
    sparse_optim.set_table_threads(p.table)
