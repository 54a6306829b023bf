"""Train im2vec: ``python train.py`` (embedded default corpus) or ``python train.py +experiment=yfcc ...``."""

import hydra
from omegaconf import DictConfig

from im2vec.training import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))  # what a -m sweep optimizes


if __name__ == "__main__":
    main()
