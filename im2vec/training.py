"""``train(cfg)``: compose objects from the Hydra config, fit, write the held-out figures.

Kept apart from the ``@hydra.main`` wrapper in ``train.py`` so tests call it directly.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from im2vec.allocator import tune_malloc
from im2vec.checkpoint import set_gamma
from im2vec.evaluating import heldout_figures
from im2vec.module import Im2VecModule

# the module moves only the images to the trunk's device (tag ids stay on the CPU for sampling), on purpose
warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, Im2VecModule]:
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as e:  # show the data module's own one-line message, not Hydra's wrapper
        raise (e.__cause__ or e) from None
    vocab = datamodule.vocab
    total_batches = schedule_length(cfg)
    module = Im2VecModule(
        encoder=instantiate(cfg.model), tags=vocab.tags, counts=vocab.counts, total_batches=total_batches,
        sampler=instantiate(cfg.sampler), optim=instantiate(cfg.optim), noise_ids=datamodule.noise_ids,
        fingerprint=vocab.fingerprint(), seed=cfg.seed, image_size=datamodule.image_size, **cfg.validation,
    )
    return datamodule, module


def schedule_length(cfg: DictConfig) -> int:
    """Batches the LR schedule spans: max_epochs × batches_per_epoch. max_steps (two optimizer steps
    per batch) only stops a run early, so a run stopped and resumed follows one schedule; it sets the
    length only when max_epochs is -1."""
    if cfg.trainer.max_epochs and cfg.trainer.max_epochs > 0:
        return cfg.trainer.max_epochs * cfg.data.batches_per_epoch
    if cfg.trainer.get("max_steps", -1) > 0:
        return cfg.trainer.max_steps // 2
    raise ValueError("set trainer.max_epochs (or trainer.max_steps with max_epochs=-1): the LR schedule needs a length")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    t0 = time.perf_counter()
    tune_malloc()  # large per-step temporaries reuse freed memory (im2vec/allocator.py)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {cfg.ckpt_path}")
    datamodule, module = build(cfg)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=instantiate(cfg.logger), callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if datamodule.val_shards and not trainer.fast_dev_run and module.report.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final held-out figures
        if trainer.checkpoint_callback is not None and Path(trainer.checkpoint_callback.best_model_path or "").is_file():
            # the last checkpoint holds the same weights: give it the γ chosen on them
            set_gamma(trainer.checkpoint_callback.best_model_path, module.gamma)
    metrics = dict(module.val_metrics)
    if datamodule.test_shards and not trainer.fast_dev_run:  # the figures to report: images nothing was chosen on
        test = heldout_figures(module.encoder, module.table.weight, module.table.log_counts, module.tags, module.gamma,
                               datamodule.test_shards, datamodule.image_size, datamodule.noise_ids,
                               list(cfg.validation.val_gammas), datamodule.val_batch_size, datamodule.num_workers,
                               datamodule.val_max_images, device=trainer.strategy.root_device)
        metrics.update(test)
        if trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in test.items() if not math.isnan(v)},
                                       step=trainer.fit_loop.epoch_loop._batches_that_stepped)
    metrics["info/seconds"] = time.perf_counter() - t0  # the whole run: data, training, held-out figures
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    print(summary(metrics, module.gamma))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def summary(m: dict[str, float], gamma: float) -> str:
    """The validation figures and, where there is a test split, the test figures, beside the frequency
    prior; the validation γ sweep."""
    if not m:
        return "no held-out figures (no validation shards)"
    chosen = " chosen on these images" if "val/gamma" in m else ""
    rows = [f"validation figures (tagging score γ={gamma:g}{chosen}):", f"  {'':24s} {'model':>7s} {'prior':>7s}"]
    for name in ("precision@1", "precision@5", "recall@10", "clean_precision@5", "noise_share@5"):
        if f"val/{name}" in m:
            rows.append(f"  {name:24s} {m[f'val/{name}']:7.3f} {m[f'val/{name}_prior']:7.3f}")
    if "test/images" in m:
        rows.append(f"test figures ({int(m['test/images'])} images of uploaders seen in neither training nor "
                    f"validation; γ={gamma:g}):")
        for name in ("precision@1", "precision@5", "recall@10", "map", "tag_precision@5", "clean/precision@5",
                     "noise_share@5"):
            if f"test/tagging/{name}" in m:
                rows.append(f"  {name:24s} {m[f'test/tagging/{name}']:7.3f} {m[f'test/prior/tagging/{name}']:7.3f}")
    gammas = sorted({float(k.rsplit("/", 1)[1]) for k in m if k.startswith("val_gamma/")})
    names = [n for n in ("precision@5", "clean_precision@5", "noise_share@5")  # clean and noise need content tags
             if any(k.startswith(f"val_gamma/{n}/") for k in m)]
    if gammas:
        heads = {"precision@5": "P@5", "clean_precision@5": "clean", "noise_share@5": "noise"}
        rows.append(f"  validation γ sweep: {'γ':>5s} " + " ".join(f"{heads[n]:>6s}" for n in names))
        for g in gammas:
            vals = [m.get(f"val_gamma/{n}/{g:g}", math.nan) for n in names]
            rows.append(f"                      {g:5.2f} " + " ".join(f"{v:6.3f}" for v in vals))
    return "\n".join(rows)
