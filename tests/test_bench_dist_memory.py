"""python -m im2vec.bench.dist_memory (peak host memory per rank of a sharded checkpoint's save, its load on W′
ranks, and validation): the phase meter sees an allocation, bad arguments are one line, and the dry run (spawned
ranks, ~30 s) reports every W × phase with finite, positive figures."""

import json
import math
import time

import pytest
import torch

from im2vec.bench.dist_memory import GAMMAS, GOAL, PhaseMeter, clear_refs_works, main
from im2vec.errors import run_cli
from im2vec.wide.sharded_table import shard_rows

MB = 1 << 20


@pytest.mark.parametrize("method", ["clear_refs", "sampling"])
def test_phase_meter_sees_a_freed_allocation(method):
    if method == "clear_refs" and not clear_refs_works():
        pytest.skip("/proc/self/clear_refs does not reset VmHWM on this kernel")
    meter = PhaseMeter(method)
    meter.start()
    x = torch.ones(64 * MB // 4)  # 64 MiB, touched, then freed before the phase ends
    time.sleep(0.05)  # the sampler's period is 5 ms
    del x
    phase = meter.stop()
    assert 60 * MB <= phase["above_bytes"] <= 128 * MB, phase
    assert phase["peak_bytes"] - phase["start_bytes"] == phase["above_bytes"]
    assert phase["seconds"] > 0


@pytest.mark.parametrize("argv, says", [(["--worlds", "1,x"], "--worlds '1,x'"), (["--tags", "0"], "--tags"),
                                        (["--load-worlds", "0"], "at least 1"),
                                        (["--tags", "3", "--worlds", "4"], "fewer tags than ranks")])
def test_bad_arguments_are_one_line(argv, says, capsys):
    assert run_cli(main, argv, exit=False) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_dry_run_reports_every_world_and_phase(tmp_path):
    out = tmp_path / "mem.json"
    t = time.perf_counter()
    report = main(["--dry-run", "--json", str(out)])
    assert time.perf_counter() - t < 120  # the dry run's promise is < 40 s; slack for a machine shared with others
    saved = json.loads(out.read_text())
    assert saved["table"] == report["table"]
    assert saved["method"] and set(saved["method"]) <= {"clear_refs", "sampling"}
    by_w = {r["W"]: r for r in saved["results"]}
    assert set(by_w) == {1, 2}
    for w, r in by_w.items():
        assert "skipped" not in r
        got = [(p["phase"], p["ranks"]) for p in r["phases"]]
        assert got == [("save", w), ("load", 1), ("load", 2), ("validate", w)], got
        for p in r["phases"]:
            for key in ("above_bytes", "own_bytes", "ratio", "seconds", "start_bytes", "peak_bytes"):
                assert math.isfinite(p[key]) and p[key] > 0, (w, p["phase"], key, p[key])
            assert p["ratio"] == p["above_bytes"] / p["own_bytes"] and p["met"] == (p["ratio"] <= GOAL)
            assert len(p["per_rank"]) == p["ranks"]
            assert p["own_bytes"] == shard_rows(20_000, p["rank"], p["ranks"]) * 64 * 4 * 3  # shard + 2 moments
            if p["phase"] == "load":
                # a rank reading its rows holds at least them afterwards: at least its own table + state more
                assert p["saved_by"] == w and p["above_bytes"] >= p["own_bytes"] * 0.95
        assert r["validation"]["images"] == 64 and r["validation"]["gammas"] == len(GAMMAS)
        assert 0 <= r["validation"]["precision@5"] <= 1
        assert len(GAMMAS) == 11 and r["checkpoint_bytes"] >= 20_000 * 64 * 4 * 3
        row = "\n".join(line for line in saved["table"].splitlines() if line.startswith(f"| {w} | load (W′=2)"))
        assert row.count("|") == 9
