"""python -m im2vec.bench (the tag-head benchmark) end to end at tiny sizes: every case runs, the
figures are consistent with each other, goals are computed from them, huge cases are skipped."""

import json
import math
import subprocess
import sys

import pytest

from im2vec.bench.head import HEADS, main

TINY = ["--dim", "16", "--batch", "8", "--negatives", "4", "--shared", "32", "--tags-per-image", "3",
        "--steps", "3", "--warmup", "1", "--dense-steps", "2", "--whole-steps", "2", "--whole-vocab", "2000",
        "--image-size", "32", "--bandwidth-mb", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "head.json"
    # the second size is far too large for any machine: it must be skipped, not attempted
    report = main(["--sizes", "500,3000,1000000000000", "--in-process", "--json", str(out), *TINY])
    assert json.loads(out.read_text())["goals"] == report["goals"]
    return report


def test_every_case_runs_or_is_skipped(report):
    results = report["results"]
    heads = {(r["head"], r["V"]) for r in results if r["kind"] == "head" and "step_ms" in r}
    assert heads == {(h, v) for h in HEADS for v in (500, 3000)}
    assert {r["V"] for r in results if r["kind"] == "dense" and "step_ms" in r} == {500, 3000}
    skipped = [r for r in results if "skipped" in r]
    assert {r["V"] for r in skipped} == {10**12} and len(skipped) == len(HEADS) + 1  # every head and the dense one
    assert not [r for r in results if "failed" in r]


def test_figures_are_consistent(report):
    for r in report["results"]:
        if r["kind"] != "head" or "step_ms" not in r:
            continue
        parts = r["sample_ms"] + r["fwd_bwd_ms"] + r["update_ms"]
        assert 0 < r["sample_ms"] and 0 < r["update_ms"] and 0 < r["fwd_bwd_ms"]
        # a step's median and the sum of its parts' medians are timings: on a busy machine they can differ
        # by any factor, so only their being measured is checked here (the benchmark prints both)
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0 and math.isfinite(parts)
        assert 0 < r["rows"] <= r["rows_sampled"]
        tensors = 3 if r["head"] == "row_adagrad" else 7
        per_row = tensors * 16 * 4 + (8 if r["head"] == "row_adagrad" else 0)
        bandwidth = r["bandwidth_gbs"] * 1e9
        assert r["floor_ms"] == pytest.approx(r["rows"] * per_row / bandwidth * 1e3, rel=0.5)
        state = r["V"] * 4 if r["head"] == "row_adagrad" else 2 * r["V"] * 16 * 4
        assert r["min_bytes"] == r["V"] * 16 * 4 + state
        # in one process, memory freed by earlier cases may be reused: the peak can be 0 here
        assert r["peak_bytes"] >= 0 and math.isfinite(r["peak_over_min"]) and r["working_bytes"] >= 0
    whole = [r for r in report["results"] if r["kind"] == "whole"][0]
    assert 0 < whole["trunk_ms"] and 0 < whole["step_ms"]
    assert whole["wide_share"] == pytest.approx((whole["step_ms"] - whole["trunk_ms"]) / whole["step_ms"])


def test_goals_are_computed_from_the_results(report):
    goals = {g["goal"]: g for g in report["goals"]}
    head = {(r["head"], r["V"]): r for r in report["results"] if r["kind"] == "head" and "step_ms" in r}
    flat = goals["flat in V (sparse_adam)"]
    assert flat["ratio"] == pytest.approx(head[("sparse_adam", 3000)]["step_ms"] / head[("sparse_adam", 500)]["step_ms"])
    assert flat["met"] == (flat["ratio"] <= 1.5)
    dense = goals["faster than the dense head"]
    d3000 = [r for r in report["results"] if r["kind"] == "dense" and r["V"] == 3000][0]
    assert dense["ratio"] == pytest.approx(d3000["step_ms"] / head[("sparse_adam", 3000)]["step_ms"])
    for g in report["goals"]:
        assert isinstance(g["met"], bool) and math.isfinite(g["ratio"])
    assert "| goal | target | measured | met |" in report["table"]
    assert any(name.startswith("peak memory") for name in goals)
    assert "wide part of a whole step" in goals


@pytest.mark.slow  # the same cases as the in-process report above, each in a process of its own
def test_cases_run_in_child_processes(tmp_path):
    out = tmp_path / "one.json"
    proc = subprocess.run([sys.executable, "-m", "im2vec.bench", "--sizes", "400", "--heads", "sparse_adam",
                           "--no-dense", "--no-whole", "--json", str(out), *TINY],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["head"] == "sparse_adam" and r["step_ms"] > 0 and r["malloc_tuned"] in (True, False)
    assert "| 400 | sparse_adam |" in proc.stdout


def test_unknown_head_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--heads", "adamw", "--json", "/dev/null"])
    assert "unknown ['adamw']" in capsys.readouterr().err
