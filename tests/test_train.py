"""End to end through the same train(cfg) that train.py calls, on the tiny generated corpus."""

import json

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from im2vec.train.training import train


def _tensorboard(out):
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_train_writes_metrics_checkpoint_and_tensorboard(tiny_run):
    """What the tiny default run (conftest.tiny_run, shared) wrote into its output folder."""
    out, metrics, objs = tiny_run.out, tiny_run.metrics, tiny_run.objs
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("val/precision@5", "val/precision@5_prior", "val/clean_precision@5", "val/clean_precision@5_prior",
                "val/noise_share@5", "val_gamma/clean_precision@5/0", "val_gamma/noise_share@5/2.5"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ea = _tensorboard(out)
    scalars = set(ea.Tags()["scalars"])
    for tag in ("train/loss", "train/pos_score", "train/neg_score", "train/lr", "train/images_per_s",
                "train/table_update_ms", "data/skipped_no_tag", "val/precision@5", "val/precision@5_prior"):
        assert tag in scalars, tag
    assert "val/top5_tags" in ea.Tags()["images"]
    assert (out / "tensorboard" / "projector_config.pbtxt").is_file()
    table = objs["module"].table
    assert table.weight.device.type == "cpu" and table.weight.dtype == torch.float32


def test_train_loss_goes_down(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=4", "data.batches_per_epoch=5", "trainer.check_val_every_n_epoch=4"))
    losses = [e.value for e in _tensorboard(tmp_path).Scalars("train/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("overrides", [
    ["sampler.negatives=shared", "sampler.num_negatives=64"],
    ["sampler.head=full"],
    ["optim.table_optimizer=row_adagrad", "optim.table_lr=0.1"],
    ["sampler.beta=1.0", "sampler.num_positives=3", "sampler.exclude_own=false"],
])
def test_train_variants(make_cfg, overrides):
    metrics, _ = train(make_cfg("trainer.max_epochs=1", *overrides))
    assert 0.0 <= metrics["val/precision@5"] <= 1.0


def test_fast_dev_run(make_cfg):
    _, objs = train(make_cfg("+debug=fdr"))
    assert objs["trainer"].global_step == 2  # one batch: two optimizer steps (trunk + table)


def test_yfcc_experiment_without_shards_fails_clearly(tmp_path):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=yfcc", f"paths.output_dir={tmp_path}",
                                          f"paths.data_dir={tmp_path}"])
    assert cfg.model.trunk == "resnet50" and cfg.model.dim == 256 and cfg.data.vocab_max_size == 600000
    with pytest.raises(FileNotFoundError, match="no shards match .*yfcc/train/shard-"):
        train(cfg)
