"""Scoring on the trunk's device, the table going there a chunk of rows at a time (scoring.topk_tags,
ranking.rank_tags, ranking.retrieval_metrics, ValidationReport.compute, evaluating's held-out figures).

On the CPU the chunked, chunk-outer pass must give exactly what the image-batch-outer pass of before
gave (frozen below as OLD_*) and what a brute force over the full score matrix gives, whatever the
chunk size (smaller than k, not dividing V), the image groups and the ties. The CUDA checks run only
where there is a GPU."""

from __future__ import annotations

import pytest
import torch

from im2vec.errors import BadValue
from im2vec.eval import heldout as evaluating
from im2vec.eval import validation
from im2vec.eval.ranking import (
    TagRanks,
    _count_above,
    _first_k,
    _topk_by_index,
    rank_tags,
    retrieval_metrics,
    tagging_metrics,
)
from im2vec.eval.scoring import FiniteCheck, check_finite, row_chunks, topk_tags
from im2vec.eval.validation import ValidationReport
from im2vec.wide.sampler import PAD

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------- the CPU paths of before, frozen
@torch.no_grad()
def OLD_topk_tags(u, table, log_counts, gammas, k, chunk=65536, budget=1 << 23):
    u = u.float().cpu()
    check_finite(u=u, table=table, log_counts=log_counts, **{f"gamma {g}": g for g in gammas})
    n, v = u.shape[0], table.shape[0]
    k = min(k, v)
    chunk = max(1, min(chunk, v, budget))
    batch = max(1, budget // chunk)
    out = {g: (torch.empty(n, k), torch.empty(n, k, dtype=torch.long)) for g in gammas}
    for b0 in range(0, n, batch):
        ub = u[b0 : b0 + batch]
        best = {g: (torch.full((ub.shape[0], 0), -torch.inf), torch.zeros(ub.shape[0], 0, dtype=torch.long))
                for g in gammas}
        for start in range(0, v, chunk):
            raw = ub @ table[start : start + chunk].t()
            check_finite(scores=raw)
            lc = log_counts[start : start + chunk]
            for g in gammas:
                s, i = torch.topk(raw + g * lc, min(k, raw.shape[1]), dim=1)
                check_finite(scores=s)
                s, i = torch.cat([best[g][0], s], 1), torch.cat([best[g][1], i + start], 1)
                top = torch.topk(s, min(k, s.shape[1]), dim=1)
                best[g] = (top.values, i.gather(1, top.indices))
        for g in gammas:
            out[g][0][b0 : b0 + batch], out[g][1][b0 : b0 + batch] = best[g]
    return out


@torch.no_grad()
def OLD_rank_tags(u, table, log_counts, gamma, truths, kmax=10, batch=256, budget=1 << 22):
    u, table, log_counts = u.float().cpu(), table.float().cpu(), log_counts.float().cpu()
    check_finite(u=u, table=table, log_counts=log_counts, gamma=gamma)
    n, v = u.shape[0], table.shape[0]
    kmax = min(kmax, v)
    widths = [t.shape[1] for t in truths]
    out_top = torch.empty(n, kmax, dtype=torch.long)
    out = [torch.zeros(n, sum(widths), dtype=torch.long) for _ in range(2)] + [torch.zeros(n, sum(widths))]
    for b0 in range(0, n, batch):
        ub = u[b0 : b0 + batch]
        ids = torch.cat([t[b0 : b0 + batch] for t in truths], 1)
        valid = ids != PAD
        safe = ids.clamp(min=0)
        st = torch.einsum("bd,btd->bt", ub, table[safe]) + gamma * log_counts[safe]
        gt = torch.zeros_like(ids)
        ge = torch.zeros_like(ids)
        best_s = torch.full((ub.shape[0], 0), -torch.inf)
        best_i = torch.zeros(ub.shape[0], 0, dtype=torch.long)
        chunk = max(1, budget // ub.shape[0])
        thr, order = torch.sort(torch.cat([st, torch.nextafter(st, torch.tensor(-torch.inf))], 1), dim=1)
        for c0 in range(0, v, chunk):
            s = ub @ table[c0 : c0 + chunk].t() + gamma * log_counts[c0 : c0 + chunk]
            check_finite(scores=s)
            ts, ti = _topk_by_index(s, min(kmax, s.shape[1]))
            best_s, best_i = _first_k(torch.cat([best_s, ts], 1), torch.cat([best_i, ti + c0], 1), kmax)
            above = _count_above(s, thr, order)
            gt += above[:, : st.shape[1]]
            ge += above[:, st.shape[1] :]
            own = valid & (safe >= c0) & (safe < c0 + s.shape[1])
            s_own = s.gather(1, (safe - c0).clamp(0, s.shape[1] - 1))
            gt -= (own & (s_own > st)).long()
            ge += (own & (s_own < st)).long()
        out_top[b0 : b0 + batch] = best_i
        for o, x in zip(out, (gt, ge, st)):
            o[b0 : b0 + batch] = torch.where(valid, x, torch.zeros_like(x))
    split = lambda x: list(torch.split(x, widths, dim=1))  # noqa: E731
    return TagRanks(out_top, list(truths), split(out[0]), split(out[1]), split(out[2]))


def OLD_gamma_sweep_tops(u, table, log_counts, gammas, k=5):
    tops = {g: [] for g in gammas}
    for b0 in range(0, u.shape[0], 256):
        for g, (_, top) in OLD_topk_tags(u[b0 : b0 + 256], table, log_counts, gammas, k).items():
            tops[g].append(top)
    return {g: torch.cat(t) for g, t in tops.items()}


# ---------------------------------------------------------------- problems
def problem(seed: int, n: int = 37, v: int = 211, d: int = 8, ties: bool = False):
    """u (n, d), table (v, d), log counts (v,). ``ties``: small integers, so that the scores are exact in fp32
    and many of them equal (whole tie groups across chunk boundaries and at the k-th place)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        u = torch.randint(-1, 2, (n, d), generator=g).float()
        table = torch.randint(-1, 2, (v, d), generator=g).float()
        lc = torch.randint(0, 3, (v,), generator=g).float()
    else:
        u, table = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.7
        lc = torch.rand(v, generator=g) * 6
    return u, table, lc


def truth(seed: int, n: int, v: int, width: int = 5, empty: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    t = torch.full((n, width), PAD, dtype=torch.long)
    for i in range(n):
        m = 0 if i < empty else int(torch.randint(1, width + 1, (1,), generator=g))
        t[i, :m] = torch.randperm(v, generator=g)[:m]
    return t


GAMMAS = [0.0, 0.5, 1.25, 2.0]
# (chunk, budget, images): chunks smaller than k, not dividing V (211 = prime), one chunk, several image groups
TOPK_SETTINGS = [(3, 1 << 23, 1 << 16), (7, 7 * 5, 1 << 16), (50, 50 * 8, 9), (211, 1 << 23, 1 << 16),
                 (1000, 1 << 23, 4), (64, 64 * 37, 37)]


# ---------------------------------------------------------------- topk_tags
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk,budget,images", TOPK_SETTINGS)
def test_topk_tags_equals_the_pass_of_before_and_the_brute_force(ties, chunk, budget, images):
    u, table, lc = problem(1, ties=ties)
    k = 10
    got = topk_tags(u, table, lc, GAMMAS, k, chunk=chunk, budget=budget, device="cpu", images=images)
    old = OLD_topk_tags(u, table, lc, GAMMAS, k, chunk=chunk, budget=budget)
    for g in GAMMAS:
        # the scores as before; the ids too where no scores tie (equal scores: tag-id order now, torch.topk's before)
        assert torch.equal(got[g][0], old[g][0]) and (ties or torch.equal(got[g][1], old[g][1])), g
        full = u @ table.t() + g * lc  # (N, V): the brute force
        ref = torch.topk(full, k, dim=1)
        assert torch.allclose(got[g][0], ref.values, atol=1e-5)
        assert torch.allclose(full.gather(1, got[g][1]), got[g][0], atol=1e-5)  # each score is its tag's
        assert all(len(set(row)) == k for row in got[g][1].tolist())
        by_id = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]  # equal scores: smaller id first
        assert torch.equal(got[g][1], by_id if ties else ref.indices)


def test_topk_tags_k_above_v_and_no_images():
    u, table, lc = problem(2, n=4, v=6)
    got = topk_tags(u, table, lc, [1.0], 10, chunk=4)
    assert got[1.0][1].shape == (4, 6)
    assert torch.equal(torch.sort(got[1.0][1], 1).values, torch.arange(6).expand(4, 6))
    none = topk_tags(u[:0], table, lc, [1.0], 10, chunk=4)
    assert none[1.0][0].shape == (0, 6)


def test_topk_tags_keeps_the_log_counts_dtype_as_before():
    u, table, lc = problem(3)
    got = topk_tags(u, table, lc.double(), [0.3], 5, chunk=17, device="cpu")
    old = OLD_topk_tags(u, table, lc.double(), [0.3], 5, chunk=17)
    assert torch.equal(got[0.3][0], old[0.3][0]) and torch.equal(got[0.3][1], old[0.3][1])


@pytest.mark.parametrize("where", ["table", "log_counts", "u"])
def test_topk_tags_refuses_non_finite_inputs_chunk_by_chunk(where):
    u, table, lc = problem(4)
    {"table": table, "log_counts": lc, "u": u}[where].view(-1)[-1] = float("nan")  # in the last chunk
    with pytest.raises(BadValue, match="NaN or infinite"):
        topk_tags(u, table, lc, [0.5], 5, chunk=10)


# ---------------------------------------------------------------- rank_tags
# (batch, budget, rows, images): tag chunks of 80, 5 (< kmax) and 1; a last, smaller batch (37 images) with wider
# chunks; image groups that are not whole batches; rows None: the CPU's default (the whole table, a view);
# rows given: copies of a few chunks, as on a device (a last batch's wider chunks cut at each copy's end)
RANK_SETTINGS = [(7, 7 * 80, None, 1 << 16), (4, 4 * 5, None, 9), (3, 3, None, 5), (256, 1 << 22, None, 1 << 16),
                 (7, 7 * 80, 200, 1 << 16), (4, 4 * 5, 15, 9), (3, 3, 7, 5), (16, 16 * 40, 160, 13)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batch,budget,rows,images", RANK_SETTINGS)
def test_rank_tags_equals_the_pass_of_before_and_the_brute_force(ties, batch, budget, rows, images):
    u, table, lc = problem(5, ties=ties)
    gamma = 1.25
    truths = [truth(5, u.shape[0], table.shape[0]), truth(6, u.shape[0], table.shape[0], width=2, empty=10)]
    got = rank_tags(u, table, lc, gamma, truths, batch=batch, budget=budget, device="cpu", rows=rows, images=images)
    old = OLD_rank_tags(u, table, lc, gamma, truths, batch=batch, budget=budget)
    exact = rows is None or ties  # cut chunks: other products, the same scores up to rounding
    assert torch.equal(got.top_ids, old.top_ids) or not exact
    for j in range(2):
        if exact:
            assert torch.equal(got.n_gt[j], old.n_gt[j]) and torch.equal(got.n_ge[j], old.n_ge[j])
            assert torch.equal(got.true_scores[j], old.true_scores[j])
        assert tagging_metrics(got, j, num_tags=211) == pytest.approx(tagging_metrics(old, j, num_tags=211),
                                                                      nan_ok=True, abs=0 if exact else 1e-6)
    S = (u.double() @ table.double().t() + gamma * lc.double()).float()  # exact with ties (small integers)
    want = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :10]  # equal scores in tag-index order
    if ties:
        assert torch.equal(got.top_ids, want)
    else:
        assert torch.allclose(S.gather(1, got.top_ids), S.gather(1, want), atol=1e-5)
    for j, t in enumerate(truths):
        for i in range(t.shape[0]):
            for c, tag in enumerate(t[i].tolist()):
                if tag == PAD:
                    assert got.n_gt[j][i, c] == 0 and got.n_ge[j][i, c] == 0
                elif ties:
                    assert int(got.n_gt[j][i, c]) == int((S[i] > S[i, tag]).sum())
                    assert int(got.n_ge[j][i, c]) == int((S[i] >= S[i, tag]).sum())


def test_the_cpu_default_is_the_pass_of_before_to_the_last_bit_at_d_256():
    """At d = 256 a product's rounding depends on its shape (MKL: fewer than 8 rows take another path): the
    CPU path must keep every product of before (batches, a last smaller batch and its wider chunks, chunk
    boundaries) to give the same bits. 133 images in batches of 64: the last batch has 5."""
    u, table, lc = problem(14, n=133, v=2000, d=256)
    t = truth(14, 133, 2000, width=8)
    got = rank_tags(u, table, lc, 1.0, [t], batch=64, budget=64 * 500, device="cpu", images=100)
    old = OLD_rank_tags(u, table, lc, 1.0, [t], batch=64, budget=64 * 500)
    assert torch.equal(got.top_ids, old.top_ids) and torch.equal(got.true_scores[0], old.true_scores[0])
    assert torch.equal(got.n_gt[0], old.n_gt[0]) and torch.equal(got.n_ge[0], old.n_ge[0])
    for chunk, budget in ((700, 700 * 64), (2000, 2000 * 64)):
        a = topk_tags(u, table, lc, [0.0, 1.0], 10, chunk=chunk, budget=budget, images=70)  # groups: whole batches
        b = OLD_topk_tags(u, table, lc, [0.0, 1.0], 10, chunk=chunk, budget=budget)
        for g in (0.0, 1.0):
            assert torch.equal(a[g][0], b[g][0]) and torch.equal(a[g][1], b[g][1])


def test_rank_tags_refuses_a_non_finite_table_row_in_any_chunk():
    u, table, lc = problem(6)
    table[150, 2] = float("inf")
    with pytest.raises(BadValue, match="NaN or infinite"):
        rank_tags(u, table, lc, 1.0, [truth(6, u.shape[0], 211)], batch=8, budget=8 * 16, rows=32)


# ---------------------------------------------------------------- retrieval
@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_on_the_cpu_device_equals_the_default(ties):
    u, table, _ = problem(7, ties=ties)
    t = truth(7, u.shape[0], table.shape[0])
    for chunk in (3, 256):
        m0, ap0, pk0 = retrieval_metrics(u, table, t, chunk=chunk)
        m1, ap1, pk1 = retrieval_metrics(u, table, t, chunk=chunk, device="cpu")
        assert m0 == pytest.approx(m1, nan_ok=True) and torch.equal(ap0, ap1) and torch.equal(pk0, pk1)


# ---------------------------------------------------------------- the helpers
def test_row_chunks_on_the_cpu_are_views_that_cover_the_table():
    table, lc = torch.randn(23, 4), torch.rand(23)
    seen = []
    for start, (rows, c) in row_chunks(torch.device("cpu"), 5, table, lc):
        assert rows.data_ptr() == table[start].data_ptr() and c.data_ptr() == lc[start].data_ptr()  # no copy
        assert rows.shape[0] <= 5 and rows.shape[0] == c.shape[0]
        seen.append((start, rows.shape[0]))
    assert seen == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 3)]


def test_finite_check_off_the_cpu_waits_for_done():
    """Off the CPU the counts add up on the device and ``done`` raises (no wait per chunk)."""
    check = FiniteCheck(torch.device("cuda"))  # only the device's type is read
    check(scores=torch.tensor([1.0, 2.0]))
    check(scores=torch.tensor([float("nan"), float("inf")]), table=torch.ones(3))
    with pytest.raises(BadValue, match="scores has 2 NaN or infinite"):
        check.done()
    eager = FiniteCheck(torch.device("cpu"))
    with pytest.raises(BadValue, match="table has 1 NaN"):
        eager(table=torch.tensor([0.0, -float("inf")]))


# ---------------------------------------------------------------- validation and held-out figures
def by_id_topk(u, table, log_counts, gammas, k):
    """The brute force with equal scores in tag-id order: {γ: (scores (N, k), ids (N, k))}."""
    out = {}
    for g in gammas:
        srt = torch.sort(u @ table.t() + g * log_counts, dim=1, descending=True, stable=True)
        out[g] = (srt.values[:, :k], srt.indices[:, :k])
    return out


def _report(counts, noise, by) -> ValidationReport:
    return ValidationReport([f"t{i}" for i in range(len(counts))], counts, noise, 0.3, [0.0, 0.25, 0.5, 1.0, 2.0],
                            projector_tags=10, grid_images=0, choose_gamma=True, gamma_by=by)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("by", ["precision@5", "auto"])
def test_validation_figures_equal_the_pass_of_before(monkeypatch, ties, by):
    u, table, lc = problem(8, n=40, v=300, ties=ties)
    counts = lc.exp().round().long()
    obs, clean = truth(8, 40, 300), truth(9, 40, 300, width=3, empty=12)
    noise = torch.arange(1, 300, 4)
    seen = []
    real = validation.topk_tags

    def spy(*a, **kw):
        seen.append(kw.get("device"))
        return real(*a, **kw)

    figures = {}
    before = OLD_topk_tags if not ties else by_id_topk  # equal scores: tag-id order now, torch.topk's before
    for name, fn in (("old", lambda *a, device=None, **kw: before(*a, **kw)), ("new", spy)):
        monkeypatch.setattr(validation, "topk_tags", fn)
        r = _report(counts, noise, by)
        for a in range(0, 40, 9):
            r.add(u[a : a + 9], obs[a : a + 9], clean[a : a + 9], [f"k{i}" for i in range(a, min(a + 9, 40))], None)
        kw = {"device": "cpu"} if name == "new" else {}
        figures[name] = (r.compute(table, lc, step=3, max_images=33, **kw), r.gamma, r._top.clone())
    assert seen == ["cpu"]
    new, old = figures["new"][0], figures["old"][0]
    assert set(new) == set(old) and all(new[k] == old[k] or (new[k] != new[k] and old[k] != old[k]) for k in old)
    assert figures["new"][1] == figures["old"][1] and torch.equal(figures["new"][2], figures["old"][2])


def test_gamma_sweep_equals_the_pass_of_before():
    u, table, lc = problem(10, n=600, v=300)  # more than 256 images: the old sweep took them 256 at a time
    obs, clean = truth(10, 600, 300), truth(11, 600, 300, width=3)
    noise = torch.arange(0, 300, 3)
    gammas = [0.0, 0.5, 1.0, 2.0]
    got = evaluating.gamma_sweep(u, table, lc, gammas, obs, clean, noise, device="cpu")
    tops = OLD_gamma_sweep_tops(u, table, lc, gammas)
    for g, top in tops.items():
        assert got[f"gamma_sweep/precision@5/{g:g}"] == evaluating.precision_at_k(top, obs, 5)
        assert got[f"gamma_sweep/clean_precision@5/{g:g}"] == evaluating.precision_at_k(top, clean, 5)
        assert got[f"gamma_sweep/noise_share@5/{g:g}"] == evaluating.noise_share(top, noise, 5)


def test_heldout_figures_score_on_the_given_device(monkeypatch):
    """heldout_figures hands its device to every pass over the table (tagging, retrieval, the γ sweep)."""
    u, table, lc = problem(12, n=20, v=50)
    obs = truth(12, 20, 50)
    data = {"u": [u], "obs": obs, "clean": torch.full((20, 1), PAD), "keys": [f"k{i}" for i in range(20)],
            "skipped": 0}
    monkeypatch.setattr(evaluating, "embed_shards", lambda *a, **kw: data)
    calls = []
    for name in ("rank_tags", "retrieval_metrics", "topk_tags"):
        real = getattr(evaluating, name)
        monkeypatch.setattr(evaluating, name, lambda *a, _real=real, _name=name, **kw:
                            calls.append((_name, str(kw.get("device")))) or _real(*a, **kw))
    m = evaluating.heldout_figures(torch.nn.Linear(2, 8), table, lc, [f"t{i}" for i in range(50)], 1.0, ["x.tar"], 8,
                                   gammas=[0.0, 1.0], device="cpu")
    assert sorted(set(calls)) == [("rank_tags", "cpu"), ("retrieval_metrics", "cpu"), ("topk_tags", "cpu")]
    r = rank_tags(u, table, lc, 1.0, [obs])
    assert m["test/tagging/map"] == tagging_metrics(r, 0, num_tags=50)["map"]


# ---------------------------------------------------------------- CUDA (where there is one)
@CUDA
def test_cuda_scoring_matches_the_cpu_in_fp32_even_with_tf32_asked():
    u, table, lc = problem(13, n=300, v=5000, d=32)
    t = truth(13, 300, 5000)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for the trunk: scoring must not use it
    try:
        cpu = topk_tags(u, table, lc, GAMMAS, 10, chunk=777)
        gpu = topk_tags(u, table, lc, GAMMAS, 10, chunk=777, device="cuda")
        for g in GAMMAS:
            assert torch.allclose(gpu[g][0], cpu[g][0], atol=1e-4, rtol=0)
            assert (gpu[g][1] == cpu[g][1]).float().mean() > 0.999
        a = rank_tags(u, table, lc, 1.0, [t], batch=64, budget=64 * 500, rows=1000)
        b = rank_tags(u, table, lc, 1.0, [t], batch=64, budget=64 * 500, rows=1000, device="cuda")
        # another rounding of the products: a tag within ~1e-6 of a true tag's score may change sides (rare)
        for x, y in ((a.n_gt[0], b.n_gt[0]), (a.n_ge[0], b.n_ge[0])):
            assert (x - y).abs().max() <= 2 and (x != y).float().mean() < 1e-2
        assert torch.allclose(a.true_scores[0], b.true_scores[0], atol=1e-4, rtol=0)
        assert tagging_metrics(a, 0, num_tags=5000) == pytest.approx(tagging_metrics(b, 0, num_tags=5000), abs=1e-3)
        ma, _, _ = retrieval_metrics(u, table, t)
        mb, _, _ = retrieval_metrics(u, table, t, device="cuda")
        assert ma == pytest.approx(mb, abs=1e-3)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored
    finally:
        torch.set_float32_matmul_precision(before)


def test_validation_scores_on_the_trunks_device(make_cfg, monkeypatch):
    """The module's validation hands its device to the scoring (the GPU's, on a GPU run)."""
    from im2vec.eval.validation import ValidationReport
    from im2vec.train.training import train

    seen = []
    real = ValidationReport.compute

    def compute(self, *a, **k):
        seen.append(k.get("device"))
        return real(self, *a, **k)

    monkeypatch.setattr(ValidationReport, "compute", compute)
    train(make_cfg("trainer.max_epochs=1"))
    assert seen and all(d is not None and d.type == "cpu" for d in seen)


def test_validation_device_follows_the_trunks_device(monkeypatch):
    """The device handed to the scoring is where the module was moved, not a constant: the module is moved to
    "meta" (standing in for a GPU, which this machine lacks; the table stays in host memory) and its
    validation's end is run on a few vectors, stopped at the scoring."""
    from types import SimpleNamespace

    from im2vec.deep.encoder import ImageEncoder
    from im2vec.train.module import Im2VecModule

    class Stop(Exception):
        pass

    seen = []

    def compute(self, *a, **k):
        seen.append(k.get("device"))
        raise Stop

    monkeypatch.setattr(ValidationReport, "compute", compute)
    v = 50
    counts = (1000.0 / torch.arange(1, v + 1)).round().clamp_min(1)
    mod = Im2VecModule(ImageEncoder("small_cnn", 16), [f"t{i}" for i in range(v)], counts, 10)
    mod.trainer = SimpleNamespace(sanity_checking=False, datamodule=SimpleNamespace(), global_step=0)
    mod.report.add(torch.randn(4, 16), torch.randint(0, v, (4, 3)), torch.full((4, 3), -1), list("abcd"), None)
    for device in (torch.device("cpu"), torch.device("meta")):  # meta last: nothing moves back from it
        mod.to(device)
        with pytest.raises(Stop):
            mod.on_validation_epoch_end()
        assert seen[-1] == device, (seen, device)
    assert mod.table.weight.device.type == "cpu"
