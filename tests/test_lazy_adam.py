"""The table optimizer "lazy_adam" (``SparseAdam(row_steps=True)``): Adam per row with the row's own
step count in the bias correction, against a float64 brute force, on the numba kernels (serial and
parallel) and on the torch fallback; the first move of a row first touched late; moving state from
the global-count ``sparse_adam``; checkpoints; bad inputs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import im2vec.wide.sparse_optim as so
from im2vec.wide.sparse_optim import SparseAdam, make_table_optimizer


def _coo(indices, values, shape) -> torch.Tensor:
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)


def _forbidden(*args, **kwargs):
    raise AssertionError("a path ran that is not the one under test")


class _Counting:
    """Wraps the function that must run, so that a test can assert it really ran."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


PATHS = ["numba-serial", "numba-parallel", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch, one_thread):
    """Pin one implementation: the other ones raise, and the pinned one counts its calls."""
    monkeypatch.setattr(so, "_stock_sparse_adam", _forbidden)  # never the stock code path
    if request.param == "torch":
        monkeypatch.setattr(so, "USE_NUMBA", False)
        monkeypatch.setattr(so, "_lazy_adam_rows", _forbidden, raising=False)
        monkeypatch.setattr(so, "_lazy_adam_rows_serial", _forbidden, raising=False)
        ran = _Counting(so._adam_rows_torch)
        monkeypatch.setattr(so, "_adam_rows_torch", ran)
        return ran
    assert so.USE_NUMBA, "numba is a dependency: the fused kernels must be in use"
    monkeypatch.setattr(so, "_adam_rows_torch", _forbidden)
    monkeypatch.setattr(so, "_row_step_sizes", _forbidden)
    if request.param == "numba-serial":
        monkeypatch.setattr(so, "PARALLEL_ROWS", 10**9)
        monkeypatch.setattr(so, "_lazy_adam_rows", _forbidden)
        ran = _Counting(so._lazy_adam_rows_serial)
        monkeypatch.setattr(so, "_lazy_adam_rows_serial", ran)
    else:
        monkeypatch.setattr(so, "PARALLEL_ROWS", 0)
        monkeypatch.setattr(so, "_lazy_adam_rows_serial", _forbidden)
        ran = _Counting(so._lazy_adam_rows)
        monkeypatch.setattr(so, "_lazy_adam_rows", ran)
    return ran


class RefLazyAdam:
    """Brute force, float64, one row at a time: Adam with the row's own step count t_r."""

    def __init__(self, w0: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.w = w0.double().clone()
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.t = [0] * w0.shape[0]
        self.b1, self.b2 = betas
        self.eps = eps

    def step(self, grad: torch.Tensor, lr: float, maximize: bool = False) -> list[int]:
        dense = grad.to_dense().double()  # uncoalesced duplicates summed
        if maximize:
            dense = -dense
        touched = sorted(set(grad._indices()[0].tolist()))
        b1, b2, eps = self.b1, self.b2, self.eps
        for r in touched:
            self.t[r] += 1
            t = self.t[r]
            step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            for j in range(dense.shape[1]):
                g = dense[r, j].item()
                m = b1 * self.m[r, j].item() + (1 - b1) * g
                v = b2 * self.v[r, j].item() + (1 - b2) * g * g
                self.m[r, j], self.v[r, j] = m, v
                self.w[r, j] -= step_size * m / (math.sqrt(v) + eps)
        return touched


def _sparse(rows: list[int], values: torch.Tensor, shape, kind: str) -> torch.Tensor:
    g = _coo(torch.tensor([rows], dtype=torch.long), values, shape)
    if kind == "coalesced":
        g = g.coalesce()
    return g


def _step_rows(v: int, step: int, gen: torch.Generator, kind: str) -> list[int]:
    """Rows of a step's gradient: only rows below a bound that grows with the step, so rows are first
    touched at different steps; rows >= v - 4 are never touched."""
    hi = min(v - 4, 4 + 3 * step)
    n = int(torch.randint(2, 9, (1,), generator=gen))
    if kind == "sorted":  # distinct and sorted, but not flagged coalesced (the tag table's gather)
        return torch.randperm(hi, generator=gen)[: min(n, hi)].sort().values.tolist()
    rows = torch.randint(0, hi, (n,), generator=gen).tolist()
    rows += rows[:2]  # repeated rows, out of order: the duplicates must be summed
    return rows


@pytest.mark.parametrize("maximize", [False, True])
def test_lazy_adam_matches_brute_force(path, maximize):
    v, d, betas, eps = 48, 5, (0.8, 0.99), 1e-6
    gen = torch.Generator().manual_seed(11 + maximize)
    w0 = torch.randn(v, d, generator=gen)
    p = nn.Parameter(w0.clone())
    opt = SparseAdam([p], lr=0.01, betas=betas, eps=eps, maximize=maximize, row_steps=True)
    ref = RefLazyAdam(w0, betas, eps)
    first_touch = {}
    lr = 0.01
    for step in range(1, 21):
        if step == 11:  # a scheduler's lr change is honoured from this step on
            lr = 0.003
            opt.param_groups[0]["lr"] = lr
        kind = ("uncoalesced", "coalesced", "sorted")[step % 3]
        rows = _step_rows(v, step, gen, kind)
        values = torch.randn(len(rows), d, generator=gen) * (0.1 + step % 4)
        g = _sparse(rows, values, (v, d), kind)
        before = {k: t.clone() for k, t in (("w", p.detach()), ("m", opt.state[p].get("exp_avg")),
                                            ("v", opt.state[p].get("exp_avg_sq")),
                                            ("t", opt.state[p].get("row_step"))) if t is not None}
        p.grad = g
        opt.step()
        touched = ref.step(g, lr, maximize)
        for r in touched:
            first_touch.setdefault(r, step)

        state = opt.state[p]
        assert state["step"] == step
        assert state["row_step"].dtype == torch.int32
        assert state["row_step"].tolist() == ref.t  # exact per-row counts
        torch.testing.assert_close(p.detach().double(), ref.w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["exp_avg"].double(), ref.m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"].double(), ref.v, rtol=1e-5, atol=1e-9)
        untouched = torch.ones(v, dtype=torch.bool)
        untouched[touched] = False
        assert torch.equal(p.detach()[untouched], before["w"][untouched])  # bit-equal
        if "m" in before:
            assert torch.equal(state["exp_avg"][untouched], before["m"][untouched])
            assert torch.equal(state["exp_avg_sq"][untouched], before["v"][untouched])
            assert torch.equal(state["row_step"][untouched], before["t"][untouched])
        assert not torch.equal(p.detach()[touched], before["w"][touched])
    assert path.calls == 20  # the pinned implementation ran at every step
    assert len(set(first_touch.values())) >= 5  # rows really were first touched at different steps
    assert torch.equal(p.detach()[v - 4:], w0[v - 4:])  # never touched: never moved


def test_lazy_adam_duplicates_are_summed_not_applied_twice(path):
    """One row given twice in an uncoalesced gradient is one Adam step on the sum (t_r = 1, not 2)."""
    w0 = torch.zeros(4, 3)
    p = nn.Parameter(w0.clone())
    opt = make_table_optimizer("lazy_adam", [p], lr=0.1)
    g = _coo(torch.tensor([[2, 0, 2]]), torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 1.0], [3.0, 0.0, -1.0]]), (4, 3))
    p.grad = g
    opt.step()
    ref = RefLazyAdam(w0)
    ref.step(g, 0.1)
    assert opt.state[p]["row_step"].tolist() == [1, 0, 1, 0]
    torch.testing.assert_close(p.detach().double(), ref.w, rtol=1e-5, atol=1e-7)
    assert path.calls == 1


def test_lazy_adam_empty_gradient_counts_no_row_step(path):
    p = nn.Parameter(torch.ones(6, 2))
    opt = make_table_optimizer("lazy_adam", [p], lr=0.1)
    p.grad = _coo(torch.tensor([[1]]), torch.ones(1, 2), (6, 2))
    opt.step()
    p.grad = _coo(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 2), (6, 2))
    moved = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), moved)
    assert opt.state[p]["step"] == 2
    assert opt.state[p]["row_step"].tolist() == [0, 1, 0, 0, 0, 0]


# ---------------------------------------------------------------- the first move of a row first touched late


def _late_row_first_move(name: str, steps: int, g_late: torch.Tensor, lr: float) -> torch.Tensor:
    """Row 0 gets a gradient at steps 1..steps-1, row 1 its first one at step ``steps``: row 1's move."""
    d = g_late.numel()
    p = nn.Parameter(torch.zeros(3, d))
    opt = make_table_optimizer(name, [p], lr=lr)
    g0 = _coo(torch.tensor([[0]]), torch.full((1, d), 0.3), (3, d))
    for _ in range(steps - 1):
        p.grad = g0
        opt.step()
    assert torch.equal(p.detach()[1], torch.zeros(d))
    p.grad = _coo(torch.tensor([[1]]), g_late.unsqueeze(0), (3, d))
    opt.step()
    assert opt.state[p]["step"] == steps
    if name == "lazy_adam":
        assert opt.state[p]["row_step"].tolist() == [steps - 1, 1, 0]
    return p.detach()[1].double()


@pytest.mark.parametrize("use_numba", [True, False])
def test_row_first_touched_at_step_1000_moves_like_a_first_adam_step(monkeypatch, one_thread, use_numba):
    monkeypatch.setattr(so, "USE_NUMBA", use_numba)
    steps, lr = 1000, 0.01
    b1, b2, eps = 0.9, 0.999, 1e-8  # make_table_optimizer's defaults
    g = torch.tensor([1e-3, 0.5, 3.0, -2.0, -40.0])
    gd = g.double()

    lazy = _late_row_first_move("lazy_adam", steps, g, lr)
    # Adam's first step: m = (1-β1) g, v = (1-β2) g², bias-corrected with t = 1
    expected_lazy = -lr * gd * math.sqrt(1 - b2) / (math.sqrt(1 - b2) * gd.abs() + eps)
    torch.testing.assert_close(lazy, expected_lazy, rtol=1e-5, atol=0)
    torch.testing.assert_close(lazy, -lr * gd.sign(), rtol=1e-3, atol=0)  # ≈ lr per coordinate

    glob = _late_row_first_move("sparse_adam", steps, g, lr)
    # the same moments divided by the global count's corrections (1 - β1^1000) ≈ 1 and (1 - β2^1000) ≈ 0.63
    scale = lr * math.sqrt(1 - b2**steps) / (1 - b1**steps)
    expected_glob = -scale * (1 - b1) * gd / (math.sqrt(1 - b2) * gd.abs() + eps)
    torch.testing.assert_close(glob, expected_glob, rtol=1e-5, atol=0)
    ratio = math.sqrt(1 - b2**steps) * (1 - b1) / ((1 - b1**steps) * math.sqrt(1 - b2))
    assert ratio == pytest.approx(2.514, abs=1e-3)  # ≈ 2.5 lr (3.16 lr only as 1 - β2^t → 1)
    torch.testing.assert_close(glob, -ratio * lr * gd.sign(), rtol=1e-3, atol=0)
    assert (glob.abs() > 2.4 * lazy.abs()).all()


# ---------------------------------------------------------------- state dicts


def _grads(v: int, d: int, n_steps: int, seed: int, hi: int | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        rows = torch.randint(0, hi or v, (7,), generator=gen)
        out.append(_coo(rows.unsqueeze(0), torch.randn(7, d, generator=gen), (v, d)))
    return out


def _checkpoint(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("use_numba,chunk_rows", [(True, 1 << 16), (False, 1 << 16), (True, 7)])
def test_sparse_adam_state_moves_to_lazy_adam(monkeypatch, one_thread, use_numba, chunk_rows):
    """Rows the global-count optimizer moved start with row_step = its step count; the others at 0 (the moments
    read chunk_rows rows at a time: never a V×d boolean tensor)."""
    monkeypatch.setattr(so, "USE_NUMBA", use_numba)
    monkeypatch.setattr(so, "MOVED_CHUNK_ROWS", chunk_rows)
    v, d, lr, k = 30, 4, 0.02, 5
    b1, b2, eps = 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(v, d, generator=gen)
    p = nn.Parameter(w0.clone())
    first = make_table_optimizer("sparse_adam", [p], lr=lr)
    for g in _grads(v, d, k, seed=4, hi=15):  # rows 15.. are never touched by the first optimizer
        p.grad = g
        first.step()
    moved = first.state[p]["exp_avg_sq"].ne(0).any(1)
    assert 5 <= int(moved.sum()) < 15

    q = nn.Parameter(p.detach().clone())
    second = make_table_optimizer("lazy_adam", [q], lr=lr)
    second.load_state_dict(_checkpoint(first.state_dict()))
    assert "row_step" not in second.state[q]  # converted at the first step
    m0 = second.state[q]["exp_avg"].double().clone()
    v0 = second.state[q]["exp_avg_sq"].double().clone()
    w_before = q.detach().double().clone()

    old_touched = moved.nonzero().flatten().tolist()
    new_rows = [old_touched[0], old_touched[1], 20, 22]  # two rows it moved, two it never saw
    g = _coo(torch.tensor([new_rows]), torch.randn(4, d, generator=gen), (v, d))
    q.grad = g
    second.step()

    expected_t = [k if moved[r] else 0 for r in range(v)]
    for r in new_rows:
        expected_t[r] += 1
    state = second.state[q]
    assert state["step"] == k + 1
    assert state["row_step"].tolist() == expected_t
    assert state["row_step"].dtype == torch.int32
    # the update itself: old rows bias-corrected with t = k + 1, new ones with t = 1
    dense = g.to_dense().double()
    for r in range(v):
        if r not in new_rows:
            assert torch.equal(q.detach()[r], p.detach()[r])
            continue
        t = expected_t[r]
        m = b1 * m0[r] + (1 - b1) * dense[r]
        vv = b2 * v0[r] + (1 - b2) * dense[r] ** 2
        w = w_before[r] - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (vv.sqrt() + eps)
        torch.testing.assert_close(q.detach()[r].double(), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_numba", [True, False])
def test_lazy_adam_state_dict_round_trips(monkeypatch, one_thread, use_numba):
    monkeypatch.setattr(so, "USE_NUMBA", use_numba)
    v, d, lr = 40, 6, 0.05
    grads = _grads(v, d, 10, seed=8, hi=32)
    w0 = torch.randn(v, d, generator=torch.Generator().manual_seed(9))

    straight = nn.Parameter(w0.clone())
    opt = make_table_optimizer("lazy_adam", [straight], lr=lr)
    for g in grads:
        straight.grad = g.clone()
        opt.step()

    p = nn.Parameter(w0.clone())
    first = make_table_optimizer("lazy_adam", [p], lr=lr)
    for g in grads[:5]:
        p.grad = g.clone()
        first.step()
    saved = _checkpoint(first.state_dict())
    assert saved["state"][0]["row_step"].dtype == torch.int32
    q = nn.Parameter(p.detach().clone())
    second = make_table_optimizer("lazy_adam", [q], lr=lr)
    second.load_state_dict(saved)
    # the counts' values (and their dtype: the next test)
    assert second.state[q]["row_step"].tolist() == first.state[p]["row_step"].tolist()
    for g in grads[5:]:
        q.grad = g.clone()
        second.step()
    assert torch.equal(q.detach(), straight.detach())  # the same updates, bit for bit
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(second.state[q][key], opt.state[straight][key])
    assert second.state[q]["row_step"].tolist() == opt.state[straight]["row_step"].tolist()
    assert second.state[q]["step"] == 10
    assert int(second.state[q]["row_step"].max()) >= 2 and int(second.state[q]["row_step"][32:].sum()) == 0


@pytest.mark.parametrize("use_numba", [True, False])
def test_lazy_adam_row_step_stays_int32_after_load_state_dict(monkeypatch, one_thread, use_numba):
    monkeypatch.setattr(so, "USE_NUMBA", use_numba)
    v, d = 6, 2
    p = nn.Parameter(torch.zeros(v, d))
    first = make_table_optimizer("lazy_adam", [p], lr=0.01)
    p.grad = _coo(torch.tensor([[1, 3]]), torch.ones(2, d), (v, d))
    first.step()
    first.state[p]["row_step"][3] = 2**24  # a row seen 16.8M times: still exact in int32
    q = nn.Parameter(p.detach().clone())
    second = make_table_optimizer("lazy_adam", [q], lr=0.01)
    second.load_state_dict(_checkpoint(first.state_dict()))
    q.grad = _coo(torch.tensor([[3]]), torch.ones(1, d), (v, d))
    second.step()
    counts = second.state[q]["row_step"]
    assert [int(c) for c in counts.tolist()] == [0, 1, 0, 2**24 + 1, 0, 0]
    assert counts.dtype == torch.int32


# ---------------------------------------------------------------- configuration and bad inputs


def test_make_table_optimizer_lazy_adam_counts_per_row():
    p = nn.Parameter(torch.zeros(5, 2))
    opt = make_table_optimizer("lazy_adam", [p], lr=0.02)
    assert isinstance(opt, SparseAdam) and opt.row_steps
    assert opt.param_groups[0]["lr"] == 0.02
    assert not make_table_optimizer("sparse_adam", [p], lr=0.02).row_steps
    with pytest.raises(ValueError, match="lazy_adam"):
        make_table_optimizer("lazy-adam", [p], lr=0.02)


@pytest.mark.parametrize("use_numba", [True, False])
def test_lazy_adam_rejects_a_float64_table(monkeypatch, use_numba):
    monkeypatch.setattr(so, "USE_NUMBA", use_numba)
    monkeypatch.setattr(so, "_stock_sparse_adam", _forbidden)  # no silent fall-back either
    w0 = torch.randn(6, 3, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = make_table_optimizer("lazy_adam", [p], lr=0.1)
    p.grad = _coo(torch.tensor([[1, 4]]), torch.ones(2, 3, dtype=torch.float64), (6, 3))
    with pytest.raises(RuntimeError, match=r"lazy_adam.*float32 CPU"):
        opt.step()
    assert torch.equal(p.detach(), w0)


def test_lazy_adam_rejects_dense_gradients():
    p = nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        make_table_optimizer("lazy_adam", [p], lr=0.1).step()


def test_lazy_adam_non_contiguous_table_takes_the_torch_path(monkeypatch, one_thread):
    """A float32 CPU table that is not contiguous cannot go to the kernel: the torch ops update it."""
    monkeypatch.setattr(so, "_lazy_adam_rows", _forbidden)
    monkeypatch.setattr(so, "_lazy_adam_rows_serial", _forbidden)
    monkeypatch.setattr(so, "_stock_sparse_adam", _forbidden)
    v, d = 12, 3
    w0 = torch.randn(d, v, generator=torch.Generator().manual_seed(1)).t()  # (v, d), not contiguous
    p = nn.Parameter(w0)
    assert not p.is_contiguous()
    opt = make_table_optimizer("lazy_adam", [p], lr=0.05)
    ref = RefLazyAdam(w0.detach())
    for g in _grads(v, d, 4, seed=2):
        p.grad = g
        opt.step()
        ref.step(g, 0.05)
    assert opt.state[p]["row_step"].tolist() == ref.t
    torch.testing.assert_close(p.detach().double(), ref.w, rtol=1e-5, atol=1e-7)
