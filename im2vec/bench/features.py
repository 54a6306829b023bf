"""The frozen-trunk fast mode against end-to-end training: speed at the same V, quality at equal wall time.

    python -m im2vec.bench.features                         # small_cnn at 64 px on the generated corpus, T = 120 s
    python -m im2vec.bench.features --trunk resnet18 --seconds 300 --json features.json
    python -m im2vec.bench.features --dry-run               # a tiny corpus and a few batches: that it runs (the test)

On the generated corpus (``python train.py``'s, or ``--cache-dir``'s), with one trunk architecture at one
image size, batch size B and vocabulary V:

- **extraction**: one pass of the frozen trunk (``im2vec.train.features.extract``: eval view, fp16) over the
  training and validation splits, images/s;
- **speed**: a fit of the real ``Im2VecModule`` built from the real Hydra config on the image shards
  (trunk forward and backward, W, the tag table) and one on the feature shards (``+experiment=features``:
  W and the table), interleaved, ``--rounds`` times, the best kept: images/s over ``--steps`` batches after
  ``--warmup`` (data loading included: each reads its shards as training does);
- **quality at equal wall time T** (``--seconds``): ``train(cfg)`` end-to-end, its schedule sized to T at the
  speed just measured and stopped at T (``trainer.max_time``), against the same for the features mode with T
  less the extraction of its train and val splits; validation P@5 (γ chosen there) beside the frequency
  prior's, and the closing test figures (on the test images, through each checkpoint's whole encoder).

The frozen trunk is a random init (``--seed``): there are no pretrained weights on this machine, and nothing
is downloaded. With a pretrained trunk the features mode is the usual linear probe of it; here it measures
what W and the table learn from random features, against a trunk that learns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from im2vec.bench.overlap import (
    BatchClock,  # batch start to batch start, after a warmup
)
from im2vec.errors import ArgumentParser, BadValue, run_cli

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ sits beside the package
DRY = {"data.corpus.num_train": 192, "data.corpus.num_val": 64, "data.corpus.num_test": 48,  # tests/conftest.py's
       "data.corpus.num_users": 12, "data.corpus.tail_size": 300, "data.corpus.shard_size": 64,
       "data.vocab_min_count": 1, "data.num_workers": 0, "data.shuffle_buffer": 50, "data.val_batch_size": 64}


class FitClock(pl.Callback):
    """The seconds a fit trained (from its first batch's start to its end: no setup, no closing figures)."""

    def __init__(self):
        self.start, self.seconds, self.batches = None, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - (self.start or time.perf_counter())


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def _speed(cfg, warmup: int, steps: int, device: str) -> float:
    """Images/s of the fit's steady state for ``cfg`` (image or feature batches), validation off."""
    from im2vec.errors import make
    from im2vec.train import threads
    from im2vec.train.training import build_module

    datamodule = make(cfg.data)
    datamodule.pin_memory = device == "cuda"
    threads.apply(threads.plan(datamodule.num_workers, 1, device == "cuda", False))  # as train() plans them
    module = build_module(cfg, datamodule)
    clock = BatchClock(warmup)
    trainer = pl.Trainer(accelerator=device, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[clock], log_every_n_steps=max(1, steps // 2),
                         precision=cfg.trainer.precision)
    trainer.fit(module, datamodule=datamodule)
    return cfg.data.batch_size * clock.n / (clock.end - clock.start)


def _timed_run(overrides: list[str], seconds: float, rate: float, batch: int, out: Path) -> dict:
    """train(cfg) with a schedule of ``seconds`` × ``rate`` images, stopped at ``seconds`` of fitting."""
    from im2vec.train.training import train

    batches = max(1, round(seconds * rate / batch))
    s = max(1, int(seconds))
    cfg = _compose([*overrides, f"paths.output_dir={out}", "trainer.max_epochs=1", f"data.batches_per_epoch={batches}",
                    f"+trainer.max_time=00:00:{s // 60:02d}:{s % 60:02d}", "+callbacks.clock._target_="
                    "im2vec.bench.features.FitClock", "optim.warmup_batches=" + str(min(50, max(1, batches // 10)))])
    metrics, objs = train(cfg)
    # by name: run as a script, this module is __main__ and Hydra built the callback from im2vec.bench.features
    clock = next(c for c in objs["trainer"].callbacks if type(c).__name__ == "FitClock")
    return {"seconds": clock.seconds, "batches": clock.batches, "images": clock.batches * batch, **{
        k: metrics.get(k, float("nan")) for k in (
            "val/precision@5", "val/precision@5_prior", "val/clean_precision@5", "val/clean_precision@5_prior",
            "val/noise_share@5", "test/tagging/precision@5", "test/prior/tagging/precision@5",
            "test/tagging/clean/precision@5", "test/prior/tagging/clean/precision@5")}}


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.features", description=__doc__.split("\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trunk", default="small_cnn", help="the trunk of both modes (small_cnn, resnet18, …)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64, help="d")
    ap.add_argument("--batch", type=int, default=64, help="B of both modes")
    ap.add_argument("--steps", type=int, default=40, help="timed batches per speed fit")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="speed fits per mode, interleaved; best kept")
    ap.add_argument("--seconds", type=float, default=120.0, help="T: the wall time of each mode's training")
    ap.add_argument("--seed", type=int, default=0, help="the frozen trunk's random init")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the trunk's and W's device)")
    ap.add_argument("--cache-dir", default=os.environ.get("IM2VEC_CACHE", str(Path.home() / ".cache" / "im2vec")),
                    help="where the generated corpus is (generated there on first use)")
    ap.add_argument("--work", default=None, help="folder for features and runs (default: a temporary one, removed)")
    ap.add_argument("--dry-run", action="store_true",
                    help="a tiny corpus, 32 px, a few batches, T = 3 s (the features run gets ≥ 1 s)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.image_size, args.dim, args.batch, args.steps, args.warmup, args.rounds = 32, 16, 16, 3, 1, 1
        args.seconds = 3.0
    if min(args.image_size, args.dim, args.batch, args.steps, args.rounds) < 1 or args.warmup < 0 or args.seconds <= 0:
        raise BadValue("bench.features: sizes, steps and rounds must be ≥ 1, --seconds > 0", "see --help")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="im2vec-bench-features-"))
    try:
        return _bench(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args, work: Path) -> dict:
    from im2vec.data.corpus import CorpusSpec, ensure_corpus
    from im2vec.train import threads
    from im2vec.train.features import extract
    from im2vec.train.frozen_trunk import load_trunk

    feats = work / "features"
    common = [f"paths.cache_dir={args.cache_dir}", f"data.batch_size={args.batch}", f"model.dim={args.dim}",
              f"trainer.accelerator={args.device}", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "validation.grid_images=0", "validation.projector_tags=100",
              *(f"{k}={v}" for k, v in (DRY.items() if args.dry_run else ()))]
    e2e = [*common, f"model.trunk={args.trunk}", f"data.image_size={args.image_size}"]
    fm = [*common, "+experiment=features", f"data.features_dir={feats}"]
    cfg = _compose(e2e)
    root = ensure_corpus(args.cache_dir, CorpusSpec(**cfg.data.corpus))
    threads.apply(threads.plan(cfg.data.num_workers, 1, args.device == "cuda", False))  # as the command plans them
    trunk, name, width, _ = load_trunk(name=args.trunk, seed=args.seed)
    extraction = {}
    for split in ("train", "val"):
        shards = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
        t0 = time.perf_counter()
        m = extract(trunk, name, width, shards, feats / split, args.image_size, 256, args.device,
                    num_workers=cfg.data.num_workers)  # decoding beside the trunk, as training's loader does
        extraction[split] = {"seconds": time.perf_counter() - t0, "images": m["samples"]}
    ex_s = sum(e["seconds"] for e in extraction.values())
    ex_rate = sum(e["images"] for e in extraction.values()) / ex_s

    timing = [f"data.batches_per_epoch={args.warmup + args.steps + 1}"]
    rates = {"end-to-end": [], "features": []}
    for _ in range(args.rounds):
        rates["end-to-end"].append(_speed(_compose([*e2e, *timing]), args.warmup, args.steps, args.device))
        rates["features"].append(_speed(_compose([*fm, *timing]), args.warmup, args.steps, args.device))
    best = {k: max(v) for k, v in rates.items()}

    runs = {"end-to-end": _timed_run(e2e, args.seconds, best["end-to-end"], args.batch, work / "run-e2e")}
    left = args.seconds - ex_s  # the features mode's T includes extracting its train and val splits
    if args.dry_run:
        left = max(left, 1.0)  # both runs exercised, whatever the load: a dry run's figures mean nothing
    runs["features"] = (_timed_run(fm, left, best["features"], args.batch, work / "run-features") if left >= 1
                        else None)
    report = {"trunk": args.trunk, "image_size": args.image_size, "B": args.batch, "d": args.dim,
              "V": len(_vocab(root, cfg)), "width": width, "device": args.device, "threads": torch.get_num_threads(),
              "extraction": {**extraction, "images_per_s": ex_rate},
              "images_per_s": best, "speedup": best["features"] / best["end-to-end"], "T": args.seconds, "runs": runs}
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def _vocab(root: Path, cfg) -> list[str]:
    from im2vec.data.vocab import Vocabulary

    return Vocabulary.load(str(root / "vocab.tsv"), max_size=cfg.data.vocab_max_size,
                           min_count=cfg.data.vocab_min_count).tags


def _print(r: dict) -> None:
    e2e, fm = r["images_per_s"]["end-to-end"], r["images_per_s"]["features"]
    print(f"\n{r['trunk']} at {r['image_size']} px ({r['width']} features), B = {r['B']}, V = {r['V']:,}, "
          f"d = {r['d']}, {r['device']} ({r['threads']} torch threads); images per second, best of the rounds\n")
    print("| step | images/s | ms per batch | vs end-to-end |\n|---|---|---|---|")
    print(f"| end-to-end (trunk forward + backward, W, table) | {e2e:,.0f} | {1e3 * r['B'] / e2e:.1f} | 1.0× |")
    print(f"| features (W and table from stored features) | {fm:,.0f} | {1e3 * r['B'] / fm:.1f} | "
          f"{r['speedup']:.1f}× |")
    ex = r["extraction"]
    print(f"| extraction (one pass of the frozen trunk, eval view, fp16) | {ex['images_per_s']:,.0f} | | |")
    print(f"\nquality at equal wall time T = {r['T']:g} s (features: extracting train + val, "
          f"{ex['train']['seconds'] + ex['val']['seconds']:.1f} s, counted in T); validation γ chosen on val\n")
    print("| mode | training s | batches | val P@5 | val clean P@5 | val noise@5 | test P@5 | test clean P@5 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in r["runs"].items():
        if run is None:
            print(f"| {name} | (extraction alone took T) | | | | | | |")
            continue
        print(f"| {name} | {run['seconds']:.1f} | {run['batches']:,} | {run['val/precision@5']:.3f} | "
              f"{run['val/clean_precision@5']:.3f} | {run['val/noise_share@5']:.3f} | "
              f"{run['test/tagging/precision@5']:.3f} | {run['test/tagging/clean/precision@5']:.3f} |")
    run = r["runs"]["end-to-end"]
    print(f"| frequency prior | | | {run['val/precision@5_prior']:.3f} | {run['val/clean_precision@5_prior']:.3f} | "
          f"| {run['test/prior/tagging/precision@5']:.3f} | {run['test/prior/tagging/clean/precision@5']:.3f} |")


if __name__ == "__main__":
    run_cli(main)
