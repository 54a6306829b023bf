"""The softmax losses of im2vec/wide/loss.py (sampled softmax with logQ, in-batch softmax) against explicit
float64 loops, their gradients against autograd on those loops, the logQ correction's purpose (the
expected sampled gradient approaches the full softmax gradient), and the head (im2vec/wide/head.py)
drawing and scoring them with a real CPUTagTable."""

from __future__ import annotations

import math

import pytest
import torch

from im2vec.wide.head import SamplerConfig, draw_ids, sampled_loss
from im2vec.wide.loss import in_batch_softmax_loss, sampled_softmax_loss
from im2vec.wide.sampler import PAD, NegativeSampler, PositiveSampler
from im2vec.wide.tag_table import CPUTagTable

F64 = torch.float64


def _lse(xs: list[torch.Tensor]) -> torch.Tensor:
    """log Σ exp over a list of 0-d tensors, one term at a time (autograd-able)."""
    m = max(x.item() for x in xs)
    total = torch.zeros((), dtype=F64)
    for x in xs:
        total = total + torch.exp(x - m)
    return m + torch.log(total)


# ---------------------------------------------------------------- brute forces


def ref_sampled_softmax(s_pos, s_neg, lq_pos, lq_neg, weight):
    """s_pos (B, P), s_neg (B, K), lq_pos (B, P), lq_neg (B, K), weight (B, K) or None, 0-d tensor loops.

    loss = mean_b mean_p [ -(s_p - lq_p) + log( exp(s_p - lq_p) + Σ_{n: w_n > 0} exp(s_n - lq_n) ) ]"""
    b_count, p_count = s_pos.shape
    per_image, pos_scores, neg_num, neg_den = [], [], 0.0, 0.0
    for b in range(b_count):
        terms = []
        for p in range(p_count):
            lp = s_pos[b, p] - lq_pos[b, p]
            cands = [lp] + [s_neg[b, k] - lq_neg[b, k] for k in range(s_neg.shape[1])
                            if weight is None or weight[b, k].item() > 0]
            terms.append(_lse(cands) - lp)
            pos_scores.append(s_pos[b, p].item())
        per_image.append(sum(terms) / p_count)
        for k in range(s_neg.shape[1]):
            w = 1.0 if weight is None else weight[b, k].item()
            neg_num += w * s_neg[b, k].item()
            neg_den += w
    mean_neg = neg_num / max(neg_den, 1.0) if weight is not None else neg_num / neg_den
    return sum(per_image) / b_count, math.fsum(pos_scores) / len(pos_scores), mean_neg


def ref_in_batch(u, pos, log_q, own):
    """u (B, d), pos (B, P, d), log_q (B, P), own (B, B·P) bool. Image b's positive p (column b·P + p)
    competes with itself and with every column c that is not one of b's own tags."""
    b_count, p_count = pos.shape[:2]
    n = b_count * p_count
    flat_pos = [pos[c // p_count, c % p_count] for c in range(n)]
    flat_lq = [log_q[c // p_count, c % p_count] for c in range(n)]
    per_image, pos_scores, neg_num, neg_den = [], [], 0.0, 0.0
    for b in range(b_count):
        logits = [torch.dot(u[b], flat_pos[c]) - flat_lq[c] for c in range(n)]
        terms = []
        for p in range(p_count):
            c0 = b * p_count + p
            cands = [logits[c0]] + [logits[c] for c in range(n) if not own[b, c]]
            terms.append(_lse(cands) - logits[c0])
            pos_scores.append(torch.dot(u[b], flat_pos[c0]).item())
        per_image.append(sum(terms) / p_count)
        for c in range(n):
            if not own[b, c]:
                neg_num += torch.dot(u[b], flat_pos[c]).item()
                neg_den += 1.0
    return sum(per_image) / b_count, math.fsum(pos_scores) / len(pos_scores), neg_num / max(neg_den, 1.0)


# ---------------------------------------------------------------- sampled softmax


def _softmax_inputs(b: int, p: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s_pos = torch.randn(b, p, generator=g, dtype=F64) * 2
    s_neg = torch.randn(b, k, generator=g, dtype=F64) * 2
    lq_pos = torch.rand(b, p, generator=g, dtype=F64).mul(4).neg()  # log q ∈ (-4, 0)
    lq_neg = torch.rand(b, k, generator=g, dtype=F64).mul(4).neg()
    weight = (torch.rand(b, k, generator=g) > 0.3).to(F64)
    weight[0, 0], weight[0, 1] = 0.0, 1.0  # one masked and one kept negative
    weight[1] = 0.0  # an image whose negatives are all masked
    return s_pos, s_neg, lq_pos, lq_neg, weight


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_sampled_softmax_matches_brute_force_and_its_gradient(p, masked):
    s_pos, s_neg, lq_pos, lq_neg, weight = _softmax_inputs(4, p, 6, seed=p + 10 * masked)
    w = weight if masked else None
    a_pos, a_neg = s_pos.clone().requires_grad_(), s_neg.clone().requires_grad_()
    loss, mpos, mneg = sampled_softmax_loss(a_pos, a_neg, lq_pos, lq_neg, w)
    r_pos, r_neg = s_pos.clone().requires_grad_(), s_neg.clone().requires_grad_()
    ref, ref_mpos, ref_mneg = ref_sampled_softmax(r_pos, r_neg, lq_pos, lq_neg, w)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)
    assert mpos.item() == pytest.approx(ref_mpos, rel=1e-6, abs=1e-9)
    assert mneg.item() == pytest.approx(ref_mneg, rel=1e-6, abs=1e-9)

    loss.backward()
    ref.backward()
    assert torch.isfinite(a_pos.grad).all() and torch.isfinite(a_neg.grad).all()  # the all-masked row too
    torch.testing.assert_close(a_pos.grad, r_pos.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a_neg.grad, r_neg.grad, rtol=1e-6, atol=1e-9)
    if masked:
        assert torch.equal(a_neg.grad[weight == 0], torch.zeros(int((weight == 0).sum()), dtype=F64))
        assert torch.all(a_neg.grad[weight > 0] > 0)  # every kept negative is pushed down
        # the all-masked image: only its positive in the softmax, loss 0 and no gradient
        assert torch.equal(a_pos.grad[1], torch.zeros(p, dtype=F64))


def test_sampled_softmax_log_q_shifts_each_logit():
    """A shared constant in log q cancels; a per-candidate one changes the loss as the formula says."""
    s_pos, s_neg, lq_pos, lq_neg, weight = _softmax_inputs(3, 2, 5, seed=3)
    base = sampled_softmax_loss(s_pos, s_neg, lq_pos, lq_neg, weight)[0]
    shifted = sampled_softmax_loss(s_pos, s_neg, lq_pos + 7.0, lq_neg + 7.0, weight)[0]
    assert shifted.item() == pytest.approx(base.item(), rel=1e-9)
    no_q = sampled_softmax_loss(s_pos, s_neg, torch.zeros_like(lq_pos), torch.zeros_like(lq_neg), weight)[0]
    ref = ref_sampled_softmax(s_pos, s_neg, torch.zeros_like(lq_pos), torch.zeros_like(lq_neg), weight)[0]
    assert no_q.item() == pytest.approx(ref.item(), rel=1e-9)
    assert abs(no_q.item() - base.item()) > 1e-2


def test_log_q_correction_makes_the_expected_gradient_the_full_softmax_gradient():
    """Negatives drawn from a skewed q over V = 8 tags: with log q subtracted the Monte-Carlo mean of the
    sampled gradient w.r.t. the scores approaches softmax(s) - onehot(y) (bias O(1/K)); without it,
    it approaches the q-tilted softmax(s + log q) - onehot(y) instead."""
    v, y, k, n = 8, 4, 512, 2000
    s0 = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.0, 0.7, -0.2], dtype=F64)
    q = torch.tensor([30, 15, 8, 4, 2, 1, 0.5, 0.5], dtype=F64)
    q = q / q.sum()
    gen = torch.Generator().manual_seed(0)
    ids = torch.multinomial(q, n * k, replacement=True, generator=gen).view(n, k)  # n draws of K negatives
    onehot = torch.zeros(v, dtype=F64)
    onehot[y] = 1.0
    full = torch.softmax(s0, 0) - onehot

    def mean_grad(log_q: torch.Tensor) -> torch.Tensor:
        s = s0.clone().requires_grad_()
        loss = sampled_softmax_loss(s[y].expand(n, 1), s[ids], log_q[y].expand(n, 1), log_q[ids])[0]
        loss.backward()  # the loss is the mean over the n draws: its gradient is the Monte-Carlo mean
        return s.grad

    corrected = mean_grad(q.log())
    torch.testing.assert_close(corrected, full, rtol=0, atol=0.015)
    assert corrected.sum().item() == pytest.approx(0.0, abs=1e-9)  # softmax gradients sum to zero

    uncorrected = mean_grad(torch.zeros(v, dtype=F64))
    assert (uncorrected - full).abs().max().item() > 0.3  # far from the full softmax gradient ...
    tilted = torch.softmax(s0 + q.log(), 0) - onehot
    torch.testing.assert_close(uncorrected, tilted, rtol=0, atol=0.015)  # ... it estimates a q-tilted one


# ---------------------------------------------------------------- in-batch softmax


def _in_batch_inputs(b: int, p: int, d: int, seed: int, all_masked_row: bool):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, generator=g, dtype=F64)
    pos = torch.randn(b, p, d, generator=g, dtype=F64)
    log_q = torch.rand(b, p, generator=g, dtype=F64).mul(3).neg()
    own = torch.rand(b, b * p, generator=g) < 0.25
    for i in range(b):
        own[i, i * p:(i + 1) * p] = True  # an image's positives are its own tags
    if all_masked_row:
        own[1] = True  # every candidate of image 1 is one of its tags
    return u, pos, log_q, own


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("all_masked_row", [False, True])
def test_in_batch_softmax_matches_brute_force_and_its_gradient(p, all_masked_row):
    u0, pos0, log_q, own = _in_batch_inputs(4, p, 3, seed=p + 5 * all_masked_row, all_masked_row=all_masked_row)
    u, pos = u0.clone().requires_grad_(), pos0.clone().requires_grad_()
    loss, mpos, mneg = in_batch_softmax_loss(u, pos, log_q, own)
    ru, rpos = u0.clone().requires_grad_(), pos0.clone().requires_grad_()
    ref, ref_mpos, ref_mneg = ref_in_batch(ru, rpos, log_q, own)
    # the scores are computed in float32 by the loss (``.float()``)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert mpos.item() == pytest.approx(ref_mpos, rel=1e-5, abs=1e-6)
    assert mneg.item() == pytest.approx(ref_mneg, rel=1e-5, abs=1e-6)
    loss.backward()
    ref.backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(pos.grad).all()
    torch.testing.assert_close(u.grad.double(), ru.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pos.grad.double(), rpos.grad, rtol=1e-4, atol=1e-6)
    if all_masked_row:
        assert u.grad[1].abs().max().item() < 1e-6  # only its own positive: loss 0, no gradient


def test_in_batch_softmax_scores_the_own_positive_once():
    """B = 2, P = 1, no other masking: a plain 2-way softmax per image."""
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    pos = torch.tensor([[[2.0, 0.0]], [[0.5, -1.0]]], dtype=F64)
    log_q = torch.tensor([[0.3], [-0.4]], dtype=F64)
    own = torch.tensor([[True, False], [False, True]])
    loss = in_batch_softmax_loss(u, pos, log_q, own)[0]
    s = [[2.0 - 0.3, 0.5 + 0.4], [0.0 - 0.3, -1.0 + 0.4]]  # logits[b][c] = u_b·v_c - log q_c
    l0 = -s[0][0] + math.log(math.exp(s[0][0]) + math.exp(s[0][1]))
    l1 = -s[1][1] + math.log(math.exp(s[1][0]) + math.exp(s[1][1]))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


# ---------------------------------------------------------------- through the head, with a real table


V, D = 24, 6
COUNTS = torch.tensor([900, 500, 300, 250, 200, 150, 120, 100, 80, 60, 50, 40,
                       30, 25, 20, 15, 12, 10, 8, 6, 4, 3, 2, 0])  # tag 23 has count 0: log count clamps to 0
TAGS = torch.tensor([[0, 1, 5, PAD, PAD],
                     [2, 23, PAD, PAD, PAD],
                     [0, 3, 7, 11, 19],
                     [1, 4, PAD, PAD, PAD],
                     [9, 10, 12, 2, PAD],
                     [6, PAD, PAD, PAD, PAD]])


def _head(cfg: SamplerConfig, seed: int):
    torch.manual_seed(seed)
    table = CPUTagTable(COUNTS, D, init_std=0.5)
    gen = torch.Generator().manual_seed(seed)
    pos_ids, neg_ids, weight = draw_ids(cfg, PositiveSampler(COUNTS, cfg.beta), NegativeSampler(COUNTS, cfg.alpha),
                                        TAGS, gen)
    u = torch.randn(TAGS.shape[0], D, generator=gen)
    return table, pos_ids, neg_ids, weight, u


def _log_count(t: int) -> float:
    return math.log(max(int(COUNTS[t]), 1))


def _own(b: int) -> set[int]:
    return {t for t in TAGS[b].tolist() if t != PAD}


def _check_table_gradient(table: CPUTagTable, ids: torch.Tensor, ref_grad: torch.Tensor):
    grad = table.weight.grad
    assert grad is not None and grad.is_sparse
    assert grad._indices()[0].tolist() == sorted(set(ids.flatten().tolist()))  # each distinct row once, sorted
    torch.testing.assert_close(grad.to_dense().double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("negatives,exclude_own", [("per_example", True), ("per_example", False), ("shared", True)])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("logq", [True, False])
def test_head_sampled_softmax_matches_brute_force(one_thread, negatives, exclude_own, p, logq):
    cfg = SamplerConfig(loss="softmax", negatives=negatives, exclude_own=exclude_own, num_negatives=7,
                        num_positives=p, alpha=0.6, logq=logq)
    table, pos_ids, neg_ids, weight, u0 = _head(cfg, seed=p + 3 * logq + 7 * exclude_own)
    b = TAGS.shape[0]
    shared = negatives == "shared"
    assert pos_ids.shape == (b, p) and neg_ids.shape == ((7,) if shared else (b, 7))
    for i in range(b):
        assert set(pos_ids[i].tolist()) <= _own(i)
    if exclude_own:  # weight 0 exactly where the negative is one of the image's own tags
        assert weight.shape == (b, 7)
        for i in range(b):
            for k in range(7):
                t = int(neg_ids[k] if shared else neg_ids[i, k])
                assert weight[i, k].item() == (0.0 if t in _own(i) else 1.0)
        if shared:
            assert (weight == 0).any()  # with shared negatives, the frequent tags do collide here
    else:
        assert weight is None

    u = u0.clone().requires_grad_()
    loss, mpos, mneg = sampled_loss(cfg, table, u, pos_ids, neg_ids, weight)

    # brute force from the table's rows, float64
    wt = table.weight.detach().double().clone().requires_grad_()
    ru = u0.double().clone().requires_grad_()
    power = cfg.alpha if logq else 0.0
    per_image = []
    for i in range(b):
        negs = [(int(neg_ids[k] if shared else neg_ids[i, k]), k) for k in range(7)]
        kept = [t for t, k in negs if weight is None or weight[i, k].item() > 0]
        terms = []
        for j in range(p):
            y = int(pos_ids[i, j])
            lp = torch.dot(wt[y], ru[i]) - power * _log_count(y)
            cands = [lp] + [torch.dot(wt[t], ru[i]) - power * _log_count(t) for t in kept]
            terms.append(_lse(cands) - lp)
        per_image.append(sum(terms) / p)
    ref = sum(per_image) / b
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    ref_mpos = torch.einsum("bd,bpd->bp", u0.double(), wt.detach()[pos_ids]).mean().item()
    assert mpos.item() == pytest.approx(ref_mpos, rel=1e-5, abs=1e-6)

    loss.backward()
    ref.backward()
    torch.testing.assert_close(u.grad.double(), ru.grad, rtol=1e-4, atol=1e-6)
    _check_table_gradient(table, torch.cat([pos_ids.flatten(), neg_ids.flatten()]), wt.grad)


def test_head_softmax_logq_flag_changes_the_loss(one_thread):
    """The same draws scored with and without the correction: different losses, the uncorrected one
    equal to sampled_softmax_loss with zero log q."""
    on = SamplerConfig(loss="softmax", num_negatives=5, logq=True)
    off = SamplerConfig(loss="softmax", num_negatives=5, logq=False)
    table, pos_ids, neg_ids, weight, u = _head(on, seed=1)
    l_on = sampled_loss(on, table, u, pos_ids, neg_ids, weight)[0].item()
    l_off = sampled_loss(off, table, u, pos_ids, neg_ids, weight)[0].item()
    s_pos = torch.einsum("bd,bpd->bp", u, table.weight.detach()[pos_ids])
    s_neg = torch.einsum("bd,bkd->bk", u, table.weight.detach()[neg_ids])
    plain = sampled_softmax_loss(s_pos, s_neg, torch.zeros_like(s_pos), torch.zeros_like(s_neg), weight)[0]
    assert l_off == pytest.approx(plain.item(), rel=1e-6)
    assert abs(l_on - l_off) > 1e-3


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("logq", [True, False])
def test_head_in_batch_matches_brute_force(one_thread, p, logq):
    cfg = SamplerConfig(loss="in_batch", num_positives=p, beta=0.25, logq=logq)  # 1 - β ≠ β
    table, pos_ids, neg_ids, weight, u0 = _head(cfg, seed=20 + p + 2 * logq)
    b = TAGS.shape[0]
    n = b * p
    flat = pos_ids.flatten().tolist()  # candidate c is positive c % P of image c // P
    assert neg_ids.numel() == 0
    assert weight.shape == (b, n)
    # the mask: candidate c is masked for image b iff its tag is one of b's own tags (b's own positives included)
    for i in range(b):
        for c in range(n):
            assert weight[i, c].item() == (0.0 if flat[c] in _own(i) else 1.0), (i, c)
        assert (weight[i, i * p:(i + 1) * p] == 0).all()
    # images 0 and 2 share tag 0, 0 and 3 share 1, 1 and 4 share 2: with these seeds some image's
    # positive is another image's own tag, so the mask has entries outside the own columns
    cross = weight.clone()
    for i in range(b):
        cross[i, i * p:(i + 1) * p] = 1.0
    assert (cross == 0).any() and (weight == 1).any()

    u = u0.clone().requires_grad_()
    loss, mpos, mneg = sampled_loss(cfg, table, u, pos_ids, neg_ids, weight)

    wt = table.weight.detach().double().clone().requires_grad_()
    ru = u0.double().clone().requires_grad_()
    power = (1.0 - cfg.beta) if logq else 0.0
    per_image = []
    for i in range(b):
        logits = [torch.dot(wt[flat[c]], ru[i]) - power * _log_count(flat[c]) for c in range(n)]
        terms = []
        for j in range(p):
            c0 = i * p + j  # its own positive: scored, while its other own tags are not candidates
            cands = [logits[c0]] + [logits[c] for c in range(n) if flat[c] not in _own(i)]
            terms.append(_lse(cands) - logits[c0])
        per_image.append(sum(terms) / p)
    ref = sum(per_image) / b
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    kept = [(i, c) for i in range(b) for c in range(n) if flat[c] not in _own(i)]
    ref_mneg = math.fsum(float(u0[i].double() @ wt.detach()[flat[c]]) for i, c in kept) / max(len(kept), 1)
    assert mneg.item() == pytest.approx(ref_mneg, rel=1e-5, abs=1e-6)

    loss.backward()
    ref.backward()
    torch.testing.assert_close(u.grad.double(), ru.grad, rtol=1e-4, atol=1e-6)
    _check_table_gradient(table, pos_ids, wt.grad)


def test_head_in_batch_masks_a_shared_tag_across_images(one_thread):
    """Two images with the same single tag: each other's positive is their own tag, so it is masked
    (not a negative), while a third image with another tag competes with both."""
    tags = torch.tensor([[3, PAD], [3, PAD], [8, PAD]])
    counts = torch.full((10,), 5)
    cfg = SamplerConfig(loss="in_batch", num_positives=1, logq=False)
    gen = torch.Generator().manual_seed(0)
    pos_ids, neg_ids, weight = draw_ids(cfg, PositiveSampler(counts), NegativeSampler(counts), tags, gen)
    assert pos_ids.flatten().tolist() == [3, 3, 8]
    assert weight.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    torch.manual_seed(0)
    table = CPUTagTable(counts, 4, init_std=0.5)
    u = torch.randn(3, 4, generator=gen)
    loss = sampled_loss(cfg, table, u, pos_ids, neg_ids, weight)[0]
    w = table.weight.detach().double()
    ud = u.double()
    s = [[float(ud[i] @ w[t]) for t in (3, 3, 8)] for i in range(3)]
    # images 0 and 1: {own positive, tag 8}; image 2: {own positive, both 3s}
    l0 = -s[0][0] + math.log(math.exp(s[0][0]) + math.exp(s[0][2]))
    l1 = -s[1][1] + math.log(math.exp(s[1][1]) + math.exp(s[1][2]))
    l2 = -s[2][2] + math.log(math.exp(s[2][2]) + math.exp(s[2][0]) + math.exp(s[2][1]))
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-5)


# ---------------------------------------------------------------- configuration


def test_sampler_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="bogus"):
        SamplerConfig(loss="bogus")
    with pytest.raises(ValueError):
        SamplerConfig(negatives="bogus")
    for loss in ("softmax", "in_batch", "negative_sampling"):
        assert SamplerConfig(loss=loss).loss == loss
