"""Tag visualness (python -m im2vec.visualness): per-tag AP against brute force, the prior's exact expected AP,
the bootstrap on resampled images, a planted visual and a planted random tag, and the TSV of a trained run."""

import itertools
import json
import math
import tarfile

import pytest
import torch

from im2vec.tags import PAD
from im2vec.use.visualness import (
    COLUMNS,
    TagRow,
    average_precision,
    bootstrap_counts,
    group_ids,
    prior_average_precision,
    read_tsv,
    resampled_average_precision,
    truth_figures,
    visualness,
)


def _ranking_ap(labels: list[int]) -> float:
    """Brute force: (1/p) Σ over the relevant items of the precision at their rank, labels in ranked order."""
    hits, total = 0, 0.0
    for k, x in enumerate(labels, 1):
        hits += x
        total += hits / k if x else 0.0
    return total / sum(labels)


def _brute_ap(scores: torch.Tensor, rel: torch.Tensor) -> float:
    """Sorted by score, best first; equal scores: the irrelevant items first (pessimistic)."""
    items = sorted(zip(scores.tolist(), rel.tolist()), key=lambda x: (-x[0], x[1]))
    return _ranking_ap([int(r) for _, r in items])


def test_average_precision_matches_brute_force_and_sklearn():
    g = torch.Generator().manual_seed(0)
    for n, share in ((40, 0.3), (60, 0.05), (25, 0.6)):
        scores = torch.randn(n, generator=g)
        rel = torch.rand(n, generator=g) < share
        rel[0] = True
        assert average_precision(scores, rel) == pytest.approx(_brute_ap(scores, rel), abs=1e-12)
        try:
            from sklearn.metrics import average_precision_score
        except ImportError:
            continue
        assert average_precision(scores, rel) == pytest.approx(average_precision_score(rel.numpy(), scores.numpy()))
    # equal scores (rounded): ties ranked pessimistically, as the brute force does
    scores = (torch.randn(30, generator=g) * 2).round()
    rel = torch.rand(30, generator=g) < 0.4
    assert average_precision(scores, rel) == pytest.approx(_brute_ap(scores, rel), abs=1e-12)
    # all equal: the worst order, the relevant images last
    assert average_precision(torch.zeros(5), torch.tensor([1, 0, 0, 1, 0]).bool()) == pytest.approx(
        _ranking_ap([0, 0, 0, 1, 1]))


def test_prior_ap_is_the_exact_expectation_over_random_orders():
    for n, p in ((1, 1), (5, 1), (6, 2), (7, 3), (7, 7)):
        labels = [1] * p + [0] * (n - p)
        orders = list(itertools.permutations(range(n)))
        expected = sum(_ranking_ap([labels[i] for i in o]) for o in orders) / len(orders)
        assert float(prior_average_precision(p, n)) == pytest.approx(expected, abs=1e-12), (n, p)
    assert math.isnan(float(prior_average_precision(0, 10)))
    # above the base rate p/n for a rare tag, equal to it when every image has the tag
    assert float(prior_average_precision(5, 600)) > 5 / 600 and float(prior_average_precision(9, 9)) == 1.0


def test_resampled_ap_equals_ap_of_the_expanded_resample():
    g = torch.Generator().manual_seed(1)
    scores, rel = torch.randn(50, generator=g), torch.rand(50, generator=g) < 0.2
    rel[3] = True
    counts = bootstrap_counts(50, resamples=8, seed=2)
    assert counts.sum(1).tolist() == [50.0] * 8
    boot = resampled_average_precision(scores, rel, counts)
    for i in range(8):
        idx = torch.repeat_interleave(torch.arange(50), counts[i].long())  # the resample, copies side by side
        want = _brute_ap(scores[idx], rel[idx]) if rel[idx].any() else math.nan
        assert float(boot[i]) == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_uploader_bootstrap_draws_whole_uploaders():
    users = ["b", "a", "", "b", "c", "a", ""]
    groups = group_ids(users, [f"k{i}" for i in range(7)])
    assert groups.tolist() == [3, 2, 0, 3, 4, 2, 1]  # sorted names; an image without an uploader alone
    counts = bootstrap_counts(7, resamples=50, seed=0, groups=groups)
    for i, j in ((0, 3), (1, 5)):  # one uploader's images are drawn together
        assert torch.equal(counts[:, i], counts[:, j])
    assert counts.sum(1).ne(7).any()  # the resample's size varies
    # the resampled AP and the prior's still match the expanded resample
    g = torch.Generator().manual_seed(3)
    scores, rel = torch.randn(7, generator=g), torch.tensor([1, 0, 1, 0, 0, 1, 0]).bool()
    boot = resampled_average_precision(scores, rel, counts)
    for i in range(10):
        idx = torch.repeat_interleave(torch.arange(7), counts[i].long())
        want = _brute_ap(scores[idx], rel[idx]) if rel[idx].any() else math.nan
        assert float(boot[i]) == pytest.approx(want, abs=1e-12, nan_ok=True)


def _planted(n: int = 300, seed: int = 0):
    """Tag 0 (`visual`): its images score far above the others. Tag 1 (`random`): images drawn at random,
    scores independent of them. Tag 2 (`rare`): 3 images. Tag 3 (`absent`): none."""
    g = torch.Generator().manual_seed(seed)
    has0 = torch.rand(n, generator=g) < 0.2
    has1 = torch.rand(n, generator=g) < 0.2
    u = torch.randn(n, 4, generator=g)
    u[:, 0] += 10 * has0  # separates tag 0's images perfectly
    table = torch.eye(4)
    obs = torch.full((n, 3), PAD, dtype=torch.long)
    obs[has0, 0] = 0
    obs[has1, 1] = 1
    obs[:3, 2] = 2
    return u, table, obs, ["visual", "random", "rare", "absent"], [100, 90, 5, 2]


def test_planted_visual_and_random_tags():
    u, table, obs, tags, n_train = _planted()
    rows = visualness(u, table, obs, tags, n_train, min_images=5, threshold=0.0, resamples=100, seed=0)
    by = {r.tag: r for r in rows}
    assert [r.tag for r in rows] == ["visual", "random", "rare", "absent"]  # tested first, then the untested
    assert by["visual"].visual is True and by["visual"].ap_model == pytest.approx(1.0)
    assert by["visual"].lower > 0.5
    assert by["random"].visual is False and by["random"].lower < 0
    assert by["rare"].visual is None and math.isnan(by["rare"].lower) and by["rare"].n_heldout == 3
    assert by["absent"].visual is None and by["absent"].n_heldout == 0 and math.isnan(by["absent"].ap_model)
    n0 = int((obs == 0).any(1).sum())
    assert by["visual"].n_heldout == n0 and by["visual"].n_train == 100
    assert by["visual"].ap_prior == pytest.approx(float(prior_average_precision(n0, 300)))
    # uploaders of 10 images each, resampled whole: the same verdicts
    groups = torch.arange(300) // 10
    rows_u = visualness(u, table, obs, tags, n_train, min_images=5, resamples=100, seed=0, groups=groups)
    assert [(r.tag, r.visual) for r in rows_u] == [(r.tag, r.visual) for r in rows]
    # a threshold above the visual tag's bound: nothing is visual
    rows = visualness(u, table, obs, tags, n_train, threshold=0.99, resamples=50)
    assert not any(r.visual for r in rows)


def test_truth_figures():
    rows = [TagRow("a", 9, 9, visual=True), TagRow("b", 9, 9, visual=True), TagRow("c", 9, 9, visual=False),
            TagRow("d", 9, 9, visual=False), TagRow("e", 2, 9), TagRow("f", 0, 9)]
    f = truth_figures(rows, {"a", "c", "e", "x"})  # a: hit; b: false alarm; c: missed; e: clean, untested
    assert (f["tested"], f["visual"], f["true_positives"], f["clean_tested"], f["clean_all"]) == (4, 2, 1, 2, 3)
    assert f["precision"] == 0.5 and f["recall"] == 0.5 and f["recall_all"] == pytest.approx(1 / 3)


def test_tool_on_a_trained_run_accounts_for_every_tag(tiny_run, tmp_path, capsys):
    from im2vec.train.checkpoint import load_model
    from im2vec.visualness import main

    out = tmp_path / "visual_tags.tsv"
    assert main([str(tiny_run.ckpt), "--out", str(out), "--min-images", "3", "--resamples", "30", "--by", "uploaders",
                 "--threshold", "0.01", "--num-workers", "0", "--tensorboard", "none"]) == 0
    printed = capsys.readouterr().out
    text = out.read_text(encoding="utf-8").splitlines()
    header = [ln for ln in text if ln.startswith("#")]
    assert header and "threshold 0.01" in "\n".join(header) and str(tiny_run.ckpt) in header[0]
    users = set()  # the held-out images' uploaders, as the json files name them
    for shard in tiny_run.datamodule.test_shards:
        with tarfile.open(shard) as tar:
            users |= {json.load(tar.extractfile(m)).get("user", "") for m in tar.getmembers()
                      if m.name.endswith(".json")}
    assert len(users) > 1 and f"resamples of the uploaders (seed 0, {len(users)} uploaders)" in header[1]
    assert text[len(header)].split("\t") == list(COLUMNS)
    rows = read_tsv(out)
    tags = load_model(tiny_run.ckpt).tags
    assert sorted(r["tag"] for r in rows) == sorted(tags)  # every tag once, none dropped
    tested = [r for r in rows if r["visual"] != "NA"]
    untested = rows[len(tested):]
    assert tested and all(r["visual"] == "NA" for r in untested)  # the tested ones first
    lowers = [float(r["lower"]) for r in tested]
    assert lowers == sorted(lowers, reverse=True)
    for r in tested:
        assert int(r["n_heldout"]) >= 3 and r["visual"] == str(int(float(r["lower"]) > 0.01))
        assert float(r["lift"]) == pytest.approx(float(r["ap_model"]) - float(r["ap_prior"]), abs=2e-4)
        assert 0 <= float(r["ap_prior"]) <= 1 and 0 <= float(r["ap_model"]) <= 1 and int(r["n_train"]) >= 1
    assert all(int(r["n_heldout"]) < 3 and r["lower"] == "NA" for r in untested)
    # the printed summary counts every tag; the corpus knows its clean tags: precision and recall printed
    visual = sum(r["visual"] == "1" for r in tested)
    few = sum(r["visual"] == "NA" and int(r["n_heldout"]) > 0 for r in rows)
    none = sum(int(r["n_heldout"]) == 0 for r in rows)
    assert (f"{len(rows):,} tags: {len(tested):,} tested (≥ 3 held-out images), {visual:,} visual "
            f"(lower bound > 0.01), {len(tested) - visual:,} not; not tested (visual = NA): {few:,} with "
            f"1–2 held-out images, {none:,} with none") in printed
    assert "against the known truth" in printed and "precision" in printed and "recall" in printed


def test_tool_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from im2vec.visualness import main

    assert main([str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "v.tsv")]) == 2
    assert capsys.readouterr().err.startswith("im2vec.visualness:")


def test_evaluate_prints_the_share_of_visual_tags_in_the_top_5(tiny_run, cache_dir, tmp_path):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from im2vec.errors import BadValue
    from im2vec.train.checkpoint import load_model
    from im2vec.use.evaluate import evaluate
    from im2vec.use.visualness import write_tsv

    tags = load_model(tiny_run.ckpt).tags

    def run(rows, name):
        path = write_tsv(rows, tmp_path / f"{name}.tsv", ["test"])
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path / name}",
                                                 "num_workers=0", "grid_images=2", "query_pictures=1", "max_images=24",
                                                 f"ckpt_path={tiny_run.ckpt}", f"visual_tags={path}"])
        return evaluate(cfg)

    m = run([TagRow(t, 5, 5, visual=True) for t in tags], "all")  # every tag visual: the whole top 5 is
    assert m["tagging/visual_share@5"] == 1.0 and m["prior/tagging/visual_share@5"] == 1.0
    assert m["info/visual_tags"] == len(tags)
    m = run([TagRow(t, 5, 5, visual=i == 0) for i, t in enumerate(tags)], "one")  # one tag: at most 1 of 5
    assert 0.0 <= m["tagging/visual_share@5"] <= 0.2 and m["info/visual_tags"] == 1
    assert m["prior/tagging/visual_share@5"] == pytest.approx(0.2)  # row 0, the most frequent tag: in the prior's 5
    with pytest.raises(BadValue, match="no tag of"):
        run([TagRow("not-a-tag", 5, 5, visual=True)], "none")
