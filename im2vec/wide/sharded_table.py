"""The tag table sharded by rows across the ranks of a distributed run (torchrec's "row-wise" sharding).

With W ranks, rank r holds the rows whose id satisfies ``id % W == r`` (local row ``id // W``) and
their optimizer state, in host memory, fp32: table + state per rank ≈ V·d·4·(1+s)/W bytes, where s
is the optimizer's state per weight (2 for Adam's moments, ≈ 1/d for row-wise Adagrad). Every rank
keeps the whole (V,) ``log_counts`` (the tagging score and the logQ corrections need them) and its
own copy of the samplers' tables.

A training step, on every rank, over a gloo group of CPU tensors (``exchange_group``):

0. ``share(n)``: the ranks' image counts summed (one all_reduce), so that each rank's mean loss can be
   weighted by n·W/N: a step is the mean over all ranks' images, also when they hold unequal or no
   batches (an empty rank still goes through every step below, with no ids);
1. ``gather(ids)``: the distinct ids of the rank's batch go to their owners (``all_to_all_single``
   of sizes, then of local row numbers); each owner reads the requested rows and sends them back (a
   second ``all_to_all_single``); the rows are scored on the trunk's device as on one device.
2. ``loss.backward()``: autograd sums each distinct row's gradient on its rank (and DDP all-reduces
   the trunk's gradients on the default group; that finishes before backward returns).
3. ``reduce_grads()``: the row gradients go back to their owners (a third ``all_to_all_single``);
   each owner sums what it received, duplicates across ranks summed once (one coalesce), divides by W
   (DDP averages the trunk's gradients: the table's are averaged the same way, so a W-rank step is
   one step on the concatenated batch), and sets that as its shard's sparse gradient.
4. The table optimizer updates the shard's touched rows (one fused pass, ``im2vec.wide.sparse_optim``).

Ordering, so that the two groups cannot deadlock each other: every rank issues the table's
collectives in the same order (counts, sizes, ids, rows; then gradients) on the table's own gloo group, and
only from the training step's thread, before backward (1) and after it (3); the trunk's all-reduce
runs on the default group inside backward (2) and has finished when (3) starts. No collective of
one group is ever waited on while the other group has one outstanding. With ``optim.overlap`` the step's
collectives run on the TableWorker's thread instead, over ``step_group`` (a third gloo group), while the
training thread keeps ``group`` for its own (the stop flag, validation, checkpoints): the ordering that keeps
that free of deadlocks is in im2vec/wide/sharded_step.py.

Hot rows (``optim.hot_rows``, im2vec/wide/hot_rows.py): the rows every rank draws in nearly every step can be
replicated on every rank instead; ``rows_for`` reads them from the replica and ``reduce_grad`` all-reduces
their gradient, and the tail goes through the exchange above.

Bytes per rank per step: ≈ n·(8 + 2·4·d)·(W−1)/W sent and as many received, n the distinct ids of
the rank's batch (≤ B·(P+K)): flat in W, as the table memory per rank shrinks as 1/W.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from im2vec.errors import BadValue
from im2vec.wide.allocator import empty_hugepages
from im2vec.wide.hot_rows import ROW_STATE, HotRows  # ROW_STATE: the per-row optimizer state (sharded like the rows)
from im2vec.wide.sparse_optim import gather_rows
from im2vec.wide.tag_table import CPUTagTable


def shard_rows(num_tags: int, rank: int, world: int) -> int:
    """How many rows rank ``rank`` of ``world`` owns: ids rank, rank + world, rank + 2·world, …"""
    return max(0, (num_tags - rank + world - 1) // world)


def shard_of(full: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s rows of a whole (V, …) tensor, as a new contiguous tensor."""
    return full[rank::world].clone(memory_format=torch.contiguous_format)


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's sampler seed: the run's seed on rank 0 (a one-device run draws what rank 0 of many would)."""
    return seed + 1_000_003 * rank


def exchange_group(timeout_s: float = 1800.0):
    """A gloo group of all ranks for the table's CPU tensors (the default group may be NCCL)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


_NO_LOCAL_READ = ("ShardedTagTable.{}: rank {} of {} holds only the rows with id % W == rank (local row id // W), so "
                  "global ids would read the wrong rows; use gather(ids, device) on every rank, then reduce_grads()")


class ShardedTagTable(CPUTagTable):
    """Rank ``rank``'s rows of a (V, d) table; ``gather`` / ``reduce_grads`` exchange rows with the others.

    ``weight`` is the local shard (n_r, d) (what the optimizer updates); ``num_tags`` is the whole V.
    ``assemble`` builds a whole (V, …) tensor on rank 0 from every rank's shard (validation, test
    figures and checkpoints: rank 0 then needs V·d·4 bytes more for the table, and as much again per
    optimizer state tensor while a checkpoint is written).
    """

    def __init__(self, counts: Tensor, dim: int, init_std: float, rank: int, world: int, group=None,
                 full: Tensor | None = None, single_device_rows: bool = False):
        nn.Module.__init__(self)
        if not 0 <= rank < world:
            raise BadValue(f"table: rank {rank} is not in [0, {world})", "check RANK and WORLD_SIZE")
        self.rank, self.world, self.group = rank, world, group
        self._step_group = None  # the training step's exchange (gloo): its own group when it runs on a worker thread
        self.total = counts.numel()
        n = shard_rows(self.total, rank, world)
        weight = empty_hugepages(n, dim)
        if full is not None:  # the same initial rows as the single-process table (its seeded init)
            weight.copy_(full[rank::world])
        elif single_device_rows:  # the same, drawn here without ever holding the whole table
            normal_rows(weight, self.total, init_std, rank, world)
        else:
            nn.init.normal_(weight, std=init_std)
        self.embedding = nn.Embedding(n, dim, sparse=True, _weight=weight)
        self.register_buffer("log_counts", counts.double().clamp_min(1).log().float())  # (V,): the whole vocabulary
        self._pending = None
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "exchange_s": 0.0}
        self.hot: HotRows | None = None  # the hot rows replicated on every rank (im2vec/wide/hot_rows.py)
        self.images = 0  # all ranks' images in the last step (share)

    @property
    def num_tags(self) -> int:
        return self.total

    @property
    def step_group(self):
        """The group of the step's exchange (share, rows, gradients, hot rows): ``group`` unless a group of its own
        was given (the overlapped step's worker thread: the main thread's collectives stay on ``group``)."""
        return self._step_group if self._step_group is not None else self.group

    @step_group.setter
    def step_group(self, group) -> None:
        self._step_group = group

    # ---- what the local shard cannot do: CPUTagTable's lookup and forward index it with global ids
    def lookup(self, ids: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
        raise RuntimeError(_NO_LOCAL_READ.format("lookup", self.rank, self.world))

    def forward(self, ids: Tensor) -> Tensor:
        raise RuntimeError(_NO_LOCAL_READ.format("forward", self.rank, self.world))

    # ---- the exchange
    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        t0 = time.perf_counter()
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.step_group)
        self.stats["exchange_s"] += time.perf_counter() - t0
        mine_in, mine_out = in_splits[self.rank], out_splits[self.rank]  # what stays on this rank is not sent
        row = math.prod(inp.shape[1:]) * inp.element_size()  # bytes per entry (0 rows: nothing sent)
        self.stats["bytes_sent"] += (sum(in_splits) - mine_in) * row
        self.stats["bytes_received"] += (sum(out_splits) - mine_out) * row

    def fetch(self, uniq: Tensor) -> tuple[Tensor, tuple]:
        """Distinct sorted ids (n,) -> their rows (n, d) from their owners, and the routing to send
        gradients back along."""
        w = self.world
        owner = uniq % w
        order = torch.argsort(owner, stable=True)  # requests grouped by owner
        want = uniq[order] // w  # local row numbers on the owners
        send_n = torch.bincount(owner, minlength=w)
        recv_n = torch.empty_like(send_n)
        self._all_to_all(recv_n, send_n, [1] * w, [1] * w)
        send_split, recv_split = send_n.tolist(), recv_n.tolist()
        asked = torch.empty(sum(recv_split), dtype=torch.long)
        self._all_to_all(asked, want, recv_split, send_split)
        rows_out = gather_rows(self.embedding.weight.detach(), asked)  # what the others asked of this rank
        rows_in = torch.empty(uniq.numel(), self.dim)
        self._all_to_all(rows_in, rows_out, send_split, recv_split)
        rows = torch.empty_like(rows_in)
        rows[order] = rows_in  # back in the order of uniq
        return rows, (order, asked, send_split, recv_split)

    def share(self, n: int) -> float:
        """This rank's weight when its mean over n images enters an average over the W ranks (DDP's for the
        trunk, ``reduce_grads``' /W for the table): n·W/N, N the images of all ranks (one all_reduce), so that the
        step is the mean over every rank's images whatever each holds; 1.0 when every rank has as many, 0 for
        an empty rank (and 0 everywhere when N = 0)."""
        t0 = time.perf_counter()
        total = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(total, group=self.step_group)
        self.stats["exchange_s"] += time.perf_counter() - t0
        self.images = int(total)
        return n * self.world / int(total) if n else 0.0

    def gather(self, ids: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
        """ids (...) -> rows (..., d) on ``device``, each distinct row fetched once from its owner.
        Call ``reduce_grads`` after backward (every rank, once per gather)."""
        if self._pending is not None:
            raise RuntimeError("ShardedTagTable.gather called twice without reduce_grads in between")
        uniq, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        rows, route = self.rows_for(uniq)
        rows.requires_grad_(True)
        self._pending = (rows, route)
        out = rows.to(device=device, dtype=dtype, non_blocking=True)
        return out.index_select(0, inverse.flatten().to(out.device)).view(*ids.shape, out.shape[1])

    def rows_for(self, uniq: Tensor) -> tuple[Tensor, tuple]:
        """Distinct sorted ids (n,) -> their rows (n, d) in host memory (the hot ones from the replica, the tail from
        its owners) and the routing that ``reduce_grad`` sends their gradient back along. Every rank, every step."""
        if self.hot is None:
            rows, route = self.fetch(uniq)
            return rows, (route, None)
        slot = self.hot.slot[uniq].long()
        is_hot = slot >= 0
        tail, route = self.fetch(uniq[~is_hot])
        rows = torch.empty(uniq.numel(), self.dim)
        rows[~is_hot] = tail
        rows[is_hot] = self.hot.weight.detach()[slot[is_hot]]
        return rows, (route, (is_hot, slot[is_hot]))

    def reduce_grad(self, grad: Tensor, route: tuple) -> None:
        """The gradient (n, d) of ``rows_for``'s rows (host) -> the owners' shards (their sparse gradient: the sum
        over the ranks / W) and the replica's (all-reduced). Every rank, once per ``rows_for``."""
        (order, asked, send_split, recv_split), hot = route
        if hot is not None:  # the replica's rows: summed over the ranks in one all-reduce
            self.hot.reduce(hot[1], grad[hot[0]], self.step_group, self.stats)
            grad = grad[~hot[0]]
        got = torch.empty(sum(recv_split), self.dim)
        self._all_to_all(got, grad[order].contiguous(), recv_split, send_split)
        local = self.embedding.weight
        g = torch.sparse_coo_tensor(asked.unsqueeze(0), got.div_(self.world), local.shape, check_invariants=False)
        local.grad = g.coalesce()  # a row asked for by several ranks: its gradients summed once

    def reduce_grads(self) -> None:
        """Send the fetched rows' gradients to their owners; set this shard's gradient to their sum / W
        (an empty sparse gradient when no rank touched this shard: the optimizer's step count advances
        on every rank, as on one device)."""
        if self._pending is None:
            raise RuntimeError("ShardedTagTable.reduce_grads without a gather")
        rows, route = self._pending
        self._pending = None
        self.reduce_grad(rows.grad if rows.grad is not None else torch.zeros_like(rows), route)

    # ---- the hot rows (im2vec/wide/hot_rows.py)
    def set_hot(self, ids: Tensor, table_opt=None) -> None:
        """Replicate the rows ``ids`` on every rank (every rank calls it with the same ids: a collective), their
        values and, when ``table_opt`` has state (a resume), their optimizer state from their owners."""
        self.flush_hot(table_opt)
        self.hot = HotRows(ids, self.total, self.dim, self.rank, self.world) if ids.numel() else None
        if self.hot is not None:
            self.hot.sync(self.embedding.weight, table_opt, self.step_group)

    def step_hot(self, table_opt) -> None:
        """After ``table_opt.step()``: the replica's update (every rank the same)."""
        if self.hot is not None:
            self.hot.step(table_opt)

    def flush_hot(self, table_opt) -> None:
        """The replica's rows and state into this rank's shard: before anything reads the shard."""
        if self.hot is not None:
            self.hot.flush(self.embedding.weight, table_opt)

    # ---- whole tensors on rank 0
    def assemble(self, local: Tensor | None = None) -> Tensor | None:
        """The whole (V, …) tensor on rank 0 from every rank's shard of it (default: the table);
        None on the other ranks. Every rank must call it."""
        return assemble_rows(self.embedding.weight.detach() if local is None else local, self.total, self.rank,
                             self.world, self.group)


def normal_rows(out: Tensor, total: int, std: float, rank: int, world: int, chunk_rows: int = 4096) -> Tensor:
    """Rank ``rank``'s rows (id % world == rank) of ``torch.empty(total, d).normal_(0, std)`` into ``out``
    (n_r, d), drawn from the global generator chunk by chunk: the values are those of the one whole draw
    (torch's CPU normal_ fills blocks of 16 in order, so chunks of a multiple of 16 values, the last one at
    least 16 long, continue one stream; tests check it) and the generator ends where the whole draw leaves
    it. Memory: one chunk, not the table."""
    d = out.shape[1]
    chunk_rows = max(16, chunk_rows // 16 * 16)  # chunk_rows·d values: a multiple of 16
    buf = torch.empty(chunk_rows + 16, d)
    lo = 0
    while lo < total:
        hi = min(total, lo + chunk_rows)
        if 0 < (total - hi) * d < 16:  # a last chunk of under 16 values would be drawn differently: join it
            hi = total
        block = buf[: hi - lo]
        block.normal_(0, std)
        first = (rank - lo) % world  # the first row of this block that this rank owns
        rows = block[first::world]
        out[(lo + first) // world: (lo + first) // world + rows.shape[0]] = rows
        lo = hi
    return out


def map_row_state(state: dict, fn) -> dict:
    """An optimizer ``state_dict()["state"]`` with ``fn`` applied to its per-row tensors (ROW_STATE), in new
    dicts (the optimizer's own are left as they are)."""
    return {pid: {k: fn(v) if k in ROW_STATE and isinstance(v, Tensor) else v for k, v in st.items()}
            for pid, st in state.items()}


def assemble_rows(local: Tensor, total: int, rank: int, world: int, group=None) -> Tensor | None:
    """Row shards (id % world == rank) -> the whole (total, …) tensor on rank 0 (None elsewhere), one
    shard in flight at a time: rank 0 needs the whole tensor plus one shard."""
    local = local.detach().contiguous()
    if rank != 0:
        dist.send(local, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        return None
    full = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    full[0::world] = local
    for r in range(1, world):
        buf = torch.empty((shard_rows(total, r, world), *local.shape[1:]), dtype=local.dtype)
        dist.recv(buf, src=dist.get_global_rank(group, r) if group is not None else r, group=group)
        full[r::world] = buf
    return full
