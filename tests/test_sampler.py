"""NegativeSampler / PositiveSampler against brute-force references (im2vec/wide/sampler.py).

Frequencies are compared with probabilities computed independently in Python, with a
binomial tolerance |emp - p| <= 5 * sqrt(p (1 - p) / n) + 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from im2vec.wide.sampler import PAD, NegativeSampler, PositiveSampler


def _tol(p: float, n: int) -> float:
    return 5.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n) + 1e-4


def _assert_freqs(draws: list[int], probs: dict[int, float]) -> None:
    """draws: ids; probs: id -> expected probability (ids outside probs must never appear)."""
    n = len(draws)
    assert n > 0
    hist: dict[int, int] = {}
    for i in draws:
        hist[i] = hist.get(i, 0) + 1
    unexpected = set(hist) - set(probs)
    assert not unexpected, f"drew ids with probability 0: {sorted(unexpected)[:10]}"
    for i, p in probs.items():
        emp = hist.get(i, 0) / n
        assert abs(emp - p) <= _tol(p, n), f"id {i}: empirical {emp:.5f} vs expected {p:.5f} (n={n})"


def _counts(v: int = 50, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    # spread over three orders of magnitude, so alpha visibly matters
    return [int(c) for c in torch.randint(1, 2000, (v,), generator=g)]


def _ref_neg_probs(counts: list[int], alpha: float, allowed: set[int] | None = None) -> dict[int, float]:
    w = {i: (float(c) ** alpha if c > 0 else (1.0 if alpha == 0 else 0.0)) for i, c in enumerate(counts)}
    if allowed is not None:
        w = {i: x for i, x in w.items() if i in allowed}
    total = math.fsum(w.values())
    return {i: x / total for i, x in w.items() if x > 0}


# ---------------------------------------------------------------- negatives


@pytest.mark.parametrize("alpha", [0.75, 0.5, 0.0])
def test_negative_frequencies_follow_count_pow_alpha(alpha):
    counts = _counts()
    sampler = NegativeSampler(torch.tensor(counts), alpha=alpha)
    n = 200_000
    ids = sampler.sample((n,), torch.Generator().manual_seed(1))
    assert ids.shape == (n,) and ids.dtype == torch.long
    _assert_freqs(ids.tolist(), _ref_neg_probs(counts, alpha))


def test_negative_sample_shape_and_probs_attribute():
    counts = _counts(v=7)
    sampler = NegativeSampler(torch.tensor(counts), alpha=0.75)
    ref = _ref_neg_probs(counts, 0.75)
    for i in range(7):
        assert sampler.probs[i].item() == pytest.approx(ref[i], rel=1e-6)
    out = sampler.sample((3, 4, 5), torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 5)
    assert ((out >= 0) & (out < 7)).all()


def test_negative_zero_counts_never_drawn_and_last_tag_covered():
    # zero-count tags at both ends and in the middle, heavy last positive tag
    counts = [0, 0, 5, 0, 1, 3, 0, 1000]
    sampler = NegativeSampler(torch.tensor(counts), alpha=0.75)
    ids = sampler.sample((100_000,), torch.Generator().manual_seed(2))
    assert ((ids >= 0) & (ids < len(counts))).all()
    _assert_freqs(ids.tolist(), _ref_neg_probs(counts, 0.75))
    assert (ids == len(counts) - 1).any()

    # trailing zero counts: the last *positive* tag must still be reachable, the zeros never
    counts = [3, 1, 7, 0, 0]
    sampler = NegativeSampler(torch.tensor(counts), alpha=0.5)
    ids = sampler.sample((50_000,), torch.Generator().manual_seed(3))
    assert set(ids.tolist()) == {0, 1, 2}


def test_negative_cdf_inverse_matches_brute_force(monkeypatch):
    """Feed chosen uniforms into ``sample`` and compare with a Python inverse-CDF loop."""
    counts = [0, 4, 1, 0, 9, 2, 0, 30, 1, 0]  # includes a trailing zero
    alpha = 0.75
    w = [float(c) ** alpha if c > 0 else 0.0 for c in counts]
    total = math.fsum(w)

    def ref(u: float) -> int:
        acc = 0.0
        for i, x in enumerate(w):
            acc += x
            if x > 0 and u < acc / total:
                return i
        return max(i for i, x in enumerate(w) if x > 0)

    grid = [0.0, 1e-12, 0.01, 0.2, 0.37, 0.5, 0.77, 0.9, 0.999, 0.999999, 1.0 - 2.0 ** -53]
    gen = torch.Generator().manual_seed(4)
    grid += torch.rand(200, generator=gen, dtype=torch.float64).tolist()
    fake_u = torch.tensor(grid, dtype=torch.float64)

    sampler = NegativeSampler(torch.tensor(counts), alpha=alpha)
    real_rand = torch.rand

    def fake_rand(shape, *args, **kwargs):
        assert tuple(shape) == (len(grid),)
        return fake_u.clone()

    monkeypatch.setattr(torch, "rand", fake_rand)
    ids = sampler.sample((len(grid),), torch.Generator())
    monkeypatch.setattr(torch, "rand", real_rand)
    assert ids.tolist() == [ref(u) for u in grid]

    # a uniform that rounded up to exactly 1.0 must still give an id in range
    monkeypatch.setattr(torch, "rand", lambda shape, *a, **k: torch.ones(shape, dtype=torch.float64))
    ids = sampler.sample((5,), torch.Generator())
    assert ((ids >= 0) & (ids < len(counts))).all()


def test_negative_sampler_rejects_bad_counts():
    with pytest.raises(ValueError):
        NegativeSampler(torch.zeros(5, dtype=torch.long), alpha=0.75)


# ---------------------------------------------------------------- negatives avoiding own tags


def test_sample_excluding_avoids_own_tags_and_keeps_restricted_distribution():
    v = 12
    counts = [int(c) for c in torch.randint(1, 100, (v,), generator=torch.Generator().manual_seed(5))]
    counts[0], counts[3] = 5000, 3000  # make own tags heavy so collisions and redraws happen
    alpha = 0.75
    own = torch.tensor([
        [0, 3, 7, PAD],
        [1, PAD, PAD, PAD],
        [0, 11, PAD, PAD],
        [2, 3, 4, 5],
    ])
    sampler = NegativeSampler(torch.tensor(counts), alpha=alpha)
    k = 50_000
    ids, weight = sampler.sample_excluding(own, k, torch.Generator().manual_seed(6))
    assert ids.shape == (own.shape[0], k) and weight.shape == (own.shape[0], k)
    assert weight.dtype.is_floating_point
    assert set(weight.unique().tolist()) <= {0.0, 1.0}
    assert ((ids >= 0) & (ids < v)).all()

    full = _ref_neg_probs(counts, alpha)
    for b in range(own.shape[0]):
        own_set = {t for t in own[b].tolist() if t != PAD}
        row, wrow = ids[b].tolist(), weight[b].tolist()
        # weight 0 exactly where the id is one of the image's own tags
        for i, w in zip(row, wrow):
            assert (w == 1.0) == (i not in own_set)
        kept = [i for i, w in zip(row, wrow) if w == 1.0]
        allowed = set(range(v)) - own_set
        _assert_freqs(kept, _ref_neg_probs(counts, alpha, allowed))
        # redraws make the leftover collisions rare: at most q^(rounds+1) of the slots
        q = sum(full[t] for t in own_set)
        masked = 1.0 - len(kept) / k
        bound = q ** 5
        assert masked <= bound + _tol(bound, k), (b, masked, bound)


# ---------------------------------------------------------------- positives


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_positive_frequencies_follow_inverse_count_within_image(beta):
    counts = [1, 2, 5, 10, 50, 100, 400, 1000, 3, 7]
    tags = torch.tensor([
        [0, 4, 7, PAD, PAD],
        [9, PAD, PAD, PAD, PAD],
        [1, 2, 3, 5, 6],
        [8, 7, PAD, PAD, PAD],
    ])
    sampler = PositiveSampler(torch.tensor(counts), beta=beta)
    p = 50_000
    out = sampler.sample(tags, p, torch.Generator().manual_seed(7))
    assert out.shape == (tags.shape[0], p) and out.dtype == torch.long
    assert (out != PAD).all()
    for b in range(tags.shape[0]):
        own = [t for t in tags[b].tolist() if t != PAD]
        w = {t: float(max(counts[t], 1)) ** (-beta) for t in own}
        total = math.fsum(w.values())
        _assert_freqs(out[b].tolist(), {t: x / total for t, x in w.items()})


def test_positive_single_tag_and_pad_never_drawn():
    counts = torch.tensor([10, 20, 30])
    sampler = PositiveSampler(counts, beta=1.0)
    tags = torch.tensor([[2, PAD, PAD], [0, 1, PAD]])
    out = sampler.sample(tags, 1000, torch.Generator().manual_seed(8))
    assert (out[0] == 2).all()
    assert set(out[1].tolist()) <= {0, 1}


def test_positive_sampler_rejects_image_without_tags():
    sampler = PositiveSampler(torch.tensor([3, 4, 5]), beta=0.5)
    with pytest.raises(ValueError):
        sampler.sample(torch.tensor([[0, 1], [PAD, PAD]]), 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        sampler.sample(torch.empty(2, 0, dtype=torch.long), 1, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- reproducibility


def test_same_seed_same_draws_and_state_restore():
    counts = torch.tensor(_counts(v=40))
    neg, pos = NegativeSampler(counts, 0.75), PositiveSampler(counts, 0.5)
    own = torch.tensor([[0, 1, 2, PAD], [5, PAD, PAD, PAD], [39, 38, 7, 6]])

    def draw(gen):
        return (neg.sample((3, 17), gen), neg.sample_excluding(own, 25, gen), pos.sample(own, 4, gen))

    a, b = draw(torch.Generator().manual_seed(123)), draw(torch.Generator().manual_seed(123))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])
    assert torch.equal(a[2], b[2])
    c = draw(torch.Generator().manual_seed(124))
    assert not torch.equal(a[0], c[0])

    # exact resume: save the generator state, draw, restore, draw again
    gen = torch.Generator().manual_seed(9)
    draw(gen)
    state = gen.get_state()
    first = draw(gen)
    resumed = torch.Generator()
    resumed.set_state(state)
    second = draw(resumed)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1][0], second[1][0]) and torch.equal(first[1][1], second[1][1])
    assert torch.equal(first[2], second[2])


def test_samplers_refuse_negative_counts():
    from im2vec.wide.sampler import NegativeSampler, PositiveSampler

    counts = torch.tensor([5, -2, 3])
    with pytest.raises(ValueError, match=r"counts must be non-negative \(tag 1 has -2\)"):
        NegativeSampler(counts)
    with pytest.raises(ValueError, match=r"counts must be non-negative \(tag 1 has -2\)"):
        PositiveSampler(counts, beta=1.0)


def test_positive_sampler_does_not_underflow_at_large_beta_and_counts():
    """count^(-beta) in float32 is 0 for count 1e6 and beta 8: the draws must still follow the brute force."""
    from im2vec.wide.sampler import PositiveSampler

    counts = torch.tensor([1_000_000, 2_000_000, 3_000_000, 10])
    s = PositiveSampler(counts, beta=8.0)
    tags = torch.tensor([[0, 1, 2, -1]] * 4000)  # an image with three huge-count tags only
    got = torch.bincount(s.sample(tags, 1, generator=torch.Generator().manual_seed(0)).flatten(), minlength=4)
    w = np.array([1.0, 2.0 ** -8, 3.0 ** -8])  # brute force, float64, relative to tag 0's weight
    want = w / w.sum() * 4000
    assert got[3] == 0 and abs(int(got[0]) - want[0]) <= 4 * np.sqrt(want[0] * (1 - w[0] / w.sum())) + 1
    assert int(got[1]) + int(got[2]) == 4000 - int(got[0])
