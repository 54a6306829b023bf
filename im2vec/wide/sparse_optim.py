"""Sparse optimizers for the CPU tag table, fused into one pass over the rows a step touched.

``torch.optim.SparseAdam`` spends most of a step outside the arithmetic: it coalesces the gradient
on one thread, then builds several sparse tensors and about a dozen temporaries of the touched rows
and adds them into the dense state one by one (``sparse_mask``, ``add_``). Here a step is:

1. the touched rows, once and sorted: the gradient's indices when they are already distinct and
   sorted (the tag table's ``gather`` produces such gradients: it deduplicates the ids before the
   forward pass), otherwise one coalesce;
2. one kernel that, for each touched row and in parallel over rows, reads the gradient, the
   weights and the state once, and writes the weights and the state once: the least memory traffic
   the update can have (the bandwidth floor of ``python -m im2vec.bench``).

The kernel is compiled by numba (a dependency). Without numba the same arithmetic runs as torch
gather / update / scatter on the touched rows, which is slower but still far from the stock path.

``SparseAdam`` is a drop-in for ``torch.optim.SparseAdam``: the same hyperparameters, the same state
(``step``, ``exp_avg``, ``exp_avg_sq``, so checkpoints move between the two) and the same float32
operations in the same order: the moments come out bit-identical and the weights within 1e-6 (an
ulp where torch's vectorized square root is not correctly rounded; tests check both paths).
Parameters that are not contiguous float32 CPU tensors take the stock code path.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np
import torch
from torch import Tensor

from im2vec.errors import BadValue
from im2vec.wide.allocator import empty_hugepages

try:  # numba compiles the fused kernels; without it the torch path below runs
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool: its threads sleep between kernels instead of spinning beside
        # torch's OpenMP threads (a second OpenMP runtime would), and it needs no extra package
        os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised by forcing USE_NUMBA = False in the tests
    numba = None

USE_NUMBA = numba is not None  # tests switch this off to check the torch path
_stock_sparse_adam = torch.optim._functional.sparse_adam  # for what neither fast path takes (not fp32 CPU)


if numba is not None:
    # Each kernel is a per-row (or per-block) function called from a parallel loop and from a serial
    # one: numba's thread pool costs ~0.1-0.3 ms to wake on a small VM, more than a few hundred rows
    # take. (Two dispatchers of one Python function would share numba's cache file and load each
    # other's code: hence the separate functions.)
    @njit(cache=True, nogil=True)
    def _adam_row(w, m, v, r, g, i, c1, c2, eps, neg_step):  # pragma: no cover - compiled
        # torch.optim.SparseAdam's float32 operations, in its order (see _adam_rows_torch)
        for j in range(g.shape[1]):
            gj = g[i, j]
            mo = m[r, j]
            vo = v[r, j]
            mn = mo + (gj - mo) * c1
            vn = vo + (gj * gj - vo) * c2
            m[r, j] = mn
            v[r, j] = vn
            w[r, j] = w[r, j] + neg_step * (mn / (np.float32(np.sqrt(vn)) + eps))  # float32 throughout

    @njit(cache=True, nogil=True)
    def _lazy_adam_row(w, m, v, t, r, g, i, c1, c2, eps, lr, b1, b2):  # pragma: no cover - compiled
        # the row's own step count in the bias correction: a row first touched late starts like a new one
        n = t[r] + 1
        t[r] = n
        neg_step = np.float32(-lr * np.sqrt(1.0 - b2**n) / (1.0 - b1**n))
        _adam_row(w, m, v, r, g, i, c1, c2, eps, neg_step)

    @njit(parallel=True, cache=True, nogil=True)
    def _lazy_adam_rows(w, m, v, t, idx, g, c1, c2, eps, lr, b1, b2):  # pragma: no cover - compiled
        for i in prange(g.shape[0]):
            _lazy_adam_row(w, m, v, t, idx[i], g, i, c1, c2, eps, lr, b1, b2)

    @njit(cache=True, nogil=True)
    def _lazy_adam_rows_serial(w, m, v, t, idx, g, c1, c2, eps, lr, b1, b2):  # pragma: no cover - compiled
        for i in range(g.shape[0]):
            _lazy_adam_row(w, m, v, t, idx[i], g, i, c1, c2, eps, lr, b1, b2)

    @njit(parallel=True, cache=True, nogil=True)
    def _adam_rows(w, m, v, idx, g, c1, c2, eps, neg_step):  # pragma: no cover - compiled
        for i in prange(g.shape[0]):
            _adam_row(w, m, v, idx[i], g, i, c1, c2, eps, neg_step)

    @njit(cache=True, nogil=True)
    def _adam_rows_serial(w, m, v, idx, g, c1, c2, eps, neg_step):  # pragma: no cover - compiled
        for i in range(g.shape[0]):
            _adam_row(w, m, v, idx[i], g, i, c1, c2, eps, neg_step)

    # reassoc: the sum of squares may be vectorized (summed in another order than torch's mean)
    @njit(cache=True, nogil=True, fastmath={"reassoc"})
    def _adagrad_block(w, acc, idx, g, scale, lo, hi, neg_lr, eps):  # pragma: no cover - compiled
        # first the block's accumulators (independent loads the CPU can overlap), then its rows
        d = g.shape[1]
        for i in range(lo, hi):
            s = np.float32(0.0)
            for j in range(d):
                s += g[i, j] * g[i, j]
            a = acc[idx[i]] + s / np.float32(d)
            acc[idx[i]] = a
            scale[i] = neg_lr / (np.float32(np.sqrt(a)) + eps)
        for i in range(lo, hi):
            r = idx[i]
            for j in range(d):
                w[r, j] = w[r, j] + g[i, j] * scale[i]

    @njit(parallel=True, cache=True, nogil=True)
    def _adagrad_rows(w, acc, idx, g, neg_lr, eps):  # pragma: no cover - compiled
        n = g.shape[0]
        scale = np.empty(n, np.float32)
        for b in prange((n + 15) // 16):
            _adagrad_block(w, acc, idx, g, scale, b * 16, min(n, b * 16 + 16), neg_lr, eps)

    @njit(cache=True, nogil=True)
    def _adagrad_rows_serial(w, acc, idx, g, neg_lr, eps):  # pragma: no cover - compiled
        n = g.shape[0]
        scale = np.empty(n, np.float32)
        for b in range((n + 15) // 16):
            _adagrad_block(w, acc, idx, g, scale, b * 16, min(n, b * 16 + 16), neg_lr, eps)

    @njit(cache=True, nogil=True)
    def _strictly_increasing(idx):  # pragma: no cover - compiled
        for i in range(1, idx.shape[0]):
            if idx[i] <= idx[i - 1]:
                return False
        return True

    @njit(parallel=True, cache=True, nogil=True)
    def _gather_rows(w, idx, out):  # pragma: no cover - compiled
        for i in prange(idx.shape[0]):
            out[i, :] = w[idx[i], :]

    @njit(cache=True, nogil=True)
    def _gather_rows_serial(w, idx, out):  # pragma: no cover - compiled
        for i in range(idx.shape[0]):
            out[i, :] = w[idx[i], :]

PARALLEL_ROWS = 256  # fewer touched rows than this: the serial kernel
MOVED_CHUNK_ROWS = 1 << 16  # rows read at a time when a global-count state turns lazy: never a V×d boolean tensor
TABLE_THREADS: int | None = None  # numba threads for the table's kernels (im2vec.train.threads); None: torch's count


def set_table_threads(n: int | None) -> None:
    """The number of threads the table's kernels use (None: follow torch.get_num_threads())."""
    global TABLE_THREADS
    TABLE_THREADS = None if n is None else max(1, int(n))


# numba's workqueue layer aborts the whole process ("Concurrent access has been detected", exit 134) when two
# threads launch parallel kernels at once (the table worker's update beside, say, a callback gathering rows):
# one parallel launch at a time in this process, the others wait their turn (the serial kernels need no lock)
_PARALLEL_LAUNCH = threading.Lock()


def _kernel(parallel, serial, rows: int):
    """The serial kernel, or the parallel one behind the launch lock."""
    if rows < PARALLEL_ROWS:
        return serial
    return functools.partial(_launch, parallel)


def _launch(parallel, *args) -> None:
    n = max(1, min(TABLE_THREADS or torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    with _PARALLEL_LAUNCH:
        if numba.get_num_threads() != n:  # numba's count is per thread: the table worker thread sets its own
            numba.set_num_threads(n)
        parallel(*args)


def _cpu_contiguous(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def zeros_state(p: Tensor) -> Tensor:
    """Zeros shaped like ``p``, on huge pages when ``p`` is a large CPU tensor (im2vec.wide.allocator)."""
    if p.device.type != "cpu":
        return torch.zeros_like(p, memory_format=torch.contiguous_format)
    return empty_hugepages(like=p).zero_()


def unique_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """A sparse (V, d) gradient -> (rows (n,) int64 unique and sorted, values (n, d) contiguous)."""
    rows = grad._indices()[0]
    # autograd drops the "coalesced" flag when it stores a gradient; strictly increasing indices
    # (what the tag table's gather produces) are coalesced by definition
    if not grad.is_coalesced() and not _increasing(rows):
        grad = grad.coalesce()  # one sort and segment-sum
        rows = grad._indices()[0]
    return rows.contiguous(), grad._values().contiguous()


def _increasing(rows: Tensor) -> bool:
    if rows.numel() < 2:
        return True
    if USE_NUMBA and rows.dtype == torch.int64 and rows.device.type == "cpu":
        return _strictly_increasing(rows.contiguous().numpy())
    return bool((rows[1:] > rows[:-1]).all())


def gather_rows(weight: Tensor, rows: Tensor, out: Tensor | None = None) -> Tensor:
    """weight[rows] for a (V, d) CPU table, rows copied in parallel (into ``out`` when given: a reused,
    possibly pinned, (n, d) staging buffer)."""
    if out is None:
        out = torch.empty(rows.numel(), weight.shape[1], dtype=weight.dtype)
    if USE_NUMBA and weight.dtype == torch.float32 and _cpu_contiguous(weight, out) and rows.dtype == torch.int64:
        if rows.numel():
            _kernel(_gather_rows, _gather_rows_serial, rows.numel())(
                weight.numpy(), rows.contiguous().numpy(), out.numpy())
        return out
    return torch.index_select(weight, 0, rows, out=out)


def _adam_rows_torch(w, m, v, idx, g, c1, c2, eps, neg_step) -> None:
    """The same update with torch ops on the touched rows (gather, update, scatter)."""
    mo, vo, wr = m.index_select(0, idx), v.index_select(0, idx), w.index_select(0, idx)
    mn = mo.add_(g.sub(mo).mul_(c1))  # torch.optim.SparseAdam: old + (g - old)(1 - β1)
    vn = vo.add_(g.pow(2).sub_(vo).mul_(c2))
    wr.add_(mn.div(vn.sqrt().add_(eps)).mul_(neg_step))
    m.index_copy_(0, idx, mn)
    v.index_copy_(0, idx, vn)
    w.index_copy_(0, idx, wr)


def _row_step_sizes(t: Tensor, idx: Tensor, lr: float, beta1: float, beta2: float) -> Tensor:
    """Advance the touched rows' step counts; -> each row's -lr·sqrt(1-β2^t)/(1-β1^t) as (n, 1) float32."""
    n = t.index_select(0, idx).add_(1)
    t.index_copy_(0, idx, n)
    n = n.double()
    return (-lr * (1 - beta2**n).sqrt() / (1 - beta1**n)).float().unsqueeze(1)


def _adagrad_rows_torch(w, acc, idx, g, neg_lr, eps) -> None:
    a = acc.index_select(0, idx).add_(g.pow(2).mean(1))
    acc.index_copy_(0, idx, a)
    w.index_add_(0, idx, g * (neg_lr / a.sqrt().add_(eps)).unsqueeze(1))


class SparseAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam`` ("lazy" Adam: only rows with a gradient move, with the global step
    count in the bias correction), fused into one parallel pass over the touched rows.

    ``row_steps=True`` ("lazy_adam" in the configs) counts steps per row instead (state ``row_step``,
    one int32 per row) and bias-corrects each row with its own count. With the global count a row
    first touched at step 5,000 has moments that are one gradient old but are divided by
    (1 - β1^5000) ≈ 1 and (1 - β2^5000) ≈ 0.99: its first moves are ≈ lr·g/|g|·0.1/sqrt(0.001)
    ≈ 3 × lr, sign-like, whatever the gradient's size. Counted per row, every row's first update
    is Adam's first update (lr · g/|g|), and a rarely seen row decays its moments only when seen.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False, row_steps: bool = False):
        self.row_steps = row_steps
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = zeros_state(p)
                    state["exp_avg_sq"] = zeros_state(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if self.row_steps and "row_step" not in state:
                    # fresh, or state written by the global-count optimizer: rows it moved count as that old
                    moved = torch.cat([c.ne(0).any(1).cpu() for c in v.split(MOVED_CHUNK_ROWS)])  # (V,), by chunks
                    state["row_step"] = torch.zeros(len(moved), dtype=torch.int32).masked_fill_(moved, state["step"] - 1)
                if self.row_steps:
                    self._row_step(p, state, group)
                    continue
                if not (p.dtype == torch.float32 and p.dim() == 2 and _cpu_contiguous(p, m, v)):
                    _stock_sparse_adam(
                        [p], [p.grad], [m], [v], [state["step"]], eps=group["eps"], beta1=beta1,
                        beta2=beta2, lr=float(group["lr"]), maximize=group["maximize"])
                    continue
                idx, g = unique_rows(p.grad)
                if g.numel() == 0:
                    continue
                if group["maximize"]:
                    g = -g
                step = state["step"]
                step_size = float(group["lr"]) * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                f32 = np.float32  # torch casts Python scalars to the tensors' float32 the same way
                args = (f32(1 - beta1), f32(1 - beta2), f32(group["eps"]), f32(-step_size))
                if USE_NUMBA:
                    _kernel(_adam_rows, _adam_rows_serial, idx.numel())(
                        p.numpy(), m.numpy(), v.numpy(), idx.numpy(), g.numpy(), *args)
                else:
                    _adam_rows_torch(p, m, v, idx, g, 1 - beta1, 1 - beta2, group["eps"], -step_size)
        return loss


    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts every state tensor but "step" to the parameter's dtype
            if "row_step" in state:
                state["row_step"] = state["row_step"].to(torch.int32)

    def _row_step(self, p: Tensor, state: dict, group: dict) -> None:
        """The update with per-row step counts (fused kernel, or torch ops on the touched rows)."""
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
        if p.dim() != 2 or p.dtype != torch.float32 or p.device.type != "cpu":
            raise RuntimeError("lazy_adam: the table must be a (V, d) float32 CPU tensor")
        idx, g = unique_rows(p.grad)
        if g.numel() == 0:
            return
        g = -g if group["maximize"] else g
        beta1, beta2 = group["betas"]
        lr, f32 = float(group["lr"]), np.float32
        if USE_NUMBA and _cpu_contiguous(p, m, v, t):
            _kernel(_lazy_adam_rows, _lazy_adam_rows_serial, idx.numel())(
                p.numpy(), m.numpy(), v.numpy(), t.numpy(), idx.numpy(), g.numpy(), f32(1 - beta1), f32(1 - beta2),
                f32(group["eps"]), lr, beta1, beta2)
        else:
            _adam_rows_torch(p, m, v, idx, g, 1 - beta1, 1 - beta2, group["eps"],
                             _row_step_sizes(t, idx, lr, beta1, beta2))


class RowAdagrad(torch.optim.Optimizer):
    """Row-wise sparse Adagrad: one accumulator value per row (V floats instead of Adam's 2·V·d).

    For the touched rows i with (coalesced) gradient g_i:
        G_i += mean(g_i²);   w_i -= lr · g_i / (sqrt(G_i) + eps)
    Untouched rows and their state are left exactly as they were.
    """

    def __init__(self, params, lr: float = 0.1, eps: float = 1e-10, initial_accumulator_value: float = 0.0):
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowAdagrad expects sparse gradients (nn.Embedding(sparse=True))")
                state = self.state[p]
                if not state:
                    state["sum"] = zeros_state(p[:, 0]).fill_(group["initial_accumulator_value"])
                idx, g = unique_rows(p.grad)
                if g.numel() == 0:
                    continue
                neg_lr = -float(group["lr"])
                if USE_NUMBA and p.dtype == torch.float32 and p.dim() == 2 and _cpu_contiguous(p, state["sum"]):
                    _kernel(_adagrad_rows, _adagrad_rows_serial, idx.numel())(
                        p.numpy(), state["sum"].numpy(), idx.numpy(), g.numpy(), np.float32(neg_lr),
                        np.float32(group["eps"]))
                else:
                    _adagrad_rows_torch(p, state["sum"], idx.to(p.device), g, neg_lr, group["eps"])
        return loss


TABLE_OPTIMIZERS = ("lazy_adam", "sparse_adam", "row_adagrad", "torch_sparse_adam")


def make_table_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """'lazy_adam' (the fused SparseAdam with per-row step counts), 'sparse_adam' (the fused SparseAdam,
    = torch.optim.SparseAdam), 'row_adagrad' (for vocabularies whose Adam moments don't fit) or
    'torch_sparse_adam' (the stock optimizer, for comparisons)."""
    if name == "lazy_adam":
        return SparseAdam(params, lr=lr, row_steps=True)
    if name == "sparse_adam":
        return SparseAdam(params, lr=lr)
    if name == "row_adagrad":
        return RowAdagrad(params, lr=lr)
    if name == "torch_sparse_adam":
        return torch.optim.SparseAdam(params, lr=lr)
    raise BadValue(f"optim.table_optimizer={name!r} is not a table optimizer", f"use one of {', '.join(TABLE_OPTIMIZERS)}")
