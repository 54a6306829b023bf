"""The GPU check: a prepared run of the real training path on one GPU, with its correctness checks and speeds.

    python -m im2vec.bench.gpu                      # one GPU (an H200 with 16 cores in mind): sized for < 8 min
    python -m im2vec.bench.gpu --dry-run            # the same code path on the CPU, tiny: well under a minute

Nothing is downloaded: the trunk's weights are random and the data is generated (JPEG webdataset shards of the
embedded corpus's photos, drawn by ``im2vec.data.corpus.make_sample`` at 256 px, in ``--cache``; a V-line vocabulary,
the corpus's tags padded with rare tags). Every run goes through ``im2vec.train.training.train`` with the Hydra config
composed from ``configs/train.yaml`` (``data=shards``, ``model=resnet50``, ``trainer=gpu``: bf16-mixed, one
device, B = 256, 224 px crops, ``data.num_workers`` = cores - 2). The runs, in this order:

    small_vocab   V = 60k (--small-vocab), else as main: peak GPU memory must not grow with V
    main          V = 600k (--vocab), the tag head, data.decode=cpu, optim.overlap=true; writes a checkpoint
    resume        main's checkpoint resumed (ckpt_path=...) for a few batches
    no_head       main's trunk with a trivial loss on u instead of the tag head (what the head costs)
    decode_gpu    main with data.decode=gpu (JPEGs decoded on the trunk's device)
    no_overlap    main with optim.overlap=false (the table's CPU work in series with the trunk)

Correctness (any failure: one line each, exit status 1):
  - after every fit, and at the resumed run's first batch: ``module.table`` (weight and buffers) on the CPU, the
    weight fp32; every tensor of the table optimizer's state (``module.optimizers()[1].optimizer.state``) on the
    CPU, and the state not empty after a run with the head; the trunk's parameters on the GPU;
  - peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each run) at V = 600k within
    --mem-slack-mib of V = 60k's (5 % of a ResNet-50 step's peak would hide the whole 614 MB table: the slack is
    absolute), and the resumed run's peak within the same slack of main's (the table's optimizer state restored
    in host memory, never through the GPU);
  - every run finishes.
Speeds (printed, never a failure): images/s, the median over windows of --window batches after --warm-windows
windows, each window timed between two ``torch.cuda.synchronize()`` (none inside a window); the module's
logged breakdown per batch (train/table_prepare_ms, train/table_wait_ms, train/table_update_ms, averaged over
the timed windows: the log interval is the window) and "fetch": per batch, the time from one batch's end to
the next one's start (waiting for the loader, then the batch's transfer; with data.decode=gpu its decoding
too). Goal: the head costs at most 10 % of the step (1 - main / no_head images/s). The final summary is a
markdown table, for the README.

Without CUDA and without --dry-run: exit status 2 with one line.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import Callback

from im2vec.bench.trunk_only import TrunkOnly
from im2vec.errors import ArgumentParser, one_line
from im2vec.train.module import Im2VecModule

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
HEAD_GOAL = 0.10  # the tag head's share of the step's time, at most
RUNS = ("small_vocab", "main", "resume", "no_head", "decode_gpu", "no_overlap")
BREAKDOWN = ("train/table_prepare_ms", "train/table_wait_ms", "train/table_update_ms")
GENERATOR = 1  # bump when the data written here changes, so that caches are not reused


@dataclass
class Plan:
    """What one bench invocation runs: the GPU run's sizes, or --dry-run's tiny ones."""

    dry_run: bool = False
    trunk: str = "resnet50"
    dim: int = 256
    stored: int = 256  # the generated JPEGs' side
    image_size: int = 224  # the training crop
    batch_size: int = 256
    batches: int = 40
    window: int = 5  # batches per timed window (and the log interval)
    warm_windows: int = 2  # windows not counted (loader start, allocator, kernel selection)
    resume_batches: int = 5
    vocab: int = 600_000
    small_vocab: int = 60_000
    images: int = 4096  # distinct generated photos (the training stream draws them with replacement)
    shards: int = 32
    workers: int = 14
    precision: str = "bf16-mixed"
    accelerator: str = "gpu"
    mem_slack_mib: float = 64.0
    seed: int = 0
    skip: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default_factory=tuple)  # more Hydra overrides, for every run

    @property
    def device_type(self) -> str:
        return "cpu" if self.accelerator == "cpu" else "cuda"


def gpu_plan(cores: int) -> Plan:
    return Plan(workers=max(0, cores - 2))


def dry_plan(cores: int) -> Plan:
    return Plan(dry_run=True, trunk="small_cnn", dim=16, stored=64, image_size=56, batch_size=8, batches=4,
                window=1, warm_windows=1, resume_batches=2, vocab=20_000, small_vocab=2_000, images=64, shards=4,
                workers=max(0, cores - 2), precision="32-true", accelerator="cpu")  # bf16 on a CPU: ~5× slower


# ---------------------------------------------------------------- data: the corpus's photos, a padded vocabulary
def _write_shard(job: tuple[str, int, int, int, dict]) -> list[list[str]]:
    """One shard of ``n`` photos drawn by the corpus generator (its uploaders, scenes, noise and long tail)."""
    import webdataset as wds

    from im2vec.data.corpus import CorpusSpec, _Users, make_sample

    path, shard, first, n, spec_kwargs = job
    spec = CorpusSpec(**spec_kwargs)
    users = _Users(np.random.default_rng([spec.seed, 0]), spec.num_users, 0)  # the same uploaders in every shard
    rng = np.random.default_rng([spec.seed, 1, shard])
    zipf = 1.0 / np.arange(11, spec.tail_size + 11) ** spec.tail_exponent
    cdf = np.cumsum(zipf) / zipf.sum()
    tag_lists = []
    with wds.TarWriter(path) as sink:
        for i in range(first, first + n):
            sample = make_sample(rng, users, spec, i, cdf)
            tag_lists.append(json.loads(sample["json"])["tags"])
            sink.write(sample)
    return tag_lists


def padded_vocabulary(counts: Counter, size: int):
    """The ``size`` most frequent tags of ``counts``; when there are fewer, rare tags (count 1, never on a photo)
    fill it up to ``size`` rows, as a large real vocabulary's tail would."""
    from im2vec.data.vocab import Vocabulary, from_counts

    vocab = from_counts(counts, 1, size)
    tags, freq = list(vocab.tags), vocab.counts.tolist()
    taken, i = set(tags), 0
    while len(tags) < size:
        name = f"zzpad{i:07d}"
        i += 1
        if name not in taken:
            tags.append(name)
            freq.append(1)
    return Vocabulary(tags, freq)


def ensure_data(cache: Path, p: Plan, processes: int) -> tuple[Path, Path, float]:
    """(shard folder, vocab.tsv, seconds spent) for the plan, generated once into ``cache``."""
    spec = dict(num_train=p.images, num_val=0, num_test=0, image_size=p.stored, num_users=150,
                tail_size=p.vocab, tail_per_image=8.0, tail_exponent=0.5, seed=p.seed)
    key = hashlib.sha1(json.dumps([spec, p.shards, p.vocab, GENERATOR], sort_keys=True).encode()).hexdigest()[:10]
    out = cache / f"gpu-bench-{key}"
    if (out / "DONE").exists():
        return out, out / "vocab.tsv", 0.0
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    per = math.ceil(p.images / p.shards)
    jobs = [(str(out / f"train-{s:06d}.tar"), s, s * per, min(per, p.images - s * per), spec)
            for s in range(p.shards) if s * per < p.images]
    if processes > 1:
        with mp.get_context("fork").Pool(min(processes, len(jobs))) as pool:
            lists = pool.map(_write_shard, jobs, chunksize=1)
    else:
        lists = [_write_shard(j) for j in jobs]
    counts = Counter(t for shard in lists for tags in shard for t in set(tags))
    padded_vocabulary(counts, p.vocab).save(out / "vocab.tsv")
    (out / "spec.json").write_text(json.dumps({"corpus": spec, "shards": len(jobs), "distinct_tags": len(counts),
                                               "vocab": p.vocab}, indent=1))
    (out / "DONE").touch()
    return out, out / "vocab.tsv", time.perf_counter() - t0


# ---------------------------------------------------------------- the checks
def placement_failures(module: Im2VecModule, trunk_device: str, where: str, table_optimizer=None,
                       need_state: bool = False) -> list[str]:
    """One line per violation of where the tensors must live: the table (weight fp32, buffers) and every tensor
    of its optimizer's state on the CPU, the trunk's parameters on ``trunk_device``. ``table_optimizer``: the
    raw torch optimizer (default ``module.optimizers()[1].optimizer``); ``need_state``: its state must hold a
    tensor (after a run with the head), else the check of the state would pass on nothing."""
    bad = []
    weight = module.table.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        bad.append(f"{where}: module.table.weight is {weight.dtype} on {weight.device}, not torch.float32 on cpu")
    for name, t in [*module.table.named_parameters(), *module.table.named_buffers()]:
        if t.device.type != "cpu":
            bad.append(f"{where}: module.table.{name} is on {t.device}, not cpu")
    if table_optimizer is None:
        try:
            table_optimizer = module.optimizers()[1].optimizer
        except Exception as e:  # noqa: BLE001 -- no trainer attached, or not two optimizers: that is the finding
            bad.append(f"{where}: the table optimizer cannot be read ({type(e).__name__}: {one_line(e)})")
    if table_optimizer is not None:
        tensors = 0
        for state in table_optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors += 1
                    if value.device.type != "cpu":
                        bad.append(f"{where}: table optimizer state '{key}' ({tuple(value.shape)}) is on "
                                   f"{value.device}, not cpu")
        if need_state and tensors == 0:
            bad.append(f"{where}: the table optimizer's state holds no tensor after training with the head")
    devices = sorted({p.device.type for p in module.encoder.parameters()})
    if devices != [trunk_device]:
        bad.append(f"{where}: the trunk's parameters are on {', '.join(devices)}, not {trunk_device}")
    return bad


class Probe(Callback):
    """Windows of ``window`` batches timed between device synchronizations (none inside a window), the loader
    wait, the module's logged breakdown at each window's end, and the placement check at the first batch."""

    def __init__(self, window: int = 5, trunk_device: str = "cuda"):
        self.window, self.trunk_device = window, trunk_device
        self.windows: list[dict] = []
        self.first_batch: list[str] | None = None
        self.overlap = None
        self.module_class = ""
        self.batches, self._last_end, self._t = 0, None, 0.0
        self._reset()

    def _reset(self) -> None:
        self._images, self._batches, self._wait = 0, 0, 0.0

    def _sync(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        with contextlib.suppress(Exception):
            self.overlap = bool(pl_module.head.overlap)
        self.module_class = type(pl_module).__name__
        self.batches, self._last_end = 0, None
        self._reset()
        self._t = self._sync(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last_end is not None:
            self._wait += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self._batches += 1
        self._images += len(batch["keys"])
        if self.first_batch is None:  # after on_train_start put a resumed table optimizer state back
            self.first_batch = placement_failures(pl_module, self.trunk_device, "at the first batch")
        if self._batches == self.window:
            t = self._sync(pl_module)
            logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k in BREAKDOWN}
            self.windows.append({"seconds": t - self._t, "images": self._images, "batches": self._batches,
                                 "data_wait_s": self._wait, **logged})
            self._t = t
            self._reset()
        self._last_end = time.perf_counter()

    def summary(self, warm: int) -> dict:
        timed = self.windows[warm:] or self.windows[-1:]
        if not timed:
            return {}
        out = {"images_per_s": statistics.median(w["images"] / w["seconds"] for w in timed),
               "timed_windows": len(timed), "timed_batches": sum(w["batches"] for w in timed),
               "data_wait_ms": 1e3 * sum(w["data_wait_s"] for w in timed) / sum(w["batches"] for w in timed)}
        for k in BREAKDOWN:
            values = [w[k] for w in timed if k in w]
            out[k.split("/")[1]] = statistics.fmean(values) if values else math.nan
        return out


# ---------------------------------------------------------------- one run through train()
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def has_key(key: str) -> bool:
    """Whether the composed config has ``key`` (null counts as present)."""
    from omegaconf import OmegaConf

    missing = object()
    return OmegaConf.select(compose(["data=shards"]), key, default=missing) is not missing


@contextlib.contextmanager
def module_class(cls):
    """train() builds ``cls`` instead of Im2VecModule (im2vec.train.training.build_module looks the name up)."""
    from im2vec.train import training

    old = training.Im2VecModule
    training.Im2VecModule = cls
    try:
        yield
    finally:
        training.Im2VecModule = old


@dataclass
class Run:
    name: str
    vocab: int
    head: bool = True
    decode: str = "cpu"
    overlap: str = "true"
    batches: int = 0
    resume_from: str | None = None
    writes_checkpoint: bool = False


def overrides_for(r: Run, p: Plan, keys: dict[str, bool]) -> list[str]:
    o = ["data=shards", f"model={'resnet50' if p.trunk == 'resnet50' else 'small_cnn'}", f"model.trunk={p.trunk}",
         f"model.dim={p.dim}", f"data.image_size={p.image_size}", f"data.batch_size={p.batch_size}",
         f"data.batches_per_epoch={r.batches}", f"data.num_workers={p.workers}", "data.vocab_min_count=1",
         f"data.vocab_max_size={r.vocab}", f"data.shuffle_buffer={max(8, 2 * p.batch_size // max(1, p.workers))}",
         "data.val_shards=null", "data.test_shards=null", f"seed={p.seed}",
         f"trainer.accelerator={p.accelerator}", "trainer.devices=1", f"trainer.precision={p.precision}",
         f"trainer.max_epochs={2 if r.resume_from else 1}", f"trainer.log_every_n_steps={p.window}",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         f"optim.warmup_batches={max(1, p.batches // 4)}", "+callbacks.probe._target_=im2vec.bench.gpu.Probe",
         f"+callbacks.probe.window={p.window}", f"+callbacks.probe.trunk_device={p.device_type}"]
    if p.accelerator != "cpu":
        o.insert(2, "trainer=gpu")
    if keys.get("data.decode"):
        o.append(f"data.decode={r.decode}")
    if keys.get("optim.overlap"):
        o.append(f"optim.overlap={r.overlap}")
    if p.dry_run and keys.get("threads.trunk"):  # tiny tensors: a second intra-op thread only waits, and on a busy
        o.append("threads.trunk=1")  # 2-core machine it made the serial step 30× slower
    if not r.writes_checkpoint:
        o += ["~callbacks.checkpoint", "++trainer.enable_checkpointing=false"]
    return o + list(p.extra)


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_one(r: Run, p: Plan, keys: dict[str, bool], data: Path, vocab_path: Path, out: Path) -> dict:
    """One train() call: its speeds, peak GPU memory, placement findings ("placement") and other failures
    ("failures": the run failed, built the wrong module, wrote no checkpoint)."""
    from im2vec.train.training import train

    res = {**asdict(r), "placement": [], "failures": [], "checkpoint": None}
    if r.decode != "cpu" and not keys.get("data.decode"):
        return {**res, "skipped": "configs/ has no data.decode"}
    if r.overlap != "true" and not keys.get("optim.overlap"):
        return {**res, "skipped": "configs/ has no optim.overlap"}
    cfg = compose(overrides_for(r, p, keys))
    cfg.paths.output_dir = str(out / r.name)
    cfg.data.train_shards = str(data / "train-*.tar")
    cfg.data.vocab_path = str(vocab_path)
    cfg.ckpt_path = r.resume_from
    cleanup()
    cuda = p.device_type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        res["allocated_before_mib"] = torch.cuda.memory_allocated() / MIB
    print(f"\n==== {r.name}: V={r.vocab:,} head={r.head} decode={r.decode} overlap={r.overlap} "
          f"batches={r.batches}" + (f" resume from {r.resume_from}" if r.resume_from else ""), flush=True)
    t0 = time.perf_counter()
    extras = None
    try:
        with module_class(Im2VecModule if r.head else TrunkOnly):
            _, extras = train(cfg)
        module, trainer = extras["module"], extras["trainer"]
        probe = next(c for c in trainer.callbacks if isinstance(c, Probe))
        if cuda:
            torch.cuda.synchronize()
            res["peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        res.update(probe.summary(p.warm_windows if not r.resume_from else 0))
        res["overlap_effective"] = probe.overlap
        res["batches_run"] = probe.batches
        expected = Im2VecModule if r.head else TrunkOnly
        if type(module) is not expected:  # the no-head run would time the head after all
            res["failures"].append(f"{r.name}: train() built {type(module).__name__}, not the bench's "
                                   f"{expected.__name__} (im2vec.train.training.build_module)")
        if not r.head and res.get("table_prepare_ms", 0.0) > 0:  # TrunkOnlyHead no longer covers the step
            res["failures"].append(f"{r.name}: the tag head still ran (train/table_prepare_ms "
                                   f"{res['table_prepare_ms']:.2f}): update TrunkOnlyHead to TagHead's step")
        if probe.batches != r.batches:
            res["failures"].append(f"{r.name}: {probe.batches} batches trained, not {r.batches}")
        if r.resume_from:
            res["placement"] += [f"{r.name}: {x}" for x in probe.first_batch or []]
        res["placement"] += [f"{r.name}: {x}" for x in
                             placement_failures(module, p.device_type, "after fit", need_state=r.head)]
        if r.writes_checkpoint:
            res["checkpoint"] = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
            if not Path(res["checkpoint"]).is_file():
                res["failures"].append(f"{r.name}: no checkpoint written at {res['checkpoint']}")
    except Exception as e:  # noqa: BLE001 -- a run that fails is a finding, reported with the others
        res["error"] = f"{type(e).__name__}: {one_line(e)}"
        res["failures"].append(f"{r.name}: the run failed: {res['error']}")
        if cuda:
            res["peak_mib"] = torch.cuda.max_memory_allocated() / MIB
    finally:
        res["wall_s"] = time.perf_counter() - t0
        del extras
        cleanup()
    if "peak_mib" in res:
        res["growth_mib"] = res["peak_mib"] - res["allocated_before_mib"]
    return res


# ---------------------------------------------------------------- the report
def fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ran(r: dict | None) -> bool:
    return r is not None and "skipped" not in r and "error" not in r


def memory_check(name: str, base: dict | None, other: dict | None, slack: float, extra: str = "") -> dict:
    """``other``'s peak GPU memory growth during its run (peak - allocated at its start: what an earlier run
    left allocated does not count) within ``slack`` MiB of ``base``'s."""
    if not (_ran(base) and _ran(other)):
        return {"check": name, "ok": False, "detail": "not measured: a run failed or was skipped"}
    grow = other["growth_mib"] - base["growth_mib"]
    return {"check": name, "ok": grow <= slack,
            "detail": f"{base['name']}: {base['growth_mib']:.0f} MiB, {other['name']}: {other['growth_mib']:.0f} MiB "
                      f"(peak - allocated at the run's start; {grow:+.0f} MiB, allowed +{slack:.0f}{extra})"}


def checks_from(results: dict[str, dict], p: Plan) -> list[dict]:
    """The correctness checks (check, ok: True / False / None = skipped, detail) from the runs' results."""
    checks = []
    for name in ("main", "resume"):
        r = results.get(name)
        if r is None or "skipped" in r:
            checks.append({"check": f"placement, {name}", "ok": None, "detail": r["skipped"] if r else "not run"})
            continue
        where = "after fit" + (" and at the resumed run's first batch" if name == "resume" else "")
        if "error" in r:
            checks.append({"check": f"placement, {name}", "ok": False, "detail": f"not checked: {r['error']}"})
        else:
            checks.append({"check": f"placement, {name}", "ok": not r["placement"], "reasons": r["placement"],
                           "detail": "; ".join(r["placement"]) or f"table weight fp32, its buffers and optimizer "
                                                                  f"state on cpu, trunk on {p.device_type} ({where})"})
    others = {n: r for n, r in results.items() if n not in ("main", "resume") and _ran(r)}
    bad = [f for r in others.values() for f in r["placement"]]
    checks.append({"check": "placement, other runs", "ok": not bad if others else None, "reasons": bad,
                   "detail": "; ".join(bad) or f"the same after fit: {', '.join(others) or 'none ran'}"})
    if p.device_type != "cuda":
        checks.append({"check": "peak GPU memory flat in V", "ok": None, "detail": "skipped: no CUDA"})
        checks.append({"check": "resumed peak ≤ fit peak", "ok": None, "detail": "skipped: no CUDA"})
    else:
        table = p.vocab * p.dim * 4 / MIB
        checks.append(memory_check("peak GPU memory flat in V", results.get("small_vocab"), results.get("main"),
                                   p.mem_slack_mib, f"; the V={p.vocab:,} table alone is {table:.0f} MiB"))
        checks.append(memory_check("resumed peak ≤ fit peak", results.get("main"), results.get("resume"),
                                   p.mem_slack_mib, "; the table's optimizer state must not pass through the GPU"))
    failed = [f for r in results.values() for f in r.get("failures", [])]
    ran = [n for n, r in results.items() if "skipped" not in r]
    checks.append({"check": "every run finishes as configured", "ok": not failed, "reasons": failed,
                   "detail": "; ".join(failed) or f"{len(ran)} runs: {', '.join(ran)}"})
    return checks


def ratios_from(results: dict[str, dict], batch_size: int) -> list[dict]:
    """The speed comparisons (goal, value, ok: True / False / None = no goal); never a failure."""
    def rate(name):
        r = results.get(name)
        return r.get("images_per_s") if _ran(r) else None

    out = []
    main, bare = rate("main"), rate("no_head")
    if main and bare:
        share = 1 - main / bare
        out.append({"goal": f"tag head ≤ {HEAD_GOAL:.0%} of the step", "value": f"{share:.1%} "
                    f"(1 - {main:.0f} / {bare:.0f} images/s)", "ok": share <= HEAD_GOAL})
        waited = results["no_head"].get("data_wait_ms", 0.0)
        if waited > 0.1 * 1e3 * batch_size / bare:  # the trunk alone outran the loader: its rate is the loader's
            out.append({"goal": "no_head waited for the loader", "value": f"{waited:.1f} ms a batch of "
                        f"{1e3 * batch_size / bare:.1f}: the head's share is understated (more data.num_workers, "
                        "or data.decode=gpu)", "ok": None})
    gpu = rate("decode_gpu")
    if main and gpu:
        out.append({"goal": "data.decode=gpu / cpu", "value": f"{gpu / main:.2f}× ({gpu:.0f} / {main:.0f} images/s)",
                    "ok": None})
    serial = rate("no_overlap")
    if main and serial:
        out.append({"goal": "optim.overlap=true / false", "value": f"{main / serial:.2f}× ({main:.0f} / "
                    f"{serial:.0f} images/s)", "ok": None})
    return out


def mark(ok) -> str:
    return "skipped" if ok is None else "PASS" if ok else "FAIL"


def peak(r: dict) -> str:
    if "peak_mib" not in r:
        return "—"
    return f"{r['peak_mib']:.0f} (+{r['growth_mib']:.0f})" if "growth_mib" in r else f"{r['peak_mib']:.0f}"


def summary_table(results: dict[str, dict], checks: list[dict], ratios: list[dict], p: Plan, header: str) -> str:
    lines = [header, "",
             "| run | V | head | decode | overlap | images/s | step ms | prepare ms | wait ms | update ms | "
             "fetch ms | peak GPU MiB (+ in the run) |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        rate = r.get("images_per_s")
        step = 1e3 * p.batch_size / rate if rate else None
        effective = r.get("overlap_effective")
        overlap = r["overlap"] + ("" if effective is None else f" ({str(effective).lower()})")
        if "skipped" in r or "error" in r:
            note = f"skipped: {r['skipped']}" if "skipped" in r else "FAILED"
            lines.append(f"| {name} | {r['vocab']:,} | {'yes' if r['head'] else 'no'} | {r['decode']} | {overlap} | "
                         f"{note} | | | | | | {peak(r)} |")
            continue
        lines.append(f"| {name} | {r['vocab']:,} | {'yes' if r['head'] else 'no'} | {r['decode']} | {overlap} | "
                     f"{fmt(rate, '.0f')} | {fmt(step, '.1f')} | {fmt(r.get('table_prepare_ms'), '.2f')} | "
                     f"{fmt(r.get('table_wait_ms'), '.2f')} | {fmt(r.get('table_update_ms'), '.2f')} | "
                     f"{fmt(r.get('data_wait_ms'), '.2f')} | "
                     f"{peak(r) if p.device_type == 'cuda' else 'no CUDA'} |")
    lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {mark(c['ok'])} | {c['detail']} |" for c in checks]
    if ratios:
        lines += ["", "| comparison | measured | goal |", "| --- | --- | --- |"]
        lines += [f"| {g['goal']} | {g['value']} | {'' if g['ok'] is None else mark(g['ok'])} |" for g in ratios]
    return "\n".join(lines)


def finish(results: dict[str, dict], p: Plan, header: str, out: Path | None = None) -> int:
    """Print the summary (and write it, with the results, under ``out``); 1 if a correctness check failed."""
    checks, ratios = checks_from(results, p), ratios_from(results, p.batch_size)
    table = summary_table(results, checks, ratios, p, header)
    print("\n" + table, flush=True)
    failed = [c for c in checks if c["ok"] is False]
    if out is not None:
        (out / "summary.md").write_text(table + "\n", encoding="utf-8")
        (out / "results.json").write_text(json.dumps({"plan": asdict(p), "results": results, "checks": checks,
                                                      "comparisons": ratios}, indent=1, default=str) + "\n")
    for c in failed:  # one line per reason
        for line in c.get("reasons") or [c["detail"]]:
            print(f"FAIL: {c['check']}: {line}", file=sys.stderr, flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------- main
def runs_for(p: Plan) -> list[Run]:
    n = p.batches
    return [Run("small_vocab", p.small_vocab, batches=n), Run("main", p.vocab, batches=n, writes_checkpoint=True),
            Run("resume", p.vocab, batches=p.resume_batches, writes_checkpoint=True),
            Run("no_head", p.vocab, head=False, batches=n),
            Run("decode_gpu", p.vocab, decode="gpu", batches=n), Run("no_overlap", p.vocab, overlap="false", batches=n)]


def main(argv: list[str] | None = None) -> int:
    from im2vec.train.threads import available_cores

    ap = ArgumentParser(prog="python -m im2vec.bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code path on the CPU, tiny (no CUDA needed)")
    ap.add_argument("--out", default=None,
                    help="run folders, summary.md, results.json (default outputs/bench_gpu/<time>)")
    ap.add_argument("--cache", default=None, help="where the generated shards are kept (default $IM2VEC_CACHE or "
                    "~/.cache/im2vec)")
    ap.add_argument("--batches", type=int, default=None, help="batches per run (default 40; dry run 4)")
    ap.add_argument("--window", type=int, default=None, help="batches per timed window (default 5; dry run 1)")
    ap.add_argument("--warm-windows", type=int, default=None, help="windows not timed (default 2; dry run 1)")
    ap.add_argument("--resume-batches", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="V of the main run (default 600000; dry run 20000)")
    ap.add_argument("--small-vocab", type=int, default=None, help="V of the memory comparison (default 60000)")
    ap.add_argument("--images", type=int, default=None, help="distinct photos generated (default 4096)")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: cores - 2)")
    ap.add_argument("--trunk", default=None, help="model.trunk (default resnet50; dry run small_cnn)")
    ap.add_argument("--precision", default=None, help="trainer.precision (default bf16-mixed)")
    ap.add_argument("--mem-slack-mib", type=float, default=64.0, help="allowed peak GPU memory growth, MiB")
    ap.add_argument("--skip", default="", help=f"runs to leave out, comma-separated, of {','.join(RUNS)}")
    ap.add_argument("--override", action="append", default=[], help="one more Hydra override for every run")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep main's and resume's last.ckpt (at V = "
                    "600k about 1.8 GB each: table + Adam moments)")
    a = ap.parse_args(argv)

    cores = available_cores()
    if not a.dry_run and not torch.cuda.is_available():
        print("im2vec.bench.gpu: no CUDA device here: this check needs a GPU (or use --dry-run for the CPU path)",
              file=sys.stderr, flush=True)
        return 2
    p = dry_plan(cores) if a.dry_run else gpu_plan(cores)
    given = {"batches": a.batches, "window": a.window, "warm_windows": a.warm_windows,
             "resume_batches": a.resume_batches, "batch_size": a.batch_size, "vocab": a.vocab,
             "small_vocab": a.small_vocab, "images": a.images, "workers": a.workers, "trunk": a.trunk,
             "precision": a.precision}
    p = replace(p, **{k: v for k, v in given.items() if v is not None}, mem_slack_mib=a.mem_slack_mib,
                extra=tuple(a.override))
    unknown = sorted(set(filter(None, a.skip.split(","))) - set(RUNS))
    if unknown:
        ap.error(f"--skip: unknown run(s) {unknown}; runs: {', '.join(RUNS)}")
    p = replace(p, skip=tuple(filter(None, a.skip.split(","))))
    out = Path(a.out) if a.out else Path("outputs/bench_gpu") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache or os.environ.get("IM2VEC_CACHE") or Path.home() / ".cache/im2vec").expanduser()
    # the no-head run's table optimizer never steps (no gradient): its schedule still does, as in training
    warnings.filterwarnings("ignore", message=r".*lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available", "LOCAL_RANK": not this report's

    t0 = time.perf_counter()
    data, vocab_path, gen_s = ensure_data(cache, p, cores)
    device = torch.cuda.get_device_name(0) if p.device_type == "cuda" else "CPU (dry run)"
    print(f"im2vec.bench.gpu: {device}, {cores} cores; {p.images} photos of {p.stored} px in {data} "
          f"({'generated in %.0f s' % gen_s if gen_s else 'cached'}); V = {p.vocab:,} / {p.small_vocab:,}; "
          f"{p.trunk}, d={p.dim}, {p.image_size} px, B={p.batch_size}, {p.precision}, {p.workers} loader workers",
          flush=True)
    keys = {k: has_key(k) for k in ("data.decode", "optim.overlap", "threads.trunk")}
    for k, present in list(keys.items())[:2]:
        if not present:
            print(f"im2vec.bench.gpu: configs/ has no {k}: the runs that vary it are skipped", flush=True)

    results: dict[str, dict] = {}
    for r in runs_for(p):
        if r.name in p.skip:
            continue
        if r.name == "resume":
            main_ckpt = (results.get("main") or {}).get("checkpoint")
            if not main_ckpt or not Path(main_ckpt).is_file():
                results[r.name] = {**asdict(r), "placement": [], "failures": [], "skipped": "no checkpoint from main"}
                continue
            r.resume_from = main_ckpt
        results[r.name] = run_one(r, p, keys, data, vocab_path, out)
    if not a.keep_checkpoints:
        for r in results.values():
            if r.get("checkpoint"):
                Path(r["checkpoint"]).unlink(missing_ok=True)
    header = (f"**im2vec.bench.gpu** — {device}, {cores} cores, {p.trunk} d={p.dim}, {p.image_size} px, "
              f"B={p.batch_size}, {p.precision}, {p.workers} loader workers, {p.batches} batches a run "
              f"(images/s: median of {p.window}-batch windows after {p.warm_windows}), "
              f"{time.perf_counter() - t0:.0f} s in all")
    return finish(results, p, header, out)


if __name__ == "__main__":
    # Hydra instantiates im2vec.bench.gpu.Probe by name: run that module's main, so that its classes are the ones
    # run_one looks for (this file as __main__ is a second copy of the module)
    import importlib

    from im2vec.errors import run_cli

    run_cli(importlib.import_module("im2vec.bench.gpu").main)
