"""The fused sparse optimizers against torch.optim.SparseAdam and a brute-force row-wise Adagrad,
the tag table's deduplicating gather against nn.Embedding, and the host-memory helpers."""

import math

import pytest
import torch
from torch import nn

import im2vec.wide.sparse_optim as so
from im2vec.wide.allocator import advise_hugepages, empty_hugepages, tune_malloc
from im2vec.wide.sparse_optim import PARALLEL_ROWS, RowAdagrad, SparseAdam, unique_rows
from im2vec.wide.tag_table import CPUTagTable

PATHS = ["numba", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test on the numba kernels and on the torch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(so, "USE_NUMBA", False)
        monkeypatch.setattr(so, "_stock_sparse_adam", _forbidden)  # the torch path, not the stock one
    else:
        assert so.USE_NUMBA, "numba is a dependency: the fused kernels must be in use"
        # the kernels must really run: the torch fallback would hide a broken fast path
        monkeypatch.setattr(so, "_adam_rows_torch", _forbidden)
        monkeypatch.setattr(so, "_adagrad_rows_torch", _forbidden)
        monkeypatch.setattr(so, "_stock_sparse_adam", _forbidden)
    return request.param


def _forbidden(*args, **kwargs):
    raise AssertionError("a slower path ran than the one under test")


def _grad(v: int, d: int, rows: torch.Tensor, gen: torch.Generator, coalesce: bool) -> torch.Tensor:
    values = torch.randn(rows.numel(), d, generator=gen)
    g = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (v, d), check_invariants=True)
    return g.coalesce() if coalesce else g


def _rows(v: int, n: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    if kind == "duplicates":  # unsorted, with repeats: must be coalesced
        return torch.randint(0, v, (n,), generator=gen)
    return torch.randperm(v, generator=gen)[:n].sort().values  # distinct and sorted (the gather's gradients)


# ---------------------------------------------------------------- SparseAdam == torch.optim.SparseAdam


@pytest.mark.parametrize("n", [40, PARALLEL_ROWS + 90])  # the serial and the parallel kernel
@pytest.mark.parametrize("kind", ["duplicates", "sorted"])
@pytest.mark.parametrize("maximize", [False, True])
def test_sparse_adam_matches_torch(path, n, kind, maximize):
    v, d = 1000, 48
    gen = torch.Generator().manual_seed(n + len(kind) + maximize)
    w0 = torch.randn(v, d, generator=gen)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = SparseAdam([ours], lr=0.01, betas=(0.8, 0.99), eps=1e-6, maximize=maximize)
    stock = torch.optim.SparseAdam([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6, maximize=maximize)
    for step in range(12):
        if step == 6:  # a scheduler's change of lr is honoured
            for o in (opt, stock):
                o.param_groups[0]["lr"] = 0.003
        rows = _rows(v, n, gen, kind)
        g = _grad(v, d, rows, gen, coalesce=step % 3 == 0)
        before = ours.detach().clone()
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        stock.step()
        # the moments are bit-identical (same float32 operations in the same order); the weights
        # differ by at most an ulp or two because torch's vectorized sqrt is not correctly rounded
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[ours][key], stock.state[ref][key], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-6)
        assert opt.state[ours]["step"] == stock.state[ref]["step"] == step + 1
        untouched = torch.ones(v, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(ours.detach()[untouched], before[untouched])
    assert (ours.detach() != w0).any(1).sum() > n  # many rows really moved


def test_sparse_adam_empty_gradient_counts_a_step(path):
    ours, ref = nn.Parameter(torch.ones(10, 4)), nn.Parameter(torch.ones(10, 4))
    opt, stock = SparseAdam([ours], lr=0.1), torch.optim.SparseAdam([ref], lr=0.1)
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4), (10, 4), check_invariants=True)
    for o, p in ((opt, ours), (stock, ref)):
        p.grad = empty.clone()
        o.step()
    assert torch.equal(ours.detach(), torch.ones(10, 4))
    assert opt.state[ours]["step"] == stock.state[ref]["step"] == 1


def test_sparse_adam_state_dicts_move_between_stock_and_fused(path):
    """A checkpoint written with torch.optim.SparseAdam resumes under the fused one, and back."""
    v, d = 300, 16
    gen = torch.Generator().manual_seed(5)
    grads = [_grad(v, d, _rows(v, 60, gen, "duplicates"), gen, False) for _ in range(8)]
    w0 = torch.randn(v, d, generator=gen)

    def run(first, second) -> torch.Tensor:
        p = nn.Parameter(w0.clone())
        opt = first([p], lr=0.02)
        for g in grads[:4]:
            p.grad = g.clone()
            opt.step()
        state = opt.state_dict()
        q = nn.Parameter(p.detach().clone())
        opt2 = second([q], lr=0.02)
        opt2.load_state_dict(state)
        for g in grads[4:]:
            q.grad = g.clone()
            opt2.step()
        assert opt2.state[q]["step"] == 8
        return q.detach()

    ref = run(torch.optim.SparseAdam, torch.optim.SparseAdam)
    torch.testing.assert_close(run(torch.optim.SparseAdam, SparseAdam), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(SparseAdam, torch.optim.SparseAdam), ref, rtol=0, atol=1e-6)


def test_sparse_adam_float64_takes_the_stock_path():
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt, stock = SparseAdam([ours], lr=0.05), torch.optim.SparseAdam([ref], lr=0.05)
    for _ in range(3):
        g = torch.sparse_coo_tensor(torch.randint(0, 50, (1, 20), generator=gen),
                                    torch.randn(20, 8, generator=gen, dtype=torch.float64), (50, 8))
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        stock.step()
    assert torch.equal(ours.detach(), ref.detach())


def test_sparse_adam_rejects_dense_gradients_and_bad_hyperparameters():
    w = nn.Parameter(torch.randn(3, 2))
    w.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        SparseAdam([w]).step()
    for kwargs in ({"lr": 0.0}, {"eps": -1.0}, {"betas": (1.0, 0.9)}):
        with pytest.raises(ValueError):
            SparseAdam([w], **kwargs)


# ---------------------------------------------------------------- row-wise Adagrad (float32, fused) vs brute force


@pytest.mark.parametrize("n", [30, PARALLEL_ROWS + 50])
def test_row_adagrad_float32_matches_brute_force(path, n):
    v, d, lr, eps = 600, 24, 0.3, 1e-10
    gen = torch.Generator().manual_seed(n)
    w = nn.Parameter(torch.randn(v, d, generator=gen))
    opt = RowAdagrad([w], lr=lr, eps=eps, initial_accumulator_value=0.05)
    ref_w = w.detach().double().clone()
    ref_acc = torch.full((v,), 0.05, dtype=torch.float64)
    for step in range(6):
        rows = _rows(v, n, gen, "duplicates" if step % 2 else "sorted")
        g = _grad(v, d, rows, gen, coalesce=False)
        w.grad = g
        opt.step()
        # brute force, one row at a time in float64: duplicates summed, G += mean(g²), w -= lr g / (√G + eps)
        dense = g.to_dense().double()
        for r in sorted(set(rows.tolist())):
            gi = dense[r]
            ref_acc[r] += math.fsum((gi * gi).tolist()) / d
            ref_w[r] -= lr * gi / (math.sqrt(ref_acc[r]) + eps)
        torch.testing.assert_close(opt.state[w]["sum"].double(), ref_acc, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w.detach().double(), ref_w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the deduplicating gather


@pytest.mark.parametrize("n", [50, PARALLEL_ROWS * 3])
def test_gather_equals_embedding_lookup_and_its_gradient(path, n):
    v, d = 400, 12
    gen = torch.Generator().manual_seed(n)
    counts = torch.randint(1, 100, (v,), generator=gen)
    table = CPUTagTable(counts, d)
    ref = nn.Embedding(v, d, sparse=True, _weight=table.weight.detach().clone())
    ids = torch.randint(0, v, (n // 5, 5), generator=gen)  # many repeats
    up = torch.randn(n // 5, 5, d, generator=gen)

    rows = table.gather(ids, "cpu")
    expected = ref(ids)
    assert rows.shape == (n // 5, 5, d)
    assert torch.equal(rows, expected)
    (rows * up).sum().backward()
    (expected * up).sum().backward()

    grad = table.weight.grad
    idx = grad._indices()[0]
    assert torch.equal(idx, ids.unique())  # each distinct row once, sorted: nothing left to coalesce
    assert unique_rows(grad)[0].data_ptr() == idx.data_ptr()  # ... and the optimizer does not coalesce
    torch.testing.assert_close(grad.to_dense(), ref.weight.grad.to_dense(), rtol=0, atol=1e-6)


def test_gather_bf16_rows_return_an_fp32_gradient():
    table = CPUTagTable(torch.ones(30), 8)
    rows = table.gather(torch.tensor([3, 3, 7]), "cpu", torch.bfloat16)
    assert rows.dtype == torch.bfloat16
    rows.float().sum().backward()
    g = table.weight.grad.coalesce()
    assert g.dtype == torch.float32 and g.indices()[0].tolist() == [3, 7]
    assert torch.equal(g.values()[0], torch.full((8,), 2.0))


def test_unique_rows_coalesces_only_when_needed():
    v, d = 20, 3
    sorted_grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 9]]), torch.randn(3, d), (v, d))
    idx, vals = unique_rows(sorted_grad)
    assert idx.tolist() == [1, 4, 9] and vals.data_ptr() == sorted_grad._values().data_ptr()
    messy = torch.sparse_coo_tensor(torch.tensor([[9, 1, 9, 4]]), torch.ones(4, d), (v, d))
    idx, vals = unique_rows(messy)
    assert idx.tolist() == [1, 4, 9] and vals[2].tolist() == [2.0] * d


# ---------------------------------------------------------------- host memory


def test_tune_malloc_respects_the_users_choice(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert tune_malloc() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("IM2VEC_MALLOC_TUNING", "0")
    assert tune_malloc() is False


def test_huge_page_advice_only_for_large_cpu_tensors():
    assert advise_hugepages(torch.empty(100)) is False  # too small to hold a 2 MiB page
    t = empty_hugepages(3000, 1024)  # 12 MB
    assert t.shape == (3000, 1024) and t.dtype == torch.float32
    like = empty_hugepages(like=t)
    assert like.shape == t.shape and like.data_ptr() != t.data_ptr()


HAMMER = """
import threading, torch
import im2vec.wide.sparse_optim as so
so.set_table_threads(2)
table = torch.randn(20_000, 16)
def gather():
    rows = torch.arange(0, 20_000, 3)
    for _ in range(100):
        so.gather_rows(table.detach(), rows)
def update():
    p = torch.nn.Parameter(torch.randn(20_000, 16))
    opt = so.SparseAdam([p], lr=1e-3)
    rows = torch.arange(1, 20_000, 2)
    for _ in range(100):
        p.grad = torch.sparse_coo_tensor(rows[None], torch.randn(len(rows), 16), p.shape)
        opt.step()
        so.gather_rows(p.detach(), rows)
threads = [threading.Thread(target=f) for f in (gather, update, gather)]
for t in threads: t.start()
for t in threads: t.join()
print("ok")
"""


def test_two_threads_can_launch_the_parallel_kernels_at_once():
    """numba's workqueue layer aborts the process (exit 134, "Concurrent access has been detected") when two threads
    launch parallel kernels at once: a callback gathering rows beside the table worker's update must not kill the
    run. In a child process, so that an abort fails this test instead of killing pytest."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", HAMMER], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
