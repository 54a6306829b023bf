"""Train im2vec: ``python train.py`` (embedded default corpus) or ``python train.py +experiment=yfcc ...``."""

import hydra
from omegaconf import DictConfig

from im2vec.errors import reported, run_hydra


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@reported  # a mistake the user can fix: one line `im2vec: error: …`, exit status 2 (im2vec/errors.py)
def main(cfg: DictConfig) -> float | None:
    from im2vec.train.training import (
        train,  # here, so that a mistyped override is reported before torch loads
    )

    metrics, info = train(cfg)
    if "preempted" in info:  # a signal stopped it after writing a checkpoint: not finished, not failed
        from im2vec.train.resilience import EXIT_PREEMPTED

        raise SystemExit(EXIT_PREEMPTED)
    return metrics.get(cfg.get("optimized_metric"))  # what a -m sweep optimizes


if __name__ == "__main__":
    run_hydra(main, "train.py")
