"""The sharded tag head's step overlapped with the trunk (``optim.overlap``: on by default when the trunk is on a GPU).

Serial, a sharded step runs the exchange on the training thread: share, rows (three ``all_to_all``), the trunk's
forward, the head, backward (DDP's all-reduce of the trunk inside it), the gradients to their owners (one
``all_to_all``, and the hot rows' ``all_reduce``), the table's update. Overlapped, the table's part runs on the
TableWorker's one thread (im2vec/wide/pipeline.py), in submission order, over a gloo group of its own
(``ShardedTagTable.step_group``):

    main thread    | submit rows(i) | trunk fwd(i)  | wait rows(i) | head(i), backward(i): ..............| ...
    worker thread  | [update(i-1)] rows(i): share, draw, exchange, pinned copy | update(i): grads to their
                   |                                                           owners, table + hot step; LR step

- ``rows(i)`` (``_sharded_rows``) is queued when the batch's tag ids are known, before the trunk runs: this rank's
  image count all-reduced (its share of the step), the ids drawn, the distinct rows fetched from their owners and
  the hot rows read from the replica, all copied to the trunk's device through pinned buffers on a side stream;
- ``update(i)`` (``_sharded_update``) is queued from inside backward, as soon as the head's rows have their
  gradient (the first thing backward computes: the loss is at the end of the graph): the gradient comes to pinned
  host memory (an event, not a synchronization), then goes to its owners while the trunk's backward continues;
- ``rows(i+1)`` is queued after ``update(i)``: the rows a step reads carry every earlier update, the same arithmetic
  as the serial step (tests: W = 2, overlapped against serial, table and moments to 1e-6).
- the worker sets the shard's gradient and steps it: the caller clears the table optimizer's gradients only after
  ``loss`` (which waits for rows(i), queued after update(i-1)), as the module's training step does, never before.

**Why it cannot deadlock.** Three kinds of wait exist: a main thread waits for its own worker (the rows, a drain);
a main thread waits for the other ranks' main threads (DDP's all-reduce on the default group; the per-step stop
flag, validation and checkpoints on ``ShardedTagTable.group``); a worker waits for the other ranks' workers (the
step group). No worker ever waits for a main thread (the gradient's copy is an event recorded before the job is
queued), so there is no cycle, provided every rank's worker runs the same collectives in the same order. They do:
each rank queues rows(i), update(i) and the LR step in that order, every step, whatever its batch holds — a rank
whose batch is empty, or whose backward raised, still queues an update (with no rows or zero gradients), and the
main thread drains the worker before validation or a checkpoint touches the table (tested with 2 gloo ranks, one
empty, beside an all-reduce on the default group in backward as DDP's, all under 30 s group timeouts).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from im2vec.wide.head import head_extras, loss_on_rows
from im2vec.wide.pipeline import HeadInputs, attach_rows


class ShardedOverlap:
    """The overlapped sharded step for ``TagHead`` (needs its table, worker, draw, cfg, tag_map, _decide_hot,
    _table_step and _raw_opt)."""

    _route = None  # this step's routing of the rows' gradient, until its update is queued

    def _share_step(self, n: int) -> float:
        """Every rank, first in each step: its weight in the mean over all ranks' images; the hot rows once."""
        share = self.table.share(n)
        self._decide_hot()
        return share

    def _sharded_rows(self, tags: Tensor) -> HeadInputs:
        """On the worker thread: share, draw, the distinct rows from their owners (and the replica), to the device."""
        t0 = time.perf_counter()
        share = self._share_step(tags.shape[0])
        pos_ids, neg_ids, weight = self.draw(tags)
        extras = head_extras(self.cfg, self.table.log_counts, pos_ids, neg_ids, weight)
        uniq, inverse = torch.unique(torch.cat([pos_ids.flatten(), neg_ids.flatten()]), sorted=True,
                                     return_inverse=True)
        rows, route = self.table.rows_for(uniq)
        prep = self.worker.stage(uniq, rows, inverse, tuple(pos_ids.shape), tuple(neg_ids.shape), extras)
        prep.route, prep.share = route, share
        prep.prepare_ms = (time.perf_counter() - t0) * 1e3
        return prep

    def _sharded_overlap_loss(self, u: Tensor, future) -> tuple[Tensor, Tensor, Tensor]:
        w = self.worker
        rows_in = w.result(future)
        self._prepare_ms += rows_in.prepare_ms
        self._share, self._route, self._rows_n = rows_in.share, rows_in.route, rows_in.uniq.numel()
        if u.shape[0] == 0:  # no images: loss 0, joined to the trunk; backward queues the (empty) update
            zero = u.sum() * 0.0
            return zero, zero.detach(), zero.detach()

        def sink(grad: Tensor):  # in backward, as soon as the rows have their gradient
            self._queue_update(*w.grad_to_host(grad))
            return None

        rows = attach_rows(self.table.weight, rows_in, sink)
        if self.tag_map is not None:
            rows = self.tag_map(rows_in.uniq, rows)
        rows = rows.index_select(0, rows_in.inverse)
        return loss_on_rows(self.cfg, u, rows, rows_in.pos_shape, rows_in.neg_shape, rows_in.extras)

    def _queue_update(self, host: Tensor, event) -> None:
        route, self._route = self._route, None
        if route is None:
            raise RuntimeError("the sharded step's rows got a gradient twice in one step")
        self.worker.submit(self._sharded_update, host, event, route)

    def _sharded_overlap_backward(self, loss: Tensor, backward) -> None:
        try:  # weighted by this rank's share: the W ranks' average is the mean over all their images
            backward(loss if self._share == 1.0 else loss * self._share)
        finally:
            if self._route is not None:  # no gradient reached the rows (no images, or backward raised): the other
                self._queue_update(torch.zeros(self._rows_n, self.table.dim), None)  # ranks wait in this exchange

    def _sharded_update(self, host: Tensor, event, route) -> None:
        """On the worker thread: the gradient to its owners, the shard's update, the replica's update."""
        if event is not None:
            event.synchronize()
        t0 = time.perf_counter()
        p = self.table.weight
        self.table.reduce_grad(host, route)
        try:
            self._table_step()
        finally:
            p.grad = None
        self.table.step_hot(self._raw_opt)
        self.worker.update_ms += (time.perf_counter() - t0) * 1e3
