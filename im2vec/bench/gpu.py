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

import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from im2vec.bench.gpu_data import ensure_data
from im2vec.bench.gpu_report import finish
from im2vec.bench.gpu_runs import RUNS, dry_plan, gpu_plan, has_key, run_one, runs_for
from im2vec.errors import ArgumentParser, run_cli


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
    run_cli(main)
