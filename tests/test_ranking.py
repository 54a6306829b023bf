"""im2vec.eval.ranking against independent brute-force references (full N×V score matrix, explicit loops)
and scikit-learn where it defines the same quantity.

Score cases:
- "continuous": random Gaussian u, table and log counts: no ties.
- "quantized": small integer u, table and integer log counts: many exact ties, and every score is
  exact in float32 as in float64, so the reference sees the same ties as the module.
- "prior": u = 0, table = 0, γ = 1: the frequency prior alone, log counts with repeated values.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    label_ranking_average_precision_score,
)

from im2vec.eval.ranking import KS, rank_tags, retrieval_metrics, tagging_metrics
from im2vec.wide.sampler import PAD

SEEDS = [0, 1, 2, 3]
CASES = ["continuous", "quantized", "prior"]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- inputs


def make_scores(case: str, seed: int, n: int = 40, v: int = 300, d: int = 4):
    """-> (u, table, log_counts, gamma) as torch float32 tensors."""
    rng = np.random.default_rng(seed)
    if case == "continuous":
        u = rng.standard_normal((n, d))
        table = rng.standard_normal((v, d))
        log_counts = np.log(rng.integers(1, 1000, v).astype(np.float64))
        gamma = 0.7
    elif case == "quantized":
        u = rng.integers(-2, 3, (n, d)).astype(np.float64)
        table = rng.integers(-2, 3, (v, d)).astype(np.float64)
        log_counts = rng.integers(0, 4, v).astype(np.float64)
        gamma = 0.5  # exact in binary: scores stay exactly representable
    elif case == "prior":
        u = np.zeros((n, 1))
        table = np.zeros((v, 1))
        log_counts = np.log(rng.choice([1.0, 2.0, 5.0, 10.0, 50.0], size=v))
        gamma = 1.0
    else:
        raise ValueError(case)
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return f(u), f(table), f(log_counts), gamma


def make_truth(seed: int, n: int, v: int, max_t: int = 8, empty: int = 5) -> torch.Tensor:
    """(N, max_t) duplicate-free rows of different lengths, PAD-padded; ``empty`` rows have no tag."""
    rng = np.random.default_rng(seed + 1000)
    lengths = rng.integers(1, max_t + 1, n)
    lengths[rng.choice(n, empty, replace=False)] = 0
    lengths[rng.choice(np.flatnonzero(lengths > 0))] = max_t  # at least one full row
    truth = np.full((n, max_t), PAD, dtype=np.int64)
    for i, ln in enumerate(lengths):
        truth[i, :ln] = rng.choice(v, ln, replace=False)
    return torch.tensor(truth)


def full_scores(u, table, log_counts, gamma) -> np.ndarray:
    """The full N×V score matrix in float64."""
    u, table, lc = (x.double().numpy() for x in (u, table, log_counts))
    return u @ table.T + gamma * lc[None, :]


def rows(truth: torch.Tensor) -> list[list[int]]:
    return [[int(t) for t in row if t != PAD] for row in truth]


def indicator(truth: torch.Tensor, v: int) -> np.ndarray:
    y = np.zeros((truth.shape[0], v), dtype=np.int64)
    for i, ts in enumerate(rows(truth)):
        y[i, ts] = 1
    return y


# ----------------------------------------------------------------------------- references


def expected_hits_clip(s_row: np.ndarray, true: list[int], k: int) -> float:
    """Σ over true tags of P(in the top k) under random tie-breaking, from each tie group's rank span."""
    total = 0.0
    for t in true:
        a = int(np.sum(s_row > s_row[t])) + 1
        b = int(np.sum(s_row >= s_row[t]))
        total += min(1.0, max(0.0, (k - a + 1) / (b - a + 1)))
    return total


def expected_hits_kth(s_row: np.ndarray, rel: np.ndarray, k: int) -> float:
    """Same expectation, derived differently: items strictly above the k-th score are in; the k-th
    score's tie group shares the remaining slots uniformly."""
    if k >= len(s_row):
        return float(rel.sum())
    kth = np.sort(s_row)[::-1][k - 1]
    above = s_row > kth
    group = s_row == kth
    return float(rel[above].sum() + (k - above.sum()) * rel[group].sum() / group.sum())


def ap_pessimistic(s_row: np.ndarray, rel: np.ndarray) -> float:
    """(1/R) Σ_{true t} |{true t': s_t' ≥ s_t}| / |{t': s_t' ≥ s_t}| with explicit loops."""
    pos = np.flatnonzero(rel)
    total = 0.0
    for t in pos:
        total += sum(1 for t2 in pos if s_row[t2] >= s_row[t]) / sum(1 for x in s_row if x >= s_row[t])
    return total / len(pos)


def ref_tagging(S: np.ndarray, truth: torch.Tensor, ks=KS) -> dict[str, float]:
    n, v = S.shape
    true_rows = rows(truth)
    has = [i for i in range(n) if true_rows[i]]
    m: dict[str, float] = {"images": float(len(has))}
    for k in ks:
        p, r, f = [], [], []
        for i in has:
            hits = expected_hits_clip(S[i], true_rows[i], k)
            rel = np.zeros(v)
            rel[true_rows[i]] = 1
            assert hits == pytest.approx(expected_hits_kth(S[i], rel, k), abs=1e-9)
            pi, ri = hits / k, hits / len(true_rows[i])
            p.append(pi)
            r.append(ri)
            f.append(2 * pi * ri / (pi + ri) if pi + ri > 0 else 0.0)
        m[f"precision@{k}"], m[f"recall@{k}"], m[f"f1@{k}"] = np.mean(p), np.mean(r), np.mean(f)
    aps = []
    for i in has:
        rel = np.zeros(v)
        rel[true_rows[i]] = 1
        aps.append(ap_pessimistic(S[i], rel))
    m["map"] = float(np.mean(aps))
    m["map_all_images"] = float(np.sum(aps) / n)
    return m


def ref_per_tag(top_ids: np.ndarray, truth: torch.Tensor, v: int, ks=KS, noise=None) -> dict[str, float]:
    """Macro precision/recall@k from the top-k lists; images without a true tag are left out
    (as for the per-image metrics); a tag never predicted has precision 0; macro over tags true for
    at least one image. Noise share: mean over all images of the noise fraction of the top k."""
    true_rows = rows(truth)
    n = len(true_rows)
    has = [i for i in range(n) if true_rows[i]]
    m: dict[str, float] = {}
    for k in ks:
        pred, correct, relevant = [0] * v, [0] * v, [0] * v
        for i in range(n):
            for t in true_rows[i]:
                relevant[t] += 1
        for i in has:
            for t in top_ids[i, :k]:
                pred[t] += 1
                if t in true_rows[i]:
                    correct[t] += 1
        seen = [t for t in range(v) if relevant[t] > 0]
        m[f"tag_precision@{k}"] = float(np.mean([correct[t] / pred[t] if pred[t] else 0.0 for t in seen]))
        m[f"tag_recall@{k}"] = float(np.mean([correct[t] / relevant[t] for t in seen]))
        if noise is not None:
            m[f"noise_share@{k}"] = float(np.mean([np.mean([t in noise for t in top_ids[i, :k]]) for i in range(n)]))
    return m


def topk_by_index(S: np.ndarray, k: int) -> np.ndarray:
    """Top k of each row, highest score first, ties broken by lower tag index."""
    out = np.empty((S.shape[0], k), dtype=np.int64)
    for i, row in enumerate(S):
        out[i] = np.lexsort((np.arange(len(row)), -row))[:k]
    return out


def same_scores(a: torch.Tensor, b: torch.Tensor, S: np.ndarray, exact_ids: bool):
    """Two top-k lists: the same ids (no ties), or at least the same scores rank by rank (ties: the
    module does not break them by index, see test_tie_topk_ids_by_tag_index)."""
    if exact_ids:
        assert torch.equal(a, b)
    assert np.array_equal(np.take_along_axis(S, a.numpy(), 1), np.take_along_axis(S, b.numpy(), 1))


def same_metrics(a: dict, b: dict, per_tag: bool):
    assert a.keys() == b.keys()
    for key in a:
        if per_tag or not key.startswith(("tag_", "noise_")):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def assert_close(got: dict, want: dict, keys=None):
    for key in keys if keys is not None else want:
        assert got[key] == pytest.approx(want[key], abs=TOL, rel=TOL), (key, got[key], want[key])


# ----------------------------------------------------------------------------- tagging


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_tagging_matches_brute_force(case, seed):
    u, table, lc, gamma = make_scores(case, seed)
    v = table.shape[0]
    truth = make_truth(seed, u.shape[0], v)
    S = full_scores(u, table, lc, gamma)
    if case != "continuous":
        assert len(np.unique(S[0])) < v // 4  # the tie cases really tie
    r = rank_tags(u, table, lc, gamma, [truth], batch=7, budget=7 * 8 * 10)  # tag chunks of 10
    m = tagging_metrics(r, num_tags=v)
    assert_close(m, ref_tagging(S, truth))

    # n_gt / n_ge against the full score rows
    for i, ts in enumerate(rows(truth)):
        for j, t in enumerate(ts):
            assert int(r.n_gt[0][i, j]) == int(np.sum(S[i] > S[i, t]))
            assert int(r.n_ge[0][i, j]) == int(np.sum(S[i] >= S[i, t]))
            assert float(r.true_scores[0][i, j]) == pytest.approx(S[i, t], abs=1e-4)
        assert (r.n_gt[0][i, len(ts):] == 0).all() and (r.n_ge[0][i, len(ts):] == 0).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_map_equals_sklearn(case, seed):
    u, table, lc, gamma = make_scores(case, seed)
    v = table.shape[0]
    truth = make_truth(seed, u.shape[0], v)
    S = full_scores(u, table, lc, gamma)
    Y = indicator(truth, v)
    has = Y.sum(1) > 0
    assert (~has).sum() == 5  # images without a true tag are part of the input
    m = tagging_metrics(rank_tags(u, table, lc, gamma, [truth]), num_tags=v)
    assert m["images"] == has.sum()
    lrap = label_ranking_average_precision_score(Y[has], S[has])
    per_row = [average_precision_score(Y[i], S[i]) for i in np.flatnonzero(has)]
    assert m["map"] == pytest.approx(lrap, abs=TOL)
    assert m["map"] == pytest.approx(np.mean(per_row), abs=TOL)
    assert m["map_all_images"] == pytest.approx(np.sum(per_row) / len(Y), abs=TOL)
    assert m["map_all_images"] < m["map"]  # the empty rows count 0


@pytest.mark.parametrize("seed", SEEDS)
def test_no_ties_topk_counts_and_ids(seed):
    u, table, lc, gamma = make_scores("continuous", seed)
    v = table.shape[0]
    truth = make_truth(seed, u.shape[0], v)
    S = full_scores(u, table, lc, gamma)
    r = rank_tags(u, table, lc, gamma, [truth], batch=5, budget=5 * 8 * 10)  # tag chunks of 10
    order = np.argsort(-S, axis=1)
    assert np.array_equal(r.top_ids.numpy(), order[:, :10])
    m = tagging_metrics(r, num_tags=v)
    true_rows = rows(truth)
    has = [i for i in range(len(true_rows)) if true_rows[i]]
    for k in KS:
        hits = [len(set(order[i, :k]) & set(true_rows[i])) for i in has]
        assert m[f"precision@{k}"] == pytest.approx(np.mean([h / k for h in hits]), abs=TOL)
        assert m[f"recall@{k}"] == pytest.approx(np.mean([h / len(true_rows[i]) for h, i in zip(hits, has)]), abs=TOL)


CHUNKINGS = ((1000, 1 << 30), (3, 3 * 8 * 10), (7, 1000))


@pytest.mark.parametrize("case", ["quantized", "prior"])
@pytest.mark.parametrize("seed", SEEDS)
def test_tie_topk_scores(case, seed):
    """With ties, the top-k lists hold k distinct tags with the k best scores, whatever the chunking."""
    u, table, lc, gamma = make_scores(case, seed)
    S = full_scores(u, table, lc, gamma)
    want = topk_by_index(S, 10)
    for batch, budget in CHUNKINGS:
        got = rank_tags(u, table, lc, gamma, [make_truth(seed, u.shape[0], S.shape[1])],
                        batch=batch, budget=budget).top_ids.numpy()
        assert np.array_equal(np.take_along_axis(S, got, 1), np.take_along_axis(S, want, 1))
        assert all(len(set(row)) == 10 for row in got)


@pytest.mark.parametrize("case", ["quantized", "prior"])
def test_tie_topk_ids_by_tag_index(case):
    u, table, lc, gamma = make_scores(case, 0)
    S = full_scores(u, table, lc, gamma)
    want = topk_by_index(S, 10)
    truth = make_truth(0, u.shape[0], S.shape[1])
    for batch, budget in CHUNKINGS:
        got = rank_tags(u, table, lc, gamma, [truth], batch=batch, budget=budget).top_ids.numpy()
        assert np.array_equal(got, want), (batch, budget)


def test_tiny_budget_chunks_smaller_than_kmax():
    g = torch.Generator().manual_seed(0)
    u, table = torch.randn(2, 4, generator=g), torch.randn(30, 4, generator=g)
    lc = torch.zeros(30)
    truth = torch.tensor([[0, 5, PAD], [7, PAD, PAD]])
    big = rank_tags(u, table, lc, 1.0, [truth])
    tiny = rank_tags(u, table, lc, 1.0, [truth], budget=50)  # chunks of 8 tags, fewer than kmax
    assert torch.equal(tiny.top_ids, big.top_ids)
    assert torch.equal(tiny.n_gt[0], big.n_gt[0]) and torch.equal(tiny.n_ge[0], big.n_ge[0])


def test_noise_ids_without_num_tags():
    u, table = torch.tensor([[3.0, 2, 1, 0], [2, 3, 1, 0]]), torch.eye(4)  # tag 3 never in a top 2
    truth = torch.tensor([[0, PAD], [1, 2]])
    r = rank_tags(u, table, torch.zeros(4), 0.0, [truth], kmax=2)
    m = tagging_metrics(r, ks=(1,), noise_ids=torch.tensor([3]))  # tag 3 exists (V = 4)
    assert m["noise_share@1"] == 0.0


def test_expected_precision_exact_enumeration():
    """Expected hits@k under random tie-breaking, by enumerating every tie-breaking order of a tiny
    vocabulary (each order of the V tags that is sorted by score is equally likely)."""
    rng = np.random.default_rng(7)
    v, n = 7, 12
    u = torch.tensor(rng.integers(-1, 2, (n, 2)), dtype=torch.float32)
    table = torch.tensor(rng.integers(-1, 2, (v, 2)), dtype=torch.float32)
    lc = torch.tensor(rng.integers(0, 2, v), dtype=torch.float32)
    truth = make_truth(3, n, v, max_t=4, empty=2)
    S = full_scores(u, table, lc, 1.0)
    ks = (1, 2, 3, 5)
    m = tagging_metrics(rank_tags(u, table, lc, 1.0, [truth], kmax=5, batch=4, budget=4 * 4 * 5), ks=ks, num_tags=v)
    true_rows = rows(truth)
    has = [i for i in range(n) if true_rows[i]]
    orders = {i: [p for p in itertools.permutations(range(v)) if all(S[i, p[j]] >= S[i, p[j + 1]] for j in range(v - 1))]
              for i in has}
    assert any(len(o) > 1 for o in orders.values())  # ties to break
    for k in ks:
        prec = []
        for i in has:
            hits = np.mean([len(set(p[:k]) & set(true_rows[i])) for p in orders[i]])
            prec.append(hits / k)
            assert hits == pytest.approx(expected_hits_clip(S[i], true_rows[i], k), abs=1e-12)
        assert m[f"precision@{k}"] == pytest.approx(np.mean(prec), abs=TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_per_tag_and_noise_share(case, seed):
    u, table, lc, gamma = make_scores(case, seed, n=50, v=120)
    v = table.shape[0]
    truth = make_truth(seed, u.shape[0], v)
    noise = torch.tensor(np.random.default_rng(seed).choice(v, 30, replace=False))
    r = rank_tags(u, table, lc, gamma, [truth])
    m = tagging_metrics(r, noise_ids=noise, num_tags=v)
    want = ref_per_tag(r.top_ids.numpy(), truth, v, noise=set(noise.tolist()))
    assert_close(m, want)
    # num_tags left to default (max id seen + 1): same values
    assert_close(tagging_metrics(r), {k: x for k, x in want.items() if not k.startswith("noise")})
    # prefix only renames
    mp = tagging_metrics(r, noise_ids=noise, num_tags=v, prefix="val/")
    assert {k[4:]: x for k, x in mp.items()} == m


def test_per_tag_conventions_by_hand():
    """3 images, 4 tags, top-2 lists fixed by hand."""
    # scores: image 0 ranks 0 > 1 > 2 > 3; image 1 ranks 1 > 2 > ...; image 2 (no truth) ranks 3 > 0
    table = torch.eye(4)
    u = torch.tensor([[4.0, 3, 2, 1], [1, 4, 3, 2], [3, 1, 2, 4]])
    truth = torch.tensor([[0, 2], [3, PAD], [PAD, PAD]])
    r = rank_tags(u, table, torch.zeros(4), 0.0, [truth], kmax=2)
    assert r.top_ids.tolist() == [[0, 1], [1, 2], [3, 0]]
    m = tagging_metrics(r, ks=(2,), noise_ids=torch.tensor([1]), num_tags=4)
    # tags true somewhere: 0, 2, 3. predicted (images with truth): 0 x1 (hit), 1 x2, 2 x1 (miss)
    assert m["tag_precision@2"] == pytest.approx((1 / 1 + 0 / 1 + 0) / 3)  # tag 3 never predicted: 0
    assert m["tag_recall@2"] == pytest.approx((1 / 1 + 0 / 1 + 0 / 1) / 3)
    assert m["noise_share@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["precision@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    # AP: image 0: tag 0 at rank 1 (1/1), tag 2 at rank 3 (2/3); image 1: tag 3 (score 2) at rank 3 (1/3)
    assert m["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert m["map_all_images"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 3)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_chunking_does_not_change_results(case, seed):
    u, table, lc, gamma = make_scores(case, seed, n=60, v=400)
    truth = make_truth(seed, u.shape[0], table.shape[0])
    clean = make_truth(seed + 50, u.shape[0], table.shape[0], max_t=5, empty=9)
    noise = torch.arange(0, 400, 7)
    runs = [rank_tags(u, table, lc, gamma, [truth, clean], batch=b, budget=bud)
            for b, bud in ((1000, 1 << 30), (3, 3 * 13 * 10), (1000, 60 * 13 * 10), (3, 1 << 30), (13, 13 * 13 * 11))]
    base = runs[0]
    S = full_scores(u, table, lc, gamma)
    for r in runs[1:]:
        same_scores(r.top_ids, base.top_ids, S, exact_ids=case == "continuous")
        for j in range(2):
            assert torch.equal(r.n_gt[j], base.n_gt[j]) and torch.equal(r.n_ge[j], base.n_ge[j])
            assert torch.equal(r.truths[j], base.truths[j])
            a = tagging_metrics(r, which=j, noise_ids=noise, num_tags=400)
            b = tagging_metrics(base, which=j, noise_ids=noise, num_tags=400)
            same_metrics(a, b, per_tag=case == "continuous")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_two_truths_at_once(case, seed):
    u, table, lc, gamma = make_scores(case, seed)
    v = table.shape[0]
    observed = make_truth(seed, u.shape[0], v, max_t=8, empty=4)
    clean = make_truth(seed + 77, u.shape[0], v, max_t=3, empty=10)
    both = rank_tags(u, table, lc, gamma, [observed, clean], batch=11, budget=11 * 11 * 10)
    noise = torch.arange(5, v, 3)
    for j, truth in enumerate((observed, clean)):
        alone = rank_tags(u, table, lc, gamma, [truth], batch=11, budget=11 * 11 * 10)
        S = full_scores(u, table, lc, gamma)
        same_scores(both.top_ids, alone.top_ids, S, exact_ids=case == "continuous")
        assert torch.equal(both.n_gt[j], alone.n_gt[0]) and torch.equal(both.n_ge[j], alone.n_ge[0])
        assert torch.equal(both.true_scores[j], alone.true_scores[0])
        a = tagging_metrics(both, which=j, noise_ids=noise, num_tags=v)
        b = tagging_metrics(alone, noise_ids=noise, num_tags=v)
        same_metrics(a, b, per_tag=case == "continuous")
        # the per-tag metrics of each run agree with the brute force on that run's own top-k lists
        assert_close(a, ref_per_tag(both.top_ids.numpy(), truth, v, noise=set(noise.tolist())))
        assert_close(a, ref_tagging(full_scores(u, table, lc, gamma), truth))


# ----------------------------------------------------------------------------- retrieval


def ref_retrieval(S0: np.ndarray, Y: np.ndarray, queries, k: int = 10):
    aps, pks = [], []
    for q in queries:
        s, rel = S0[:, q], Y[:, q]
        aps.append(ap_pessimistic(s, rel))
        hits = 0.0
        for i in np.flatnonzero(rel):
            a = int(np.sum(s > s[i])) + 1
            b = int(np.sum(s >= s[i]))
            hits += min(1.0, max(0.0, (k - a + 1) / (b - a + 1)))
        assert hits == pytest.approx(expected_hits_kth(s, rel, k), abs=1e-9)
        pks.append(hits / k)
    return np.array(aps), np.array(pks)


@pytest.mark.parametrize("case", ["continuous", "quantized"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [40, 8])
def test_retrieval_matches_sklearn_and_brute_force(case, seed, n):
    u, table, lc, gamma = make_scores(case, seed, n=n, v=150, d=3)
    v = table.shape[0]
    truth = make_truth(seed, n, v, max_t=12, empty=2)
    S0 = full_scores(u, table, lc, 0.0)  # v_t·u: γ·log count(t) does not change an image ranking
    Y = indicator(truth, v)
    queries = np.flatnonzero(Y.sum(0) > 0)
    m, ap, pk = retrieval_metrics(u, table, truth, chunk=7)
    assert m["queries"] == len(queries) and len(ap) == len(queries) == len(pk)
    sk = np.array([average_precision_score(Y[:, q], S0[:, q]) for q in queries])
    ref_ap, ref_pk = ref_retrieval(S0, Y, queries)
    np.testing.assert_allclose(ap.numpy(), sk, atol=TOL, rtol=0)
    np.testing.assert_allclose(ap.numpy(), ref_ap, atol=TOL, rtol=0)
    np.testing.assert_allclose(pk.numpy(), ref_pk, atol=TOL, rtol=0)
    assert m["map"] == pytest.approx(sk.mean(), abs=TOL)
    assert m["precision@10"] == pytest.approx(ref_pk.mean(), abs=TOL)
    if case == "continuous" and n > 10:  # no ties: the plain top-10 count
        top = np.argsort(-S0, axis=0)[:10]  # (10, V)
        plain = [Y[top[:, q], q].sum() / 10 for q in queries]
        np.testing.assert_allclose(pk.numpy(), plain, atol=TOL, rtol=0)
    if case == "quantized":
        assert any(len(np.unique(S0[:, q])) < n for q in queries)  # the tie case really ties


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_retrieval_explicit_queries_and_chunks(seed):
    u, table, lc, gamma = make_scores("quantized", seed, n=30, v=80, d=3)
    truth = make_truth(seed, 30, 80, max_t=10, empty=3)
    S0 = full_scores(u, table, lc, 0.0)
    Y = indicator(truth, 80)
    # explicit queries, including tags true for no image (left out, counted) and a repeated one
    queries = torch.tensor([5, 79, 0, 5, 33, 2])
    m, ap, pk = retrieval_metrics(u, table, truth, queries=queries, chunk=4, prefix="r/")
    kept = [q for q in queries.tolist() if Y[:, q].sum()]
    assert set(m) == {"r/map", "r/precision@10", "r/queries", "r/queries_without_images"}
    assert m["r/queries"] == len(kept) and m["r/queries_without_images"] == len(queries) - len(kept)
    ref_ap, ref_pk = [], []
    for q in kept:
        a, p = ref_retrieval(S0, Y, [q])
        ref_ap.append(a[0])
        ref_pk.append(p[0])
        assert float(ap[len(ref_ap) - 1]) == pytest.approx(average_precision_score(Y[:, q], S0[:, q]), abs=TOL)
    np.testing.assert_allclose(ap.numpy(), ref_ap, atol=TOL, rtol=0)
    np.testing.assert_allclose(pk.numpy(), ref_pk, atol=TOL, rtol=0)
    assert m["r/map"] == pytest.approx(np.mean(ref_ap), abs=TOL)
    # other k
    m5, _, pk5 = retrieval_metrics(u, table, truth, queries=queries, k=3)
    assert "precision@3" in m5
    np.testing.assert_allclose(pk5.numpy(), [ref_retrieval(S0, Y, [q], k=3)[1][0] for q in kept], atol=TOL, rtol=0)
    # chunking of the queries changes nothing
    default = retrieval_metrics(u, table, truth, chunk=1000)
    small = retrieval_metrics(u, table, truth, chunk=2)
    assert default[0] == small[0]
    assert torch.equal(default[1], small[1]) and torch.equal(default[2], small[2])
    # empty query list
    me, ape, pke = retrieval_metrics(u, table, truth, queries=torch.zeros(0, dtype=torch.long))
    assert me["queries"] == 0 and math.isnan(me["map"]) and len(ape) == 0 and len(pke) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_prior_equals_the_full_pass_with_zero_vectors(seed):
    from im2vec.eval.ranking import rank_prior

    u, table, lc, gamma = make_scores("prior", seed)
    truth = make_truth(seed, u.shape[0], table.shape[0])
    full = rank_tags(u, table, lc, gamma, [truth], batch=7, budget=1000)
    fast = rank_prior(lc, [truth])
    assert torch.equal(fast.top_ids, full.top_ids)
    assert torch.equal(fast.n_gt[0], full.n_gt[0]) and torch.equal(fast.n_ge[0], full.n_ge[0])
    assert tagging_metrics(fast, 0) == pytest.approx(tagging_metrics(full, 0), nan_ok=True)


def test_tag_groups_rare_half_and_seen_at_most_ten_times():
    import math

    from im2vec.eval.ranking import tag_groups

    counts = torch.tensor([1000, 100, 11, 10, 9, 1])
    g = tag_groups(counts.double().clamp_min(1).log().float())  # as the table's log_counts
    assert g["le10"].tolist() == [False, False, False, True, True, True]
    assert g["rare"].tolist() == [False, False, False, True, True, True]  # median count 10 (lower median)
    assert math.log(10) < float(torch.tensor(10.0).log()) + 1e-6
