"""python -m im2vec.bench.features --dry-run: both modes run through the real config on a tiny corpus and the
report is consistent (no speed or quality goal is asserted: timings are flaky on a shared machine)."""

import json

from im2vec.bench.features import main


def test_features_benchmark_dry_run(cache_dir, tmp_path):
    out = tmp_path / "features.json"
    report = main(["--dry-run", "--cache-dir", str(cache_dir), "--work", str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["trunk"] == "small_cnn" and report["V"] > 0 and report["width"] == 128
    assert report["extraction"]["train"]["images"] == 192 and report["extraction"]["images_per_s"] > 0
    rates = report["images_per_s"]
    assert rates["end-to-end"] > 0 and rates["features"] > 0
    assert report["speedup"] == rates["features"] / rates["end-to-end"]
    run = report["runs"]["end-to-end"]
    assert run["batches"] >= 1 and 0 <= run["val/precision@5"] <= 1 and 0 <= run["test/tagging/precision@5"] <= 1
    assert 0 <= run["val/precision@5_prior"] <= 1
    fm = report["runs"]["features"]  # a dry run gives it at least 1 s, whatever extracting took
    assert fm["batches"] >= 1 and 0 <= fm["val/precision@5"] <= 1 and 0 <= fm["test/tagging/precision@5"] <= 1
