"""Chunked tagging scores, validation metrics and the LR schedule against brute-force references."""

import math

import pytest
import torch

from im2vec.eval.metrics import noise_share, precision_at_k
from im2vec.eval.scoring import prior_topk, topk_tags
from im2vec.train.module import SamplerConfig, warmup_cosine
from im2vec.wide.sampler import PAD


def test_chunked_topk_matches_full_scoring():
    g = torch.Generator().manual_seed(0)
    u, table = torch.randn(7, 5, generator=g), torch.randn(103, 5, generator=g)
    log_counts = torch.rand(103, generator=g) * 8
    gammas = [0.0, 0.5, 2.0]
    chunked = topk_tags(u, table, log_counts, gammas, k=6, chunk=10)
    for gamma in gammas:
        full = u @ table.t() + gamma * log_counts  # (N, V), fine at this size
        ref = torch.topk(full, 6, dim=1)
        assert torch.allclose(chunked[gamma][0], ref.values, atol=1e-5)
        assert torch.equal(chunked[gamma][1], ref.indices)


def test_prior_is_the_most_frequent_tags():
    assert prior_topk(torch.tensor([5, 50, 7, 9]), 3, 2).tolist() == [[1, 3]] * 3


def test_precision_and_noise_share_brute_force():
    pred = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    truth = torch.tensor([[3, 1, PAD], [PAD, PAD, PAD], [9, 10, 11]])  # the second image has no tags
    ref = ((2 / 3) + (1 / 3)) / 2  # images without true tags are left out
    assert precision_at_k(pred, truth, 3) == pytest.approx(ref)
    assert precision_at_k(pred, truth, 1) == pytest.approx((1 + 0) / 2)
    assert noise_share(pred, torch.tensor([2, 5, 100]), 3) == pytest.approx(2 / 9)
    assert math.isnan(precision_at_k(pred, torch.full((3, 2), PAD), 3))


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup=4, total=14, floor=0.1)
    assert [f(b) for b in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_sampler_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="negatives"):
        SamplerConfig(negatives="both")
    with pytest.raises(ValueError, match="head"):
        SamplerConfig(head="softmax")


def test_schedule_length_counts_batches():
    from omegaconf import OmegaConf

    from im2vec.train.training import schedule_length

    cfg = OmegaConf.create({"trainer": {"max_epochs": 3, "max_steps": 8}, "data": {"batches_per_epoch": 10}})
    assert schedule_length(cfg) == 30  # max_steps only stops early: one schedule across a stop and resume
    cfg.trainer.max_epochs = -1
    assert schedule_length(cfg) == 4  # two optimizer steps per batch
    cfg.trainer.max_steps = -1
    with pytest.raises(ValueError, match="max_epochs"):
        schedule_length(cfg)


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements any tensor operation produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_topk_tags_holds_a_bounded_score_matrix_whatever_the_number_of_images():
    g = torch.Generator().manual_seed(1)
    u, table, lc = torch.randn(3000, 4, generator=g), torch.randn(700, 4, generator=g), torch.rand(700, generator=g)
    with _Largest() as spy:
        got = topk_tags(u, table, lc, [0.0, 1.0], k=5, chunk=256, budget=4096)
    assert spy.largest <= 4096 * 2 + 3000 * 5  # scores held at once (a few), and the (N, k) outputs
    for gamma in (0.0, 1.0):  # the same top 5 as one full matrix
        ref = torch.topk(u @ table.t() + gamma * lc, 5, dim=1)
        assert torch.allclose(got[gamma][0], ref.values, atol=1e-5) and torch.equal(got[gamma][1], ref.indices)


@pytest.mark.parametrize("where", ["u", "table", "log_counts", "gamma"])
def test_topk_tags_refuses_nan_and_inf(where):
    from im2vec.errors import BadValue

    u, table, lc, gamma = torch.randn(4, 3), torch.randn(9, 3), torch.rand(9), 0.5
    if where == "gamma":
        gamma = math.inf
    else:
        {"u": u, "table": table, "log_counts": lc}[where][1, 0 if where != "log_counts" else ...] = math.nan
    with pytest.raises(BadValue, match=f"ranking: {where if where != 'gamma' else 'gamma inf'} has 1 NaN or infinite"):
        topk_tags(u, table, lc, [gamma], k=3)
