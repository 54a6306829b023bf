"""python -m im2vec.bench.gpu: the dry run (the GPU check's code path on the CPU, tiny) passes its placement
checks end to end; a table optimizer state off the CPU is reported and fails the check."""

import json
import subprocess
import sys

import pytest
import torch

from im2vec.bench import gpu, gpu_probe
from im2vec.deep.encoder import ImageEncoder
from im2vec.train.module import Im2VecModule
from im2vec.wide.tag_table import make_table_optimizer

PASSED = ("| placement, main | PASS |", "| placement, resume | PASS |", "| placement, other runs | PASS |",
          "| every run finishes as configured | PASS |")


@pytest.mark.slow  # the benchmark's whole dry run (several trainings in a process of its own)
def test_dry_run_passes_the_placement_checks(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "im2vec.bench.gpu", "--dry-run", "--out", str(out),
                           "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = (out / "summary.md").read_text()
    assert summary.strip() in proc.stdout
    for line in PASSED:
        assert line in summary
    assert "| peak GPU memory flat in V | skipped | skipped: no CUDA |" in summary
    assert "FAIL:" not in proc.stderr
    saved = json.loads((out / "results.json").read_text())
    results = saved["results"]
    assert list(results) == list(gpu.RUNS)
    for name, r in results.items():
        assert "error" not in r and "skipped" not in r and not r["placement"] and not r["failures"], name
        assert r["images_per_s"] > 0 and r["batches_run"] == r["batches"], name
    assert results["resume"]["resume_from"] == results["main"]["checkpoint"]
    assert results["main"]["overlap_effective"] is True and results["no_overlap"]["overlap_effective"] is False
    assert results["main"]["table_update_ms"] > 0 and results["no_head"]["table_update_ms"] == 0  # the logged breakdown
    assert not (out / "main" / "checkpoints" / "last.ckpt").exists()  # removed unless --keep-checkpoints


def _module_and_optimizer():
    counts = (1000.0 / torch.arange(1, 301)).round().clamp_min(1)
    module = Im2VecModule(ImageEncoder("small_cnn", 8), [f"t{i}" for i in range(300)], counts, total_batches=1)
    opt = make_table_optimizer("sparse_adam", [module.table.weight], 0.01)
    ids = torch.tensor([[3, 7, 11]])
    module.table.weight.grad = torch.sparse_coo_tensor(ids, torch.ones(3, 8), module.table.weight.shape,
                                                        check_invariants=True).coalesce()
    opt.step()
    module.table.weight.grad = None
    return module, opt


def test_state_off_the_cpu_is_reported_and_fails(capsys):
    module, opt = _module_and_optimizer()
    assert gpu_probe.placement_failures(module, "cpu", "after fit", table_optimizer=opt, need_state=True) == []
    assert any("trunk" in f and "not cuda" in f for f in gpu_probe.placement_failures(module, "cuda", "x", opt))

    state = opt.state[module.table.weight]
    state["exp_avg"] = state["exp_avg"].to("meta")  # as if a restore had moved it to the trunk's device
    bad = gpu_probe.placement_failures(module, "cpu", "after fit", table_optimizer=opt)
    assert len(bad) == 1 and "'exp_avg'" in bad[0] and "meta" in bad[0]

    opt.state.clear()  # nothing to check is not a pass after a run with the head
    assert gpu_probe.placement_failures(module, "cpu", "after fit", table_optimizer=opt, need_state=True)
    assert gpu_probe.placement_failures(module, "cpu", "after fit", table_optimizer=opt, need_state=False) == []

    # the report: a failed placement check exits 1 with one line per reason, and shows FAIL in the table
    plan = gpu.dry_plan(2)
    run = {"name": "main", "vocab": plan.vocab, "head": True, "decode": "cpu", "overlap": "true", "batches": 4,
           "placement": [f"main: {b}" for b in bad], "failures": [], "images_per_s": 100.0}
    assert gpu.finish({"main": run}, plan, "header") == 1
    captured = capsys.readouterr()
    assert "| placement, main | FAIL |" in captured.out
    assert [line for line in captured.err.splitlines() if line.startswith("FAIL:")] == [
        f"FAIL: placement, main: main: {bad[0]}"]
    run["placement"] = []
    assert gpu.finish({"main": run}, plan, "header") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_a_gpu_run_is_refused_in_one_line(capsys):
    assert gpu.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a GPU" in err[0] and "--dry-run" in err[0]
