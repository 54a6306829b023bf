"""A two-value Hydra -m sweep through the real train.py entry point."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY


@pytest.mark.slow  # two trainings in a train.py process; the default run's -m check: test_errors.py (a sweep job's error)
def test_two_value_sweep(cache_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "sampler.beta=0.0,1.0", *TINY, "trainer.max_epochs=1",
           f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for job, beta in (("0", 0.0), ("1", 1.0)):
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert "val/precision@5" in metrics
        assert f"beta: {beta}" in (tmp_path / job / ".hydra" / "config.yaml").read_text()
