"""The table's side of a training step, kept off the trunk's critical path.

A step's CPU work on the tag table is: draw the ids (``draw_ids``), deduplicate them, read their
rows, send the rows to the trunk's device, and, after backward, bring the rows' gradient back and
update those rows (SparseAdam). On a GPU none of it needs to stall the trunk:

- every host↔device copy goes through a reused **pinned** buffer with ``non_blocking=True`` (a
  copy from pageable memory synchronizes the stream first: the CPU would wait for the trunk's
  forward before it could even queue the head) and, on CUDA, on a side stream whose event the
  head waits for;
- with ``overlap`` the work runs on **one worker thread**, in submission order:

      main thread   | submit prepare(i) | trunk fwd(i) | wait rows(i) | head(i) + backward(i) | ...
      worker thread | [update(i-1)] prepare(i): draw, dedup, gather, copy | ... update(i) on its grad

  ``prepare(i)`` is queued after ``update(i-1)``, so the rows step i reads carry step i-1's update:
  the same arithmetic as the serial step (tests compare both to 1e-6). The table's LR schedule
  steps in the same queue, so each update uses the learning rate the serial step would.

On the CPU the same code runs: streams and pinning are no-ops, and the worker thread overlaps the
table work with the trunk's forward and backward on the other cores (``python -m
im2vec.bench.overlap``). What is left unverified without a GPU: the side stream's ordering (the
head waits for the copy's event; the copy's buffers are only reused after their event).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from im2vec.wide import sparse_optim
from im2vec.wide.sparse_optim import gather_rows


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _alloc(numel: int, dtype: torch.dtype, pin: bool) -> Tensor:
    return torch.empty(numel, dtype=dtype, pin_memory=pin)


def to_device(host: Tensor, device, stream=None) -> Tensor:
    """A host tensor (pinned when the device is a GPU) to ``device`` without blocking the CPU."""
    if stream is None:
        return host.to(device, non_blocking=True)
    with torch.cuda.stream(stream):
        return host.to(device, non_blocking=True)


class HostBuffers:
    """Reused host staging buffers, pinned when the other side is a GPU.

    Each name has two slots used in turn (a copy from one may still be in flight while the other
    fills); a slot is handed out again only after the event recorded on its last copy has passed.
    On the CPU the buffers are ordinary tensors and there are no events."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.pin = is_cuda(self.device)
        self._slots: dict[tuple[str, torch.dtype], list] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        slots = self._slots.setdefault((name, dtype), [[None, None], [None, None], 0])
        turn = slots[2]
        slots[2] = 1 - turn
        buf, event = slots[turn]
        if event is not None:
            event.synchronize()  # the copy that last read (or wrote) this slot is done
            slots[turn][1] = None
        numel = 1
        for n in shape:
            numel *= n
        if buf is None or buf.numel() < numel:
            buf = _alloc(max(numel, int(numel * 1.25)), dtype, self.pin)  # a little headroom: sizes vary by step
            slots[turn][0] = buf
        self._last = slots[turn]
        return buf[:numel].view(shape)

    def copied(self, stream=None) -> None:
        """Mark the buffer last handed out as in flight until the work queued so far on ``stream`` is done."""
        if self.pin:
            event = torch.cuda.Event()
            event.record(stream)
            self._last[1] = event

    def stage(self, name: str, t: Tensor, stream=None) -> Tensor:
        """A CPU tensor to the device through a staging buffer."""
        if not self.pin:
            return to_device(t, self.device)
        buf = self.get(name, tuple(t.shape), t.dtype)
        buf.copy_(t)
        out = to_device(buf, self.device, stream)
        self.copied(stream)
        return out


@dataclass
class HeadInputs:
    """What the head of one step needs on the trunk's device, prepared on the CPU side."""
    uniq: Tensor  # (n,) distinct ids, sorted, CPU
    rows: Tensor  # (n, d) fp32 on the device: the table's rows as of the step's start
    inverse: Tensor  # (N,) positions in ``rows`` of the flattened [positives, negatives], on the device
    pos_shape: tuple[int, ...]
    neg_shape: tuple[int, ...]
    extras: dict[str, Tensor | None]  # negative weights, log sampling probabilities: on the device
    ready: object = None  # a CUDA event the head waits for (the side stream's copies), else None
    prepare_ms: float = 0.0  # the CPU side's time, draw included (set by TagHead._gather_rows)
    route: object = None  # sharded: where the rows' gradient goes (ShardedTagTable.rows_for)
    share: float = 1.0  # sharded: this rank's weight in the mean over all ranks' images


class TableWorker:
    """Runs the table's CPU work, in order: on one worker thread (``overlap``) or inline."""

    def __init__(self, device, overlap: bool):
        self.device = torch.device(device)
        self.overlap = overlap
        self.buffers = HostBuffers(self.device)
        self.grad_buffers = HostBuffers(self.device)
        self.stream = torch.cuda.Stream(self.device) if is_cuda(self.device) else None
        # the worker's own OpenMP thread count (per thread: a new thread would use every core beside the trunk's):
        # the table's share (im2vec.train.threads), else this thread's count
        threads = sparse_optim.TABLE_THREADS or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="im2vec-table", initializer=torch.set_num_threads,
                                        initargs=(threads,)) if overlap else None
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self.update_ms = 0.0  # time spent in table updates (worker side), summed until read
        self.wait_ms = 0.0  # time the main thread waited for prepared rows

    def submit(self, fn, *args) -> Future:
        if self._pool is None:
            f: Future = Future()
            f.set_result(fn(*args))  # inline: an exception propagates at once
            return f
        f = self._pool.submit(fn, *args)
        with self._lock:  # finished work is forgotten, unless it failed: its error surfaces at the next result()
            self._pending = [p for p in self._pending if not p.done() or p.exception() is not None] + [f]
        return f

    def result(self, f: Future):
        t0 = time.perf_counter()
        out = f.result()
        with self._lock:
            failed = next((p for p in self._pending if p.done() and p.exception() is not None), None)
        if failed is not None:  # an earlier update failed: the rows just read may lack it; stop here
            self.drain()
        self.wait_ms += (time.perf_counter() - t0) * 1e3
        return out

    def drain(self) -> None:
        """Wait for everything queued (updates, schedule steps); re-raise the first error."""
        with self._lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            try:
                self.drain()
            finally:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ---- the CPU side of a step
    def prepare(self, weight: Tensor, pos_ids: Tensor, neg_ids: Tensor, extras: dict[str, Tensor | None]
                ) -> HeadInputs:
        """Dedup the ids, read each distinct row once into a staging buffer and send it, with the ``extras``
        (negative weights, log sampling probabilities: small CPU tensors), to the device."""
        ids = torch.cat([pos_ids.flatten(), neg_ids.flatten()])
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        b = self.buffers
        host_rows = b.get("rows", (uniq.numel(), weight.shape[1]), weight.dtype) if b.pin else None
        host_rows = gather_rows(weight.detach(), uniq, out=host_rows)
        return self.stage(uniq, host_rows, inverse, tuple(pos_ids.shape), tuple(neg_ids.shape), extras, staged=True)

    def stage(self, uniq: Tensor, host_rows: Tensor, inverse: Tensor, pos_shape: tuple, neg_shape: tuple,
              extras: dict[str, Tensor | None], staged: bool = False) -> HeadInputs:
        """Rows read on the host (``staged``: already in this worker's pinned "rows" buffer), the positions of the
        flattened [positives, negatives] in them and the ``extras`` -> the device, through pinned buffers on the
        side stream (a GPU), the event to wait for in ``ready``."""
        b, s = self.buffers, self.stream
        if b.pin and staged:
            rows = to_device(host_rows, self.device, s)
            b.copied(s)
        else:
            rows = b.stage("rows", host_rows, s)
        inv = b.stage("inverse", inverse, s)
        moved = {k: None if v is None else b.stage(k, v, s) for k, v in extras.items()}
        ready = None
        if s is not None:
            ready = torch.cuda.Event()
            ready.record(s)
        return HeadInputs(uniq, rows, inv, pos_shape, neg_shape, moved, ready)

    def grad_to_host(self, grad: Tensor) -> tuple[Tensor, object]:
        """The rows' gradient (n, d) to host fp32: into a pinned buffer without blocking on a GPU (returns
        the event to wait for), a plain tensor on the CPU."""
        grad = grad.detach().float()
        if not self.grad_buffers.pin:
            return grad.contiguous(), None
        host = self.grad_buffers.get("grad", tuple(grad.shape), torch.float32)
        host.copy_(grad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.grad_buffers._last[1] = event
        return host, event


def attach_rows(weight: Tensor, prep: HeadInputs, sink) -> Tensor:
    """The prepared rows as a function of the table: backward hands the rows' gradient to ``sink``,
    which returns the table's (sparse) gradient, or None when it applies the update itself."""
    if prep.ready is not None:
        torch.cuda.current_stream(prep.rows.device).wait_event(prep.ready)
        for t in (prep.rows, prep.inverse, *prep.extras.values()):
            if t is not None:
                t.record_stream(torch.cuda.current_stream(prep.rows.device))
    return _TableRows.apply(weight, prep.rows, sink)


class _TableRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor, sink) -> Tensor:
        ctx.sink = sink
        return rows.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.sink(grad), None, None


def sparse_grad(uniq: Tensor, values: Tensor, shape) -> Tensor:
    return torch.sparse_coo_tensor(uniq.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False)
