"""Which rows a sharded table replicates (im2vec/wide/hot_rows.py): the touch probability against the samplers'
own draws, and the setting's forms. The replicated step itself is tested against one process in test_dist.py."""

from __future__ import annotations

import pytest
import torch

from im2vec.errors import BadValue
from im2vec.wide.hot_rows import check_setting, choose_hot, touch_probability
from im2vec.wide.sampler import NegativeSampler


def zipf(v: int) -> torch.Tensor:
    return (10_000 / torch.arange(1, v + 1).double()).round().long().clamp_min(1)


def test_touch_probability_matches_the_negative_samplers_draws():
    """Brute force: how often each row is among a batch's B·K negative draws, over 3,000 batches."""
    counts, b, k = zipf(500), 8, 5
    sampler, gen = NegativeSampler(counts, 0.75), torch.Generator().manual_seed(0)
    trials = 3000
    hit = torch.zeros(500)
    for _ in range(trials):
        hit[sampler.sample((b * k,), gen).unique()] += 1
    want = hit / trials
    got = touch_probability(counts, 0.75, b, k, 0).float()
    assert (got - want).abs().max() < 0.04  # 3σ of a 3,000-trial frequency is ≤ 0.027; Poisson vs exact ≤ 0.01
    assert got[0] > 0.9 and got[-1] < 0.05


def test_positive_draws_count_as_the_tags_share_of_occurrences():
    counts = torch.tensor([30, 10, 0])
    p = touch_probability(counts, 0.0, 2, 0, 1)  # no negatives; 2 images, 1 positive each
    torch.testing.assert_close(p, 1 - torch.exp(-2 * torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64)))


def test_choose_hot_by_count_and_by_probability():
    counts = zipf(1000)
    assert choose_hot(counts, 0, 0.75, 64, 20, 1).numel() == 0
    top = choose_hot(counts, 7, 0.75, 64, 20, 1)
    assert top.tolist() == list(range(7))  # the 7 most drawn; zipf counts: ids 0..6
    p = touch_probability(counts, 0.75, 64, 20, 1)
    for tau in (0.5, 0.9, 0.99):
        ids = choose_hot(counts, tau, 0.75, 64, 20, 1)
        assert ids.numel() == int((p >= tau).sum()) > 0
        assert bool((p[ids] >= tau).all())
    assert choose_hot(counts, 0.99, 0.75, 64, 20, 1).numel() < choose_hot(counts, 0.5, 0.75, 64, 20, 1).numel()


def test_unsorted_vocabulary_ids_are_chosen_by_probability_not_position():
    counts = torch.tensor([1, 1, 1000, 1, 500])
    assert choose_hot(counts, 2, 0.75, 4, 3, 1).tolist() == [2, 4]


@pytest.mark.parametrize("bad", [-1, 1.5, "many", True, 1.0])
def test_a_bad_setting_is_refused_in_one_line(bad):
    with pytest.raises(BadValue, match="optim.hot_rows"):
        check_setting(bad)


@pytest.mark.parametrize("good", [0, 0.0, False, 100, 0.5])
def test_good_settings_pass(good):
    check_setting(good)


def test_draw_share_is_the_ids_share_of_a_steps_draws():
    from im2vec.wide.hot_rows import draw_share

    counts = torch.tensor([8, 4, 2, 2])
    neg = torch.tensor([8, 4, 2, 2], dtype=torch.float64) ** 0.5
    neg /= neg.sum()
    pos = torch.tensor([8, 4, 2, 2], dtype=torch.float64) / 16
    want = float((3 * neg[[0, 2]] + pos[[0, 2]]).sum() / 4)  # 3 negatives and 1 positive per image
    assert draw_share(counts, torch.tensor([0, 2]), 0.5, 3, 1) == pytest.approx(want, rel=1e-12)
    assert draw_share(counts, torch.tensor([], dtype=torch.long), 0.5, 3, 1) == 0.0
