"""python -m im2vec.bench.scale: the arms are what they say, and a dry run (a tiny corpus, a trunk trained for a
few batches, its features, two arms) writes runs with the figures, curves, a table and a plot."""

from __future__ import annotations

import json

import pytest

from im2vec.bench.scale import ARMS, FIGURES, main, table
from im2vec.errors import UserError


def test_the_arms_cover_the_issue():
    ns = [a for a in ARMS if a.startswith("ns ")]
    assert len(ns) == 12  # α ∈ {0, .5, .75, 1} × β ∈ {0, .5, 1}
    assert ARMS["ns a0.75 b0"] == ["sampler.alpha=0.75", "sampler.beta=0"]
    assert ARMS["softmax logQ"] == ["sampler.loss=softmax"]
    assert "sampler.negatives=shared" in ARMS["shared K=2048"] and "sampler.num_negatives=2048" in ARMS["shared K=2048"]
    assert ARMS["BCE head"] == ["sampler.head=full"]
    assert {"in-batch", "lazy_adam", "row_adagrad"} <= set(ARMS)


def test_table_means_over_seeds():
    recs = [{"size": 10, "arm": "in-batch", "seed": s, "seconds": 2.0 * (s + 1), "cpu_seconds": 1.0, "curve": [],
             "images_per_s": 5.0, "metrics": {key: 0.1 * (s + 1) for _, key in FIGURES}} for s in range(2)]
    text = table(recs)
    assert "| 10 | in-batch | 2 | 0.150 ± 0.071" in text


@pytest.mark.parametrize("args", [["--arms", "nope"], ["--sizes", "x"], ["--samples", "0"]])
def test_bad_arguments_are_refused_in_one_line(args, tmp_path):
    with pytest.raises((SystemExit, UserError)):
        main([*args, "--out", str(tmp_path), "--table"])


@pytest.mark.slow
def test_dry_run_writes_runs_table_and_plot(tmp_path):
    records = main(["--dry-run", "--out", str(tmp_path)])
    assert {(r["arm"], r["size"], r["seed"]) for r in records} == {("ns a0.75 b0", 2000, 0), ("softmax logQ", 2000, 0)}
    lines = [json.loads(x) for x in (tmp_path / "scale.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for r in lines:
        for _, key in FIGURES:
            assert 0.0 <= r["metrics"][key] <= 1.0, key
        assert len(r["curve"]) >= 2 and all(t > 0 for t, _ in r["curve"])  # validations, after the run's start
        assert r["seconds"] > 0 and r["cpu_seconds"] > 0
    assert (tmp_path / "scale_2000.png").stat().st_size > 10_000
    again = main(["--dry-run", "--out", str(tmp_path)])  # finished runs are not run again
    assert [r["seconds"] for r in again] == [r["seconds"] for r in records]


def test_a_curve_is_the_last_runs_own(tmp_path):
    """A run stopped before it was recorded leaves its log in the run's folder: the curve of the run that follows
    reads its own process's files only (its seconds from its own start)."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from im2vec.bench.scale import curve

    with SummaryWriter(str(tmp_path / "tensorboard")) as tb:
        tb.add_scalar("val/precision@5", 0.5, 1)
    old = next((tmp_path / "tensorboard").glob("events.*"))
    parts = old.name.split(".")
    parts[-2] = str(int(parts[-2]) + 1)  # another process's file, written earlier
    old.rename(old.with_name(".".join(parts)))
    time.sleep(1.1)
    with SummaryWriter(str(tmp_path / "tensorboard")) as tb:
        tb.add_scalar("val/precision@5", 0.25, 1)
    points = curve(tmp_path)
    assert [v for _, v in points] == [0.25] and points[0][0] < 1.0
