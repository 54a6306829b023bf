"""Hot rows of a sharded tag table: the most often drawn rows kept on every rank, their gradients all-reduced.

Row-wise sharding sends every drawn row to the rank that asked for it and its gradient back to its owner
(``ShardedTagTable.gather`` / ``reduce_grads``). The rows that every rank draws in nearly every step (the head of
the ∝ count^α negative distribution) are better kept data-parallel, as HugeCTR's hybrid embedding keeps its
frequent categories and torchrec its data-parallel tables: every rank holds a replica of these H rows and of
their optimizer state; a step reads them locally (no fetch before the forward), sums their gradients over the
ranks in one ``all_reduce`` of an (H, d + 1) buffer (the last column counts the ranks that touched each row), and
every rank applies the same update to its replica (one optimizer of the table's kind over the (H, d) replica, with
the table optimizer's hyperparameters and learning rate). The tail stays sharded by id % W as before.

Exactly one process's step: a hot row's gradient is the sum over ranks / W, the same value the owner would have
received (summed in another order: equal to float rounding), and it is updated when any rank touched it, as the
owner would have (tests: W = 2, 3 against one process, rows and every optimizer state to 1e-6).

**Which rows.** ``optim.hot_rows``: 0 (none), an integer N (the N rows most likely to be drawn) or a fraction
τ in (0, 1): the rows whose probability of being drawn by one rank's batch in one step is at least τ,
p_t = 1 − exp(−B·(K·q_t + P·c_t)) (Poisson), q_t the negative sampler's probability (∝ count^α), c_t the tag's
share of all tag occurrences (the positives' draw, exact for β = 0), B the mean images per rank of the first
step (the same on every rank: from the all-reduced image count). The benchmark (``python -m im2vec.bench.dist``)
measures each choice.

**What a rank holds:** the H replica rows and their state (H·d·4·(1+s) bytes; H is a few hundred at 600k tags)
plus one int32 per tag (the slot map). The shard's own copies of its hot rows are left as they were while the
replica trains; ``flush`` writes the replica's rows and state back into each owner's shard (no communication)
before anything reads the shard (validation, checkpoints, ``assemble``), and ``sync`` (one all-reduce per tensor)
fills the replica from the owners when it is made, after a resume included.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

ROW_STATE = ("exp_avg", "exp_avg_sq", "row_step", "sum")


def draw_rates(counts: Tensor, alpha: float, negatives: float, positives: float) -> Tensor:
    """(V,) float64: each row's expected draws per image, ``negatives`` ∝ count^alpha and ``positives`` ∝ count."""
    c = counts.double().clamp_min(0)
    q = torch.where(c > 0, c.pow(alpha), 0.0)
    return negatives * q / q.sum().clamp_min(1e-300) + positives * c / c.sum().clamp_min(1e-300)


def touch_probability(counts: Tensor, alpha: float, batch: float, negatives: float, positives: float) -> Tensor:
    """(V,) float64: each row's probability of being drawn at least once by a batch of ``batch`` images with
    ``negatives`` draws ∝ count^alpha and ``positives`` draws ∝ count per image (Poisson approximation)."""
    return 1.0 - torch.exp(-batch * draw_rates(counts, alpha, negatives, positives))


def choose_hot(counts: Tensor, setting, alpha: float, batch: float, negatives: float, positives: float) -> Tensor:
    """The hot rows' ids (sorted) for ``optim.hot_rows`` = ``setting`` (0, an integer N, or a fraction τ)."""
    if setting is None or setting is False or setting == 0:
        return torch.empty(0, dtype=torch.long)
    p = touch_probability(counts, alpha, batch, negatives, positives)
    if isinstance(setting, float) and 0.0 < setting < 1.0:
        ids = torch.nonzero(p >= setting).flatten()
    else:
        n = min(int(setting), counts.numel())
        ids = torch.argsort(p, descending=True, stable=True)[:n]
    return ids.sort().values


def check_setting(setting) -> None:
    from im2vec.errors import BadValue

    ok = (isinstance(setting, bool) and not setting) or (isinstance(setting, int) and not isinstance(setting, bool)
                                                         and setting >= 0) \
        or (isinstance(setting, float) and (0.0 < setting < 1.0 or setting == 0.0))
    if not ok:
        raise BadValue(f"optim.hot_rows={setting!r}", "use 0 (none), a whole number of rows, or a fraction in (0, 1): "
                       "the rows a rank's batch draws with at least that probability")


class HotRows:
    """The replica of the hot rows ``ids`` on rank ``rank`` of ``world`` (see the module's doc)."""

    def __init__(self, ids: Tensor, total: int, dim: int, rank: int, world: int):
        self.ids = ids.long()
        self.slot = torch.full((total,), -1, dtype=torch.int32)  # global id -> replica row, -1: not hot
        self.slot[self.ids] = torch.arange(ids.numel(), dtype=torch.int32)
        owned = self.ids % world == rank
        self.owned_slots = torch.nonzero(owned).flatten()  # replica rows this rank's shard owns
        self.owned_local = self.ids[owned] // world  # ... and their local rows in the shard
        self.weight = nn.Parameter(torch.zeros(ids.numel(), dim))
        self.world = world
        self.opt: torch.optim.Optimizer | None = None
        self.dirty = False  # updated since the shard last got its rows back

    @property
    def size(self) -> int:
        return self.ids.numel()

    # ---- a step
    def reduce(self, slots: Tensor, grad: Tensor, group, stats: dict) -> None:
        """This rank's gradients of the replica rows ``slots`` (distinct) -> every rank's sum / W as the replica's
        sparse gradient (rows touched by any rank only). Every rank calls it every step (an empty rank with no
        slots)."""
        h, d = self.weight.shape
        buf = torch.zeros(h, d + 1)
        if slots.numel():
            buf[slots, :d] = grad
            buf[slots, d] = 1.0
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=group)
        stats["exchange_s"] += time.perf_counter() - t0
        ring = 2 * (self.world - 1) / self.world * buf.numel() * buf.element_size()  # a ring all-reduce's traffic
        stats["bytes_sent"] += int(ring)
        stats["bytes_received"] += int(ring)
        touched = torch.nonzero(buf[:, d] > 0).flatten()
        values = buf[touched, :d].div_(self.world)
        self.weight.grad = torch.sparse_coo_tensor(touched.unsqueeze(0), values, (h, d), is_coalesced=True,
                                                   check_invariants=False)

    def step(self, table_opt) -> None:
        """The replica's update with the table optimizer's kind, hyperparameters and current learning rate."""
        if self.weight.grad is None:
            return
        opt = self.optimizer(table_opt)
        main = dict(_raw(table_opt).param_groups[0])
        main.pop("params")
        opt.param_groups[0].update(main)
        opt.step()
        self.weight.grad = None
        self.dirty = True

    def optimizer(self, table_opt) -> torch.optim.Optimizer:
        if self.opt is None:
            raw = _raw(table_opt)
            kwargs = dict(raw.defaults)
            if hasattr(raw, "row_steps"):  # im2vec's SparseAdam: lazy_adam counts steps per row
                kwargs["row_steps"] = raw.row_steps
            self.opt = type(raw)([self.weight], **kwargs)
        return self.opt

    # ---- between the replica and the owners' shards
    def sync(self, shard: Tensor, table_opt, group) -> None:
        """Every rank: the replica's rows, and their optimizer state when the table optimizer has any (a resume), from
        their owners' shards (one all-reduce per tensor)."""
        self.weight.data.copy_(self._gather(shard.detach(), group))
        raw = _raw(table_opt) if table_opt is not None else None
        main = raw.state.get(shard) if raw is not None else None
        if main:
            state = {}
            for k, v in main.items():
                state[k] = self._gather(v, group) if k in ROW_STATE and isinstance(v, Tensor) else _copy(v)
            self.optimizer(raw).state[self.weight] = state
        elif self.opt is not None:
            self.opt.state.clear()
        self.dirty = False

    def flush(self, shard: Tensor, table_opt) -> None:
        """The replica's rows and state into this rank's shard (its own hot rows only; no communication)."""
        if not self.dirty:
            return
        with torch.no_grad():
            shard[self.owned_local] = self.weight[self.owned_slots]
        main = _raw(table_opt).state.get(shard) if table_opt is not None else None
        mine = self.opt.state.get(self.weight) if self.opt is not None else None
        if main and mine:
            for k in ROW_STATE:
                if k in main and k in mine:
                    main[k][self.owned_local] = mine[k][self.owned_slots]
        self.dirty = False

    def _gather(self, local: Tensor, group) -> Tensor:
        out = torch.zeros((self.size, *local.shape[1:]), dtype=local.dtype)
        out[self.owned_slots] = local[self.owned_local]
        dist.all_reduce(out, group=group)
        return out

    def nbytes(self) -> int:
        n = self.weight.numel() * 4 + self.slot.numel() * 4
        if self.opt is not None:
            n += sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                     if isinstance(t, Tensor))
        return n


def _raw(opt):
    """The torch optimizer behind Lightning's LightningOptimizer wrapper."""
    return getattr(opt, "optimizer", opt)


def _copy(v):
    return v.clone() if isinstance(v, Tensor) else v


def draw_share(counts: Tensor, ids: Tensor, alpha: float, negatives: float, positives: float) -> float:
    """The share of a step's draws (``negatives`` ∝ count^alpha and ``positives`` ∝ count per image) that fall on ``ids``."""
    draws = draw_rates(counts, alpha, negatives, positives)
    return float(draws[ids].sum() / draws.sum()) if ids.numel() else 0.0
