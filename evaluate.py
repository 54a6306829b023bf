"""Evaluate a trained checkpoint on held-out shards: ``python evaluate.py ckpt_path=outputs/train/<time>/checkpoints/last.ckpt``.

Tagging over the full vocabulary and retrieval by tag, beside the frequency prior (and a second
checkpoint with ``baseline_ckpt=…``); writes metrics.json, TensorBoard logs, pictures, a table.
"""

import hydra
from omegaconf import DictConfig

from im2vec.errors import reported, run_hydra


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@reported  # a mistake the user can fix: one line `im2vec: error: …`, exit status 2 (im2vec/errors.py)
def main(cfg: DictConfig) -> None:
    from im2vec.use.evaluate import (
        evaluate,  # here, so that a mistyped override is reported before torch loads
    )

    evaluate(cfg)


if __name__ == "__main__":
    run_hydra(main, "evaluate.py")
