"""The wide part behind one face: ``TagHead`` owns the tag table, the samplers, the loss, the table optimizer's
step, the worker thread and the sharded exchange. A training step talks to it four times, in order:

    prep = head.prepare(tags, device)         # as soon as the batch's tag ids are known (before the trunk runs)
    loss, s_pos, s_neg = head.loss(u, prep)   # u (B, d) on the trunk's device; fp32 whatever the autocast
    head.backward(loss, backward)             # the rows' gradient to the table (and, sharded, to its owners)
    head.step(opt_table, table_sched)         # the table's update and its LR schedule

and whichever variant runs stays behind those four calls (as fastText puts softmax, one-vs-all and negative
sampling behind one output-layer interface, and torchrec hides sharding behind an embedding collection):

- ``pipelined`` (a sampled head, one device): the draw, dedup, gather and copy go through the TableWorker
  (im2vec/wide/pipeline.py), inline, or on its thread while the trunk runs (``overlap``: a GPU trunk), where
  the update is queued too; the same arithmetic either way;
- ``sharded`` (a sampled head, rows spread over ranks: im2vec/wide/sharded_table.py): rows fetched from their
  owners and their gradients sent back, on the step's thread;
- ``full`` (BCE over all V rows: small vocabularies on one device);
- ``serial`` (a sampled head through ``sampled_loss`` on the step's thread: what a subclass that draws its own
  ids gets, and what the benchmark times).

The table and the word-vector map are registered by the LightningModule (their state-dict keys, device moves
and DDP's ignore list are its business); the head holds them and never imports Lightning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from im2vec.errors import BadValue
from im2vec.wide.head import SamplerConfig, draw_ids, head_extras, loss_on_rows, sampled_loss
from im2vec.wide.hot_rows import check_setting as check_hot
from im2vec.wide.hot_rows import choose_hot, draw_share
from im2vec.wide.loss import full_bce_loss, multi_hot
from im2vec.wide.pipeline import HeadInputs, TableWorker, attach_rows, sparse_grad
from im2vec.wide.sampler import NegativeSampler, PositiveSampler
from im2vec.wide.sharded_step import ShardedOverlap
from im2vec.wide.sharded_table import ShardedTagTable, assemble_rows, exchange_group, rank_seed, shard_rows
from im2vec.wide.tag_table import CPUTagTable, make_table_optimizer
from im2vec.wide.tag_vectors import TagVectorMap
from im2vec.wide.table_state import TableStateMixin


@dataclass
class Prepared:
    """One step's head inputs: the drawn ids (``ids``: positives, negatives, negative weights) or, pipelined,
    the TableWorker's HeadInputs (``rows``) or the Future that will hold them (``future``)."""
    tags: Tensor
    ids: tuple | None = None
    rows: HeadInputs | None = None
    future: object = None


def _deferred_table_step(closure=None, **kwargs):
    """The table optimizer's step while its updates are queued on the worker thread (TagHead.start): only
    Lightning's hooks (the closure) run here."""
    if closure is not None:
        closure()
    return None


_deferred_table_step._wrapped_by_lr_sched = True  # torch's LR scheduler: the real (queued) step is still wrapped


class TagHead(TableStateMixin, ShardedOverlap):
    def __init__(self, counts: Tensor, dim: int, sampler: SamplerConfig, table_init_std: float, seed: int,
                 overlap: str | bool = "auto", shard: tuple[int, int] | None = None,
                 tag_map: TagVectorMap | None = None, hot_rows: int | float = 0):
        self.cfg, self.counts, self.seed, self.init_std, self.overlap_setting = sampler, counts, seed, table_init_std, overlap
        check_hot(hot_rows)
        self.hot_setting, self._hot_decided = hot_rows, False  # sharded: rows replicated on every rank (hot_rows.py)
        self._raw_opt = None  # the table optimizer (its state: the hot rows' sync and flush)
        if shard is not None and shard[1] > 1:  # rank r of W (known from the Trainer): only this rank's rows,
            # the same values as one device's table, never the whole table in this process
            self.table = ShardedTagTable(counts, dim, table_init_std, *shard, single_device_rows=True)
        else:
            self.table = CPUTagTable(counts, dim, table_init_std)
        self.tag_map = tag_map  # model.tag_vectors: v_t = r_t + A·w_t
        self.neg_sampler = NegativeSampler(counts, sampler.alpha)
        self.pos_sampler = PositiveSampler(counts, sampler.beta)
        self.gen = torch.Generator().manual_seed(seed)  # all sampling randomness; saved in checkpoints
        self.device = torch.device("cpu")  # the trunk's: where u is, and where the rows go
        self._worker: TableWorker | None = None
        self._table_step = None  # the table optimizer's own step (called on the worker thread with overlap)
        self._table_opt_state = None  # the table optimizer's state read from a checkpoint, restored on the CPU
        self._prepare_ms = 0.0
        self._stats_mark: dict | None = None  # sharded: the exchange's counters at the last log
        self._share = 1.0  # sharded: this rank's weight in the mean over all ranks' images (ShardedTagTable.share)

    # ---- which variant, and where
    @property
    def sharded(self) -> bool:
        return isinstance(self.table, ShardedTagTable)

    @property
    def variant(self) -> str:
        """"full", "sharded", "pipelined" or "serial" (a subclass with its own ``draw`` draws on the step's
        thread: the TableWorker calls only the stock draw)."""
        if self.cfg.head == "full":
            return "full"
        if self.sharded:
            return "sharded"
        return "pipelined" if type(self).draw is TagHead.draw else "serial"

    @property
    def overlap(self) -> bool:
        """Whether the table's CPU work (sharded: its exchange too, im2vec/wide/sharded_step.py) runs on the worker
        thread beside the trunk: optim.overlap, "auto" = on when the trunk is on a GPU."""
        o = self.overlap_setting
        if o == "auto":
            return self.device.type == "cuda"
        return bool(o)

    @property
    def worker(self) -> TableWorker:
        if self._worker is None or self._worker.device != self.device:
            if self._worker is not None:
                self._worker.close()
            self._worker = TableWorker(self.device, self.overlap)
        return self._worker

    @property
    def group(self):
        """The sharded table's process group (gloo, host memory), else None."""
        return self.table.group if self.sharded else None

    def shard(self, rank: int, world: int, timeout_s: float = 1800.0) -> None:
        """Keep only this rank's rows of the table (id % world == rank) and draw from a (seed, rank) stream; the
        caller registers the new ``table``."""
        if self.cfg.head == "full":
            raise BadValue("sampler.head=full scores all V rows on one device: it has no sharded form",
                           "use sampler.head=sampled with trainer=ddp, or train on one device")
        group = exchange_group(timeout_s)
        if self.sharded:  # built for this rank (shard=): the rows are there, the group was not yet
            if (self.table.rank, self.table.world) != (rank, world):
                raise BadValue(f"the table was built for rank {self.table.rank} of {self.table.world}, this is rank "
                               f"{rank} of {world}", "build the module with shard=(trainer.global_rank, "
                               "trainer.world_size)")
            self.table.group = group
        else:  # built whole: keep this rank's rows of the seeded initial table (the same on every rank)
            full = self.table.weight.detach()
            self.table = ShardedTagTable(self.counts, self.table.dim, self.init_std, rank, world, group, full=full)
            del full
        self.table.step_group = exchange_group(timeout_s)  # the step's exchange: the worker thread's, with overlap
        self.gen = torch.Generator().manual_seed(rank_seed(self.seed, rank))
        self._hot_decided = False

    # ---- a step: prepare -> loss -> backward -> step
    def draw(self, tags: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The sampled head's ids for a batch's tags (B, T) on the CPU (im2vec.wide.head.draw_ids)."""
        return draw_ids(self.cfg, self.pos_sampler, self.neg_sampler, tags, self.gen)

    def prepare(self, tags: Tensor, device: torch.device) -> Prepared:
        """What the step's head needs, started as soon as the batch's tag ids are known: pipelined, the rows
        gathered and copied (on the worker thread while the trunk runs, with overlap)."""
        self.device = torch.device(device)
        variant = self.variant
        if variant == "full" or (tags.shape[0] == 0 and variant != "sharded"):  # (sharded: the exchange even so)
            return Prepared(tags)
        if variant == "sharded" and self.overlap:  # share, draw and exchange on the worker while the trunk runs
            return Prepared(tags, future=self.worker.submit(self._sharded_rows, tags))
        if variant != "pipelined":
            return Prepared(tags, ids=self.draw(tags))
        if self.overlap:
            return Prepared(tags, future=self.worker.submit(self._gather_rows, tags))
        return Prepared(tags, rows=self._gather_rows(tags))

    def _gather_rows(self, tags: Tensor) -> HeadInputs:
        """The CPU side of a pipelined step: draw the ids, dedup, gather, copy to the trunk's device."""
        t0 = time.perf_counter()
        pos_ids, neg_ids, weight = self.draw(tags)
        extras = head_extras(self.cfg, self.table.log_counts, pos_ids, neg_ids, weight)
        prep = self.worker.prepare(self.table.weight, pos_ids, neg_ids, extras)
        prep.prepare_ms = (time.perf_counter() - t0) * 1e3  # the draw included
        return prep

    def loss(self, u: Tensor, prep: Prepared) -> tuple[Tensor, Tensor, Tensor]:
        """u (B, d) on the trunk's device -> (loss, mean positive score, mean negative score), in fp32 whatever
        the trunk's precision (bf16 would sum a repeated row's gradient in bf16)."""
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            if self.sharded and prep.future is not None:  # overlapped: the exchange ran on the worker
                return self._sharded_overlap_loss(u, prep.future)
            if self.sharded:  # every rank, before the exchange: how many images each rank brings
                self._share = self._share_step(u.shape[0])
            if u.shape[0] == 0:  # an empty batch: no mean over 0 images (NaN); sharded, the exchange all the same
                return self._empty_loss(u, prep)
            if self.cfg.head == "full":
                every = torch.arange(self.table.num_tags)
                rows = self.table.lookup(every, u.device, torch.float32)  # (V, d)
                if self.tag_map is not None:
                    rows = self.tag_map(every, rows)
                return full_bce_loss(u, rows, multi_hot(prep.tags, self.table.num_tags).to(u.device))
            if prep.ids is not None:  # serial or sharded: the rows gathered (from their owners) here
                return sampled_loss(self.cfg, self.table, u, *prep.ids, row_map=self.tag_map)
            return self._pipelined_loss(u, prep)

    def _decide_hot(self) -> None:
        """Sharded, at the first step with images (every rank alike: from the all-reduced image count): replicate the
        rows a rank's batch draws most (``optim.hot_rows``), synced from their owners (a collective)."""
        if self._hot_decided or not self.hot_setting or self.table.images == 0:
            return
        self._hot_decided = True
        c = self.cfg
        negatives = 0 if c.loss == "in_batch" else c.num_negatives
        batch = self.table.images / self.table.world
        if c.negatives == "shared":
            negatives = negatives / batch
        ids = choose_hot(self.counts, self.hot_setting, c.alpha, batch, negatives, c.num_positives)
        self.table.set_hot(ids, self._raw_opt)
        if self.table.rank == 0:
            share = draw_share(self.counts, ids, c.alpha, negatives, c.num_positives)
            print(f"im2vec: optim.hot_rows={self.hot_setting}: {ids.numel():,} of {self.table.num_tags:,} rows kept on every "
                  f"rank ({share:.0%} of the draws), the rest sharded over {self.table.world} ranks")

    def _empty_loss(self, u: Tensor, prep: Prepared) -> tuple[Tensor, Tensor, Tensor]:
        """Loss 0 for a batch of no images, still joined to the trunk (u (0, d)), so backward runs as on any
        step (DDP's all-reduce included); sharded, this rank still asks for its (no) rows and serves the others',
        and reduce_grads sends nothing back."""
        if self.sharded:
            self.table.gather(torch.empty(0, dtype=torch.long), u.device, u.dtype)
        zero = u.sum() * 0.0  # ()
        return zero, zero.detach(), zero.detach()

    def _pipelined_loss(self, u: Tensor, prep: Prepared) -> tuple[Tensor, Tensor, Tensor]:
        w = self.worker
        rows_in = w.result(prep.future) if prep.future is not None else prep.rows
        self._prepare_ms += rows_in.prepare_ms
        weight = self.table.weight

        def sink(grad: Tensor):  # the rows' gradient, in backward
            host, event = w.grad_to_host(grad)
            if not w.overlap:  # serial: the table's sparse gradient, stepped by opt_table.step()
                if event is not None:
                    event.synchronize()
                return sparse_grad(rows_in.uniq, host, weight.shape)
            w.submit(self._update_table, rows_in.uniq, host, event)  # overlapped: the update starts now
            return None

        rows = attach_rows(weight, rows_in, sink)  # (n distinct, d)
        if self.tag_map is not None:
            rows = self.tag_map(rows_in.uniq, rows)
        rows = rows.index_select(0, rows_in.inverse)
        return loss_on_rows(self.cfg, u, rows, rows_in.pos_shape, rows_in.neg_shape, rows_in.extras)

    def _update_table(self, uniq: Tensor, host: Tensor, event) -> None:
        """On the worker thread: one table update with the rows' gradient (the LR is the serial step's: the
        schedule steps in the same queue)."""
        if event is not None:
            event.synchronize()
        p = self.table.weight
        t0 = time.perf_counter()
        p.grad = sparse_grad(uniq, host, p.shape)
        try:
            self._table_step()
        finally:
            p.grad = None
        self.worker.update_ms += (time.perf_counter() - t0) * 1e3

    def backward(self, loss: Tensor, backward) -> None:
        """``backward(loss)`` (the LightningModule's manual_backward: DDP all-reduces the trunk in it), then,
        sharded, the rows' gradients to their owners (on every rank, also when backward failed: the other
        ranks wait in that exchange)."""
        # outside the trunk's autocast (Lightning calls training_step, and so this, inside it): built-in ops'
        # backward keeps its forward's dtypes either way, but the head's custom backward (the rows' gradient on its
        # way to the table) would run in bf16 under it (tests/test_bf16_step.py)
        with torch.autocast(loss.device.type, enabled=False):
            if not self.sharded:
                backward(loss)
                return
            if self.overlap:  # the rows' gradient goes to its owners on the worker, from inside backward
                self._sharded_overlap_backward(loss, backward)
                return
            try:  # weighted by this rank's share: the W ranks' average is the mean over all their images
                backward(loss if self._share == 1.0 else loss * self._share)
            finally:
                self.table.reduce_grads()

    def step(self, opt_table, table_sched) -> None:
        """The table's update and its LR schedule: here, or (overlap) queued on the worker after the update that
        the backward pass already queued."""
        deferred = self.variant in ("pipelined", "sharded") and self.overlap
        stepped = self.table.weight.grad is not None  # (a subclass's loss may not touch the table)
        t0 = time.perf_counter()
        opt_table.step()  # with overlap: only Lightning's bookkeeping, the update itself is queued (_table_step)
        if self.sharded and not deferred:
            self._raw_opt = opt_table
            self.table.step_hot(opt_table)  # the replicated rows' update (the learning rate before the schedule steps)
        if deferred:
            self.worker.submit(table_sched.step)  # after this step's update, before the next one's
            return
        table_sched.step()
        if stepped:
            self.worker.update_ms += (time.perf_counter() - t0) * 1e3

    def logs(self, batches: int) -> dict[str, float]:
        """The table's time per step over the last ``batches`` steps (and, sharded, its exchange per step: bytes, ms);
        resets the sums."""
        w, n = self.worker, max(1, batches)
        out = {"train/table_update_ms": w.update_ms / n, "train/table_prepare_ms": self._prepare_ms / n,
               "train/table_wait_ms": w.wait_ms / n}
        w.update_ms = w.wait_ms = self._prepare_ms = 0.0
        if self.sharded:
            st, mark = dict(self.table.stats), self._stats_mark or {}
            out.update({f"dist/{k}": (v - mark.get(k, 0)) / n for k, v in st.items() if k != "exchange_s"})
            out["dist/exchange_ms"] = (st["exchange_s"] - mark.get("exchange_s", 0.0)) * 1e3 / n
            self._stats_mark = st
        return out

    # ---- around training
    def make_optimizer(self, kind: str, lr: float):
        return make_table_optimizer(kind, [self.table.weight], lr)

    def start(self, raw_opt, device: torch.device) -> None:
        """At the start of fit: with overlap, the table optimizer's step is queued on the worker (Lightning's
        opt_table.step() then runs only its bookkeeping and hooks); a checkpoint's table optimizer state goes
        in, in host memory (kept out of Lightning's restore, which moves every state tensor to the trunk's device)."""
        self.device = torch.device(device)
        self._table_step, self._raw_opt = raw_opt.step, raw_opt
        if self.variant in ("pipelined", "sharded") and self.overlap:
            raw_opt.step = _deferred_table_step
        self.restore_optimizer_state(raw_opt)

    def end(self, raw_opt) -> None:
        self.drain()
        if self._table_step is not None and vars(raw_opt).get("step") is _deferred_table_step:
            raw_opt.step = self._table_step  # the optimizer steps itself again (outside fit)

    def drain(self) -> None:
        """Wait for the table's queued work (updates, schedule steps): before anything reads the table."""
        if self._worker is not None:
            self._worker.drain()
        if self.sharded:  # the replicated rows back into their owners' shards
            self.table.flush_hot(self._raw_opt)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def full_table(self) -> Tensor | None:
        """The whole (V, d) tag vectors: the table itself on one device; assembled on rank 0 when sharded (every
        rank must call it; None on the others); r_t + A·w_t with tag vectors."""
        self.drain()
        table = self.table.assemble() if self.sharded else self.table.weight.detach()
        if table is not None and self.tag_map is not None:
            table = self.tag_map.full(table)
        return table

    def own_vectors(self, first: int = 0) -> tuple[Tensor, Tensor | None]:
        """The tag vectors to score with, never the whole table on one rank: (this rank's rows (n_r, d): ids rank,
        rank + W, … when sharded, all V on one device; the ``first`` tags' (the most frequent: the projector's) on
        rank 0, from their owners, None elsewhere). r_t + A·w_t with tag vectors. Sharded: every rank calls it."""
        self.drain()
        rows, t = self.table.weight.detach(), self.table
        if not self.sharded:
            rows = rows if self.tag_map is None else self.tag_map.full(rows)
            return rows, rows[:first]
        if self.tag_map is not None:
            rows = self.tag_map.full(rows, ids=torch.arange(t.rank, t.num_tags, t.world))
        first = min(first, t.num_tags)
        return rows, assemble_rows(rows[: shard_rows(first, t.rank, t.world)], first, t.rank, t.world, t.group)
