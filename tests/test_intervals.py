"""Bootstrap intervals over uploaders and the rule that chooses γ (im2vec.eval.intervals), against brute force."""

import pytest
import torch

from im2vec.eval.intervals import bootstrap_means, choose, interval
from im2vec.eval.validation import ValidationReport


def test_bootstrap_means_resample_uploaders_with_their_images():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(40, 3, generator=g, dtype=torch.float64)
    values[[3, 17]] = float("nan")  # images without a true tag: left out
    users = [f"u{i % 6}" for i in range(38)] + ["", ""]  # the last two: uploaders of one image each
    boot = bootstrap_means(values, users, resamples=50, seed=7)
    # brute force: the same draws (torch.randint over the groups, in order of first appearance), image-weighted
    keep = [i for i in range(40) if i not in (3, 17)]
    # groups numbered in sorted order of their names (an image alone: by its index here, no keys given); a group
    # of dropped images only would vanish
    name = {i: users[i] or f"\0{i}" for i in range(40)}
    groups = [g for g in sorted(set(name.values())) if any(name[i] == g for i in keep)]
    members = {k: [i for i in keep if name[i] == k] for k in groups}
    draws = torch.randint(len(groups), (50, len(groups)), generator=torch.Generator().manual_seed(7))
    for r in range(50):
        rows = [i for j in draws[r].tolist() for i in members[groups[j]]]
        assert torch.allclose(boot[r], values[rows].mean(0))
    lo, hi = interval(boot)
    assert (lo <= boot.median(0).values).all() and (boot.median(0).values <= hi).all()
    # the same images in another order (as ranks or loader workers deliver them), named by keys: the same draws
    keys = [f"img{i}" for i in range(40)]
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2)).tolist()
    again = bootstrap_means(values[perm], [users[i] for i in perm], [keys[i] for i in perm], resamples=50, seed=7)
    assert torch.allclose(again, bootstrap_means(values, users, keys, resamples=50, seed=7))


def test_the_interval_over_uploaders_is_wider_than_one_over_images_when_uploaders_differ():
    """10 uploaders of 100 images each, each uploader with its own level: resampling uploaders shows how little 10
    of them say; resampling the images as if independent (no uploader) would claim far more."""
    g = torch.Generator().manual_seed(0)
    level = torch.rand(10, generator=g, dtype=torch.float64)
    values = (level.repeat_interleave(100) + 0.05 * torch.randn(1000, generator=g, dtype=torch.float64)).unsqueeze(1)
    by_user = [f"u{i // 100}" for i in range(1000)]
    lo, hi = interval(bootstrap_means(values, by_user))
    lo1, hi1 = interval(bootstrap_means(values, [""] * 1000))
    assert float(hi - lo) > 3 * float(hi1 - lo1)


def test_choose_best_and_within():
    gammas = [0.0, 0.5, 1.0, 2.0]
    g = torch.Generator().manual_seed(3)
    users = [f"u{i % 30}" for i in range(300)]
    base = torch.rand(300, generator=g, dtype=torch.float64)
    # γ = 2 as good as γ = 1 up to image-level noise; γ = 0 and 0.5 clearly worse
    noise = 0.05 * torch.randn(300, generator=g, dtype=torch.float64)
    close = torch.stack([base - 0.3, base - 0.2, base + 0.01, base + 0.008 + noise - noise.mean()], 1)
    point = close.mean(0)
    boot = bootstrap_means(close, users)
    best, info = choose(gammas, point, boot, "best")
    assert best == int(point.argmax()) == 2  # γ = 1 by 0.002: noise, which the interval says
    within, info = choose(gammas, point, boot, "within")
    assert gammas[within] == 2.0 and info["diff_hi"][within] >= 0
    # now γ = 2 worse by 0.05 for every image: the paired bootstrap tells it apart, the best γ (1) is taken
    clear = close.clone()
    clear[:, 3] = base - 0.04
    assert gammas[choose(gammas, clear.mean(0), bootstrap_means(clear, users), "within")[0]] == 1.0
    # ties: the smaller γ
    tied = torch.stack([base, base, base - 0.5, base - 0.5], 1)
    assert choose(gammas, tied.mean(0), bootstrap_means(tied, users), "best")[0] == 0
    with pytest.raises(ValueError):
        choose(gammas, point, boot, "newest")


def test_the_report_chooses_by_the_rule_and_gives_intervals_over_uploaders():
    """A toy vocabulary where the frequency prior is right for most uploaders: the report's figures come with
    an interval, the uploaders are counted, and the two rules choose as intervals.choose says."""
    torch.manual_seed(0)
    v, d, n = 20, 8, 120
    counts = torch.tensor([float(100 - 4 * i) for i in range(v)])
    table = torch.randn(v, d)
    u = torch.randn(n, d)
    obs = torch.tensor([[i % 3, (i * 7) % v] for i in range(n)])
    users = [f"u{i % 12}" for i in range(n)]
    gammas = [0.0, 0.5, 1.0, 2.0, 4.0]
    got = {}
    for rule in ("best", "within"):
        r = ValidationReport([f"t{i}" for i in range(v)], counts, None, 0.0, gammas, 5, 0, gamma_rule=rule)
        r.add(u, obs, torch.full((n, 1), -1), [f"k{i}" for i in range(n)], None, users)
        m = r.compute(table, counts.log(), step=1)
        got[rule] = m["val/gamma"]
        assert m["val/uploaders"] == 12 and m["val/images"] == n
        assert m["val/recall@10_lo"] <= m["val/recall@10"] <= m["val/recall@10_hi"]
        assert m["val/precision@5_lo"] <= m["val/precision@5"] <= m["val/precision@5_hi"]
        assert m[f"val_gamma/recall@10_diff_hi/{m['val/best_gamma']:g}"] == 0  # the best against itself
    # brute force: recall@10 at each γ from the full score matrix; "best" takes its argmax (ties: the smaller γ)
    recall = {}
    for g in gammas:
        top = (u @ table.t() + g * counts.log()).topk(10, dim=1).indices
        recall[g] = sum(len(set(top[i].tolist()) & set(obs[i].tolist())) / len(set(obs[i].tolist()))
                        for i in range(n)) / n
    assert got["best"] == max(gammas, key=lambda g: (round(recall[g], 9), -g))
    assert got["within"] >= got["best"]
