"""The GPU check's runs (im2vec.bench.gpu): what one invocation runs (``Plan``: the GPU sizes or --dry-run's
tiny ones; the six runs of ``RUNS``) and one run through ``im2vec.train.training.train`` with the composed
Hydra config, measured by the probe of im2vec.bench.gpu_probe."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from im2vec.bench.gpu_probe import Probe, placement_failures
from im2vec.bench.trunk_only import TrunkOnly
from im2vec.errors import one_line
from im2vec.train.module import Im2VecModule

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
RUNS = ("small_vocab", "main", "resume", "no_head", "decode_gpu", "no_overlap")


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
         f"optim.warmup_batches={max(1, p.batches // 4)}", "+callbacks.probe._target_=im2vec.bench.gpu_probe.Probe",
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


def runs_for(p: Plan) -> list[Run]:
    n = p.batches
    return [Run("small_vocab", p.small_vocab, batches=n), Run("main", p.vocab, batches=n, writes_checkpoint=True),
            Run("resume", p.vocab, batches=p.resume_batches, writes_checkpoint=True),
            Run("no_head", p.vocab, head=False, batches=n),
            Run("decode_gpu", p.vocab, decode="gpu", batches=n), Run("no_overlap", p.vocab, overlap="false", batches=n)]

