"""The README's first run, whole (about 3.5 minutes on 2 cores): marked slow, run with -m slow."""

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from im2vec.train.training import train


@pytest.mark.slow
def test_default_run_beats_the_prior_and_ignores_noise(tmp_path):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}",
                                          "trainer.enable_progress_bar=false"])
    m, _ = train(cfg)
    assert m["val/clean_precision@5"] >= 3 * m["val/clean_precision@5_prior"]
    assert m["val/noise_share@5"] < 0.10
    assert m["val/precision@5"] > m["val/precision@5_prior"]
