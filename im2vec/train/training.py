"""``train(cfg)``: compose objects from the Hydra config, fit, write the held-out figures.

Kept apart from the ``@hydra.main`` wrapper in ``train.py`` so tests call it directly.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from im2vec.data.corpus import ensure_word_vectors
from im2vec.errors import BadValue, UserError, make, one_line
from im2vec.eval.heldout import heldout_figures
from im2vec.train import threads
from im2vec.train.checkpoint import check_checkpoint_file, set_gamma
from im2vec.train.module import Im2VecModule
from im2vec.train.resilience import AtomicCheckpointIO, Preempted
from im2vec.wide.allocator import tune_malloc
from im2vec.wide.head import resolve_head
from im2vec.wide.tag_vectors import read_tag_vectors

# the module moves only the images to the trunk's device (tag ids stay on the CPU for sampling), on purpose
warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
# in-memory batches (im2vec/data/memory.py) come from one process: the length Lightning reads is exact
warnings.filterwarnings("ignore", message=".*IterableDataset` has `__len__` defined.*")
# validation figures are computed on rank 0 and broadcast: every rank logs the same values, nothing to reduce
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


# (config key, kind, smallest value): checked before anything is built, so a typo is one line, not a traceback
CHECKED = (("seed", int, None), ("data.batch_size", int, 1), ("data.batches_per_epoch", int, 1),
           ("data.image_size", int, 8), ("data.val_batch_size", int, 1), ("data.val_max_images", int, 1),
           ("data.num_workers", int, 0), ("data.shuffle_buffer", int, 0), ("data.interleave", int, 1),
           ("data.vocab_min_count", int, 1), ("data.vocab_max_size", int, 1), ("data.min_scale", float, 0.0),
           ("data.max_pixels", int, 1), ("model.dim", int, 1), ("optim.lr", float, 0.0), ("optim.table_lr", float, 0.0),
           ("optim.weight_decay", float, 0.0), ("optim.warmup_batches", int, 0), ("optim.grad_clip", float, 0.0),
           ("sampler.num_negatives", int, 1), ("sampler.num_positives", int, 1), ("sampler.alpha", float, None),
           ("sampler.beta", float, None), ("sampler.gamma", float, None), ("trainer.max_epochs", int, -1),
           ("trainer.max_steps", int, -1))


def check_config(cfg: DictConfig) -> None:
    """The numeric settings have numbers of the right kind and range (null where a key allows it)."""
    for key, kind, low in CHECKED:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
        if ok and kind is float:
            ok = math.isfinite(value)
        if not ok or (low is not None and value < low):
            want = "an integer" if kind is int else "a finite number"
            raise BadValue(f"{key}={value!r} is not {want}" + (f" ≥ {low}" if low is not None else ""),
                           f"set {key}=<{'integer' if kind is int else 'number'}>")


def build_module(cfg: DictConfig, datamodule, shard: tuple[int, int] | None = None) -> Im2VecModule:
    """The module for ``datamodule``'s vocabulary; ``shard=(rank, world)``: only this rank's rows of the table."""
    vocab = datamodule.vocab
    model = OmegaConf.to_container(cfg.model, resolve=True)
    path, freeze = model.pop("tag_vectors", None), bool(model.pop("freeze_tag_vectors", False))
    tag_map = None
    if path:
        if path == "corpus":  # the generated corpus's own word vectors (synonyms across its languages sit close)
            if getattr(datamodule, "corpus_dir", None) is None:
                raise BadValue("model.tag_vectors=corpus: the data is not the generated corpus",
                               "give the path of a word2vec or GloVe file")
            path = str(ensure_word_vectors(datamodule.corpus_dir))
        tag_map = read_tag_vectors(path, vocab.tags, model["dim"], freeze, cfg.optim.table_init_std)
    elif freeze:
        raise BadValue("model.freeze_tag_vectors=true without model.tag_vectors", "set model.tag_vectors=PATH")
    total = schedule_length(cfg, getattr(datamodule, "batches_per_epoch", None))  # the data module's, resolved
    sampler = make(cfg.sampler)
    if sampler.head == "auto":
        sampler.head = resolve_head(sampler, len(vocab.tags), shard is not None)
        if shard is None or shard[0] == 0:
            print(f"im2vec: sampler.head=auto: the {sampler.head} head for {len(vocab.tags):,} tags "
                  f"(full up to sampler.full_max_tags={sampler.full_max_tags:,} on one device)")
    return Im2VecModule(
        encoder=make(model), tags=vocab.tags, counts=vocab.counts, total_batches=total,
        sampler=sampler, optim=make(cfg.optim), noise_ids=datamodule.noise_ids,
        fingerprint=vocab.fingerprint(), seed=cfg.seed, image_size=datamodule.image_size, shard=shard,
        tag_map=tag_map, holdout_tags=tuple(getattr(datamodule, "holdout_tags", ())), **cfg.validation,
    )


VALIDATIONS = 4  # with train_samples: validation this many times a run (and once more at its end)


def epochs_for_samples(samples, per_epoch: int) -> int:
    """``train_samples`` in epochs of ``per_epoch`` samples (all ranks together): ⌈samples / per_epoch⌉, at least 1."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise BadValue(f"train_samples={samples!r} is not an integer ≥ 1", "set train_samples=<samples> or null")
    return max(1, math.ceil(samples / per_epoch))


def size_by_samples(cfg: DictConfig, trainer: pl.Trainer, datamodule) -> None:
    """``train_samples``: a run sized by the samples it uses (all ranks together), not by epochs tuned on one
    collection: max_epochs = ⌈train_samples / samples an epoch⌉, validation about VALIDATIONS times a run.
    Sets the trainer's and the config's max_epochs (the LR schedule reads the config)."""
    samples = cfg.get("train_samples")
    if not samples:
        return
    per_epoch = datamodule.batches_per_epoch * datamodule.batch_size * trainer.world_size
    epochs = epochs_for_samples(samples, per_epoch)
    with open_dict(cfg):
        cfg.trainer.max_epochs = epochs
    trainer.fit_loop.max_epochs = epochs
    trainer.check_val_every_n_epoch = max(1, epochs // VALIDATIONS)
    if trainer.is_global_zero:
        print(f"im2vec: train_samples={samples:,}: {epochs} epochs of {per_epoch:,} samples "
              f"({datamodule.batches_per_epoch} batches), validation every {trainer.check_val_every_n_epoch}")


def schedule_length(cfg: DictConfig, batches_per_epoch: int | None = None) -> int:
    """Batches the LR schedule spans: max_epochs × batches_per_epoch (the data module's, resolved: null is
    one pass over the training split). max_steps (two optimizer steps per batch) only stops a run early,
    so a run stopped and resumed follows one schedule; it sets the length only when max_epochs is -1."""
    if cfg.trainer.max_epochs and cfg.trainer.max_epochs > 0:  # numbers: check_config ran in build
        return cfg.trainer.max_epochs * (batches_per_epoch or cfg.data.batches_per_epoch)
    if cfg.trainer.get("max_steps", -1) > 0:
        return cfg.trainer.max_steps // 2
    raise BadValue("the LR schedule needs a length", "set trainer.max_epochs (or trainer.max_steps with max_epochs=-1)")


PATH_KEYS = ("train_shards", "val_shards", "test_shards", "vocab_path", "content_tags_path", "cache_dir", "features_dir")


def recorded_data(data: DictConfig) -> dict:
    """The data settings as the checkpoint records them (evaluate.py's default data): resolved, and with the
    local paths made absolute, so that they name the same files from another working directory."""
    def absolute(v):
        if isinstance(v, list):
            return [absolute(x) for x in v]
        if isinstance(v, str) and v and not re.match(r"^[a-z][a-z0-9+.-]+:", v):  # pipe:, s3:, http:// stay
            return str(Path(v).expanduser().absolute())
        return v

    out = OmegaConf.to_container(data, resolve=True)
    for k in PATH_KEYS:
        if k in out:
            out[k] = absolute(out[k])
    if isinstance(out.get("holdout_tags"), str) and Path(out["holdout_tags"]).expanduser().is_file():
        out["holdout_tags"] = absolute(out["holdout_tags"])
    return out


def pins_memory(trunk_device) -> bool:
    """Whether the loaders put batches in page-locked memory: only for a trunk on a GPU, where they are copied
    to the device without blocking the CPU (on a CPU trunk pinning only costs)."""
    return torch.device(trunk_device).type == "cuda"


def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    t0 = time.perf_counter()
    tune_malloc()  # large per-step temporaries reuse freed memory (im2vec/wide/allocator.py)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.ckpt_path:
        check_checkpoint_file(cfg.ckpt_path, "ckpt_path")  # missing, cut short or not a checkpoint: one line
    check_config(cfg)
    check_user_prior(cfg.get("user_prior", "auto"))
    datamodule = make(cfg.data)  # data mistakes are reported first
    callbacks = [make(c) for c in cfg.get("callbacks", {}).values()]
    # checkpoints written under a temporary name, fsynced and renamed; read memory-mapped (im2vec/train/resilience.py)
    trainer: pl.Trainer = make(cfg.trainer, logger=make(cfg.logger), callbacks=callbacks,
                               plugins=[AtomicCheckpointIO()])
    # the trainer knows this process's rank and the world size (torchrun, SLURM, or the ranks it will start)
    # before any process group exists: with several ranks each builds only its own rows of the table
    shard = (trainer.global_rank, trainer.world_size) if trainer.world_size > 1 else None
    gpu = trainer.strategy.root_device.type == "cuda"
    datamodule.pin_memory = pins_memory(trainer.strategy.root_device)
    overlap = cfg.optim.get("overlap", "auto")
    tc = cfg.get("threads") or {}
    # training batches from the split decoded once come from this process: no loader worker to leave a core to
    memory = hasattr(datamodule, "uses_memory") and datamodule.uses_memory(trainer.world_size)
    plan = threads.plan(0 if memory else datamodule.num_workers, trainer.num_devices, gpu,
                        overlap is True or (overlap == "auto" and gpu and shard is None),
                        trunk=tc.get("trunk"), table=tc.get("table"))
    threads.apply(plan)
    if trainer.is_global_zero:
        print(f"im2vec: threads: {plan}")
    if hasattr(datamodule, "resolve_epoch"):
        datamodule.resolve_epoch(trainer.world_size)  # data.batches_per_epoch=null: one pass of each rank's share
    size_by_samples(cfg, trainer, datamodule)
    module = build_module(cfg, datamodule, shard)
    module.data_config = recorded_data(cfg.data)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except Preempted as p:
        if trainer.is_global_zero:
            print(f"im2vec: {p}\nim2vec: continue with the same command and ckpt_path={p.path}", file=sys.stderr)
        return {"info/preempted": 1.0, "info/batches": float(p.batches)}, {
            "trainer": trainer, "module": module, "datamodule": datamodule, "preempted": p}
    zero = trainer.is_global_zero
    if datamodule.val_shards and not trainer.fast_dev_run and module.report.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final held-out figures
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
        if zero and best and Path(best).exists():  # a file, or a DCP folder (a sharded run)
            set_gamma(best, module.gamma)  # the last checkpoint holds the same weights: give it the γ chosen on them
    metrics = dict(module.report.metrics)
    if datamodule.test_shards and not trainer.fast_dev_run:  # the figures to report: images nothing was chosen on
        table = module.head.own_vectors()[0]  # sharded: this rank's rows; each rank scores the test images on its own
        rank, world = (module.table.rank, module.table.world) if module.sharded else (0, 1)
        test = {}
        try:  # sharded: every rank takes part (rank 0 embeds the images and gets the figures)
            test = heldout_figures(module.encoder, table, module.table.log_counts, module.tags,
                                   module.gamma, datamodule.test_shards, datamodule.image_size, datamodule.noise_ids,
                                   list(cfg.validation.val_gammas), datamodule.val_batch_size,
                                   datamodule.num_workers, datamodule.val_max_images,
                                   device=trainer.strategy.root_device, group=module.head.group, rank=rank, world=world)
        except UserError as e:  # the trained model is saved: say why there are no test figures, do not fail the run
            if zero:
                print(f"im2vec: warning: no test figures: {one_line(e)}", file=sys.stderr)
        del table
        metrics.update(test)
        if trainer.logger is not None and zero:
            trainer.logger.log_metrics({k: v for k, v in test.items() if not math.isnan(v)},
                                       step=trainer.fit_loop.epoch_loop._batches_that_stepped)
    if zero:  # after the test figures (their collectives done): the other ranks go on and never wait for it
        metrics.update(user_prior_after_fit(cfg.get("user_prior", "auto"), trainer, datamodule, module.tags))
    metrics["info/seconds"] = time.perf_counter() - t0  # the whole run: data, training, held-out figures
    if zero:  # one process writes and prints the figures (the other ranks hold only validation's)
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        print(summary(metrics, module.gamma))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def check_user_prior(setting) -> None:
    if setting not in ("auto", True, False):
        raise BadValue(f"user_prior={setting!r}", "use auto, true or false")


def user_prior_after_fit(setting, trainer: pl.Trainer, datamodule, tags: list[str]) -> dict[str, float]:
    """Rank 0, with no collective: each uploader's counts (im2vec/eval/user_prior.py) into user_prior.pt beside the
    checkpoint, λ and μ chosen on validation and recorded in it, as ``python -m im2vec.bench.user_prior --beside``
    does. Several ranks: the counts only (the choice scores every tag in one process, from the whole table)."""
    from im2vec.eval.heldout import embed_shards
    from im2vec.eval.user_prior import build_beside, choose_lambda, held_out_of, why_not_auto
    from im2vec.train.checkpoint import load_model

    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
    say = lambda line: print(f"im2vec: user_prior: {line}")  # noqa: E731
    if setting is False or trainer.fast_dev_run or not ckpt or not Path(ckpt).exists():
        return {}
    val_shards, _, content = held_out_of(datamodule)
    reason = "no validation split to choose λ on" if not val_shards else None
    if reason is None and setting == "auto":
        reason = why_not_auto(datamodule.train_shards, val_shards, len(tags))
    if reason:
        say(f"not built: {reason}")
        return {}
    t0, path = time.perf_counter(), Path(ckpt).with_name("user_prior.pt")
    try:
        prior = build_beside(datamodule.train_shards, list(tags), Path(ckpt))
        if not prior.users:
            say("not built: the training shards name no uploader")
            return {}
        if trainer.world_size > 1:
            prior.save(path)
            say(f"{len(prior.users):,} uploaders, {path.stat().st_size:,} bytes → {path}; λ not chosen with "
                f"{trainer.world_size} ranks: python -m im2vec.bench.user_prior {ckpt} --beside")
            return {}
        model = load_model(ckpt)
        val = embed_shards([model], val_shards, model.image_size or datamodule.image_size, 256,
                           datamodule.num_workers, None, device=trainer.strategy.root_device)
        chosen = choose_lambda(model, prior, val, content)
        prior.lam, prior.mu = chosen["auto_lam"], chosen["mu"]
        prior.save(path)
    except UserError as e:  # the trained model is saved: say why, do not fail the run
        print(f"im2vec: warning: user_prior not built: {one_line(e)}", file=sys.stderr)
        return {}
    say(f"{len(prior.users):,} uploaders, {path.stat().st_size:,} bytes → {path}; λ {chosen['lam']:g} μ "
        f"{chosen['mu']:g} chosen on validation ({chosen['by']}): gain {chosen['val_gain']:+.4f}, 90 % "
        f"{chosen['val_gain_lo']:+.4f} … {chosen['val_gain_hi']:+.4f}: "
        + ("kept" if chosen["auto_lam"] else "not kept (λ = 0 recorded)") + f" ({time.perf_counter() - t0:.1f} s)")
    out = {"user_prior/lam": chosen["auto_lam"], "user_prior/mu": chosen["mu"],
           "user_prior/val_gain": chosen["val_gain"]}
    if trainer.logger is not None:
        trainer.logger.log_metrics(out, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
    return out


def small_split_warning(images: int, uploaders: int) -> list[str]:
    """A line when γ was chosen on a validation split too small to choose it (ingest's thresholds)."""
    from im2vec.data.ingest import MIN_HELD_OUT

    if images >= MIN_HELD_OUT[0] and uploaders >= MIN_HELD_OUT[1]:
        return []
    return [f"  warning: γ was chosen on {images:,} images of {uploaders:,} uploader(s), too few to trust it or the "
            f"figures (at least {MIN_HELD_OUT[0]} images of {MIN_HELD_OUT[1]} uploaders; the interval above says how "
            "little they tell) — hold out more uploaders for validation (ingest --val-fraction)"]


def summary(m: dict[str, float], gamma: float) -> str:
    """The validation figures and, where there is a test split, the test figures, beside the frequency
    prior; the validation γ sweep."""
    if not any(k.startswith(("val/", "test/")) for k in m):
        return "no held-out figures (no validation shards)"
    chosen = " chosen on these images" if "val/gamma" in m else ""
    who = (f"{int(m['val/images']):,} images of {int(m['val/uploaders']):,} uploaders; "
           if m.get("val/uploaders") else f"{int(m['val/images']):,} images; " if "val/images" in m else "")
    rows = [f"validation figures ({who}tagging score γ={gamma:g}{chosen}):",
            f"  {'':24s} {'model':>7s} {'prior':>7s}   90 % interval over uploaders"]
    for name in ("precision@1", "precision@5", "recall@10", "clean_precision@5", "noise_share@5"):
        if f"val/{name}" in m:
            lo, hi = m.get(f"val/{name}_lo", math.nan), m.get(f"val/{name}_hi", math.nan)
            ci = f"   {lo:.3f} – {hi:.3f}" if math.isfinite(lo) else ""
            rows.append(f"  {name:24s} {m[f'val/{name}']:7.3f} {m[f'val/{name}_prior']:7.3f}{ci}")
    if "val/uploaders" in m and m["val/uploaders"] > 0:
        rows += small_split_warning(int(m["val/images"]), int(m["val/uploaders"]))
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
