"""Losses of im2vec/wide/loss.py against brute-force Python loops (math.log / math.exp, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from im2vec.wide.loss import (
    full_bce_loss,
    multi_hot,
    negative_sampling_loss,
    shared_negative_loss,
)
from im2vec.wide.sampler import PAD


def logsig(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


def dot(a, b) -> float:
    return math.fsum(x * y for x, y in zip(a, b))


def ref_sampled(u, pos, neg, weight, shared: bool):
    """u: B lists of d; pos: B x P x d; neg: B x K x d (or K x d when shared); weight: B x K or None.

    Returns (loss, mean positive score, mean negative score) as floats."""
    b_count = len(u)
    losses, pos_scores, neg_num, neg_den = [], [], 0.0, 0.0
    for b in range(b_count):
        ps = [dot(u[b], v) for v in pos[b]]
        pos_scores += ps
        l_pos = math.fsum(-logsig(s) for s in ps) / len(ps)
        negs = neg if shared else neg[b]
        l_neg = 0.0
        for k, v in enumerate(negs):
            s = dot(u[b], v)
            w = 1.0 if weight is None else weight[b][k]
            l_neg += w * (-logsig(-s))
            neg_num += w * s
            neg_den += w
        losses.append(l_pos + l_neg)
    mean_neg = neg_num / max(neg_den, 1.0) if weight is not None else neg_num / neg_den
    return math.fsum(losses) / b_count, math.fsum(pos_scores) / len(pos_scores), mean_neg


def _data(b=3, p=2, k=5, d=4, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, generator=g, dtype=torch.float64)
    pos = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    neg = torch.randn(*((k, d) if shared else (b, k, d)), generator=g, dtype=torch.float64)
    weight = (torch.rand(b, k, generator=g) > 0.3).to(torch.float64)
    weight[0, 0], weight[0, 1] = 0.0, 1.0  # at least one masked and one kept
    return u, pos, neg, weight


CASES = [(negative_sampling_loss, False), (shared_negative_loss, True)]


@pytest.mark.parametrize("fn,shared", CASES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("p", [1, 3])
def test_sampled_loss_matches_brute_force(fn, shared, masked, p):
    u, pos, neg, weight = _data(p=p, shared=shared)
    w = weight if masked else None
    loss, mpos, mneg = fn(u, pos, neg, w)
    ref = ref_sampled(u.tolist(), pos.tolist(), neg.tolist(), None if w is None else w.tolist(), shared)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref[0], rel=1e-5, abs=1e-6)
    assert mpos.item() == pytest.approx(ref[1], rel=1e-5, abs=1e-6)
    assert mneg.item() == pytest.approx(ref[2], rel=1e-5, abs=1e-6)


def test_mask_changes_loss_and_all_masked_gives_zero_negative_term():
    u, pos, neg, weight = _data(p=1)
    full, _, _ = negative_sampling_loss(u, pos, neg, None)
    masked, _, _ = negative_sampling_loss(u, pos, neg, weight)
    assert masked.item() < full.item()  # masked terms are positive, so dropping them lowers the loss
    zero = torch.zeros_like(weight)
    loss, mpos, mneg = negative_sampling_loss(u, pos, neg, zero)
    only_pos = math.fsum(-logsig(dot(u[b].tolist(), pos[b, 0].tolist())) for b in range(u.shape[0])) / u.shape[0]
    assert loss.item() == pytest.approx(only_pos, rel=1e-5)
    assert mneg.item() == 0.0


def _fd_grad(f, x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Central finite differences of a Python-float function f(list) w.r.t. each entry of x."""
    out = torch.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        out.view(-1)[i] = (f(plus.view_as(x)) - f(minus.view_as(x))) / (2 * eps)
    return out


@pytest.mark.parametrize("fn,shared", CASES)
def test_sampled_loss_gradient_wrt_u(fn, shared):
    u, pos, neg, weight = _data(b=2, p=2, k=3, d=3, shared=shared, seed=1)
    u = u.clone().requires_grad_(True)
    loss, _, _ = fn(u, pos, neg, weight)
    loss.backward()

    def ref_loss(uu):
        return ref_sampled(uu.tolist(), pos.tolist(), neg.tolist(), weight.tolist(), shared)[0]

    fd = _fd_grad(ref_loss, u.detach())
    torch.testing.assert_close(u.grad, fd, rtol=1e-4, atol=1e-5)

    # analytic brute force: d/du[-log σ(s)] = -(1-σ(s)) v,  d/du[-log σ(-s)] = σ(s) v
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    ana = torch.zeros_like(u)
    for b in range(u.shape[0]):
        ub = u[b].tolist()
        for v in pos[b].tolist():
            ana[b] += torch.tensor(v, dtype=u.dtype) * (-(1 - sig(dot(ub, v))) / pos.shape[1])
        negs = neg.tolist() if shared else neg[b].tolist()
        for k, v in enumerate(negs):
            ana[b] += torch.tensor(v, dtype=u.dtype) * (weight[b, k].item() * sig(dot(ub, v)))
    ana /= u.shape[0]
    torch.testing.assert_close(u.grad, ana.detach(), rtol=1e-4, atol=1e-6)


def ref_full_bce(u, table, targets):
    b_count = len(u)
    total, pos_s, neg_s = 0.0, [], []
    for b in range(b_count):
        for t, v in enumerate(table):
            s = dot(u[b], v)
            y = targets[b][t]
            total += -(y * logsig(s) + (1 - y) * logsig(-s))
            (pos_s if y > 0 else neg_s).append(s)
    return total / b_count, math.fsum(pos_s) / len(pos_s), math.fsum(neg_s) / len(neg_s)


def test_full_bce_loss_matches_brute_force_and_gradient():
    g = torch.Generator().manual_seed(2)
    b, v, d = 3, 7, 4
    u = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(v, d, generator=g, dtype=torch.float64)
    tags = torch.tensor([[0, 3, PAD], [6, PAD, PAD], [1, 2, 6]])
    targets = multi_hot(tags, v).to(torch.float64)
    loss, mpos, mneg = full_bce_loss(u, table, targets)
    ref = ref_full_bce(u.tolist(), table.tolist(), targets.tolist())
    assert loss.item() == pytest.approx(ref[0], rel=1e-5)
    assert mpos.item() == pytest.approx(ref[1], rel=1e-5, abs=1e-6)
    assert mneg.item() == pytest.approx(ref[2], rel=1e-5, abs=1e-6)

    loss.backward()
    fd = _fd_grad(lambda uu: ref_full_bce(uu.tolist(), table.tolist(), targets.tolist())[0], u.detach())
    torch.testing.assert_close(u.grad, fd, rtol=1e-4, atol=1e-5)


def test_multi_hot_matches_loop():
    v = 6
    tags = torch.tensor([[0, 5, PAD, PAD], [PAD, PAD, PAD, PAD], [2, 2, 3, PAD], [1, 2, 3, 4]])
    out = multi_hot(tags, v)
    ref = [[0.0] * v for _ in range(tags.shape[0])]
    for b, row in enumerate(tags.tolist()):
        for t in row:
            if t != PAD:
                ref[b][t] = 1.0
    assert out.shape == (tags.shape[0], v)
    assert out.dtype.is_floating_point
    assert out.tolist() == ref
