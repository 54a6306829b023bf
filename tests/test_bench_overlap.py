"""python -m im2vec.bench.overlap at tiny sizes: every case runs through the real module and the figures are
consistent (no timing goal is asserted: timed assertions are flaky on a shared machine)."""

import json

import pytest

from im2vec.bench.overlap import main


def test_overlap_benchmark_runs_every_case(tmp_path):
    out = tmp_path / "overlap.json"
    report = main(["--tags", "3000", "--dim", "16", "--batch", "8", "--negatives", "5,40", "--steps", "4",
                   "--warmup", "2", "--rounds", "1", "--image-size", "32", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["K"] for r in report["rows"]] == [5, 40]
    for r in report["rows"]:
        assert all(r[f"{c}_ms"] > 0 for c in ("trunk", "head", "serial", "overlap"))
        assert r["table_side_ms"] > 0  # (below serial_ms on a quiet machine: timed separately, not asserted)
        # the ratio is of the unrounded times, the row holds rounded ones: equal to a rounding step
        assert r["overlap_vs_bound"] == pytest.approx(r["overlap_ms"] / max(r["trunk_ms"], r["head_ms"]), abs=2e-3)
