"""Loader benchmark: images/s of plain PIL decoding against the im2vec training loader, full and reduced-size.

    python -m im2vec.bench.loader                      # 400 photo-like 1600×1200 JPEGs: a few minutes on 2 cores
    python -m im2vec.bench.loader --images 64 --json bench.json

Everything is measured in one run, so the ratios sit side by side: plain decoding of the same JPEG bytes held in
memory (one process, then a Pool of all cores) against ``train_loader`` (num_workers=0, then one worker per core),
each with JPEG draft mode (reduced-size decoding) and without it (full decoding). Plain reduced decoding asks
for the target size (1/4 scale here); the loader asks for the scale that keeps its crop at full resolution
(1/4 or 1/2 here, by the crop's size), so it does more decoding work than plain reduced decoding.

Each number is the best of a few interleaved rounds: by chance of its heap's state, a process may hand every
freed full-size image buffer (7.7 MB at 1600×1200) back to the OS and fault it in again for the next image,
which halved plain full decoding in one round on a 2-core VM. Pillow's own defaults are kept, as in training;
PILLOW_BLOCKS_MAX (Pillow's cache of freed buffers) changes them for both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from im2vec.data.loader import train_loader
from im2vec.data.vocab import Vocabulary
from im2vec.errors import ArgumentParser, run_cli

TAGS = ("sky", "sea", "tree", "street", "dog", "red", "canon", "2015")
SHARDS = 4
GOAL_RATIO = 0.9  # the loader keeps at least this share of plain decoding's speed, per core
ROWS = (("plain", "full"), ("plain", "reduced"), ("loader", "reduced"), ("loader", "full"))


# ---------------------------------------------------------------- the images: photo-like, not random noise
def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field, a few flat shapes and a texture of coarse-to-fine noise: it compresses and
    decodes like a photo (pure random noise would cost several times more to decode than any photo)."""
    img = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x, y, r = int(rng.integers(width)), int(rng.integers(height)), int(rng.integers(height // 20, height // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    texture = np.zeros((height, width), np.float32)
    for factor, amplitude in ((16, 20), (4, 10), (1, 4)):  # grey levels at 1/16, 1/4 and full resolution
        small = Image.fromarray(rng.integers(0, 256, (height // factor, width // factor), dtype=np.uint8))
        texture += (np.asarray(small.resize((width, height), Image.BICUBIC), np.float32) - 128) * (amplitude / 128)
    pixels = np.asarray(img, np.float32) + texture[..., None]  # (H, W, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_sample(job: tuple[int, int, int, int]) -> dict:
    """Sample ``index`` of the benchmark set: a quality-90 JPEG and 1-3 tags, fixed by (seed, index)."""
    index, seed, width, height = job
    rng = np.random.default_rng([seed, index])
    buf = io.BytesIO()
    photo(rng, width, height).save(buf, format="JPEG", quality=90)
    tags = [str(t) for t in rng.choice(TAGS, size=int(rng.integers(1, 4)), replace=False)]
    return {"__key__": f"{index:06d}", "jpg": buf.getvalue(), "json": json.dumps({"tags": tags}).encode()}


def write_shards(out: Path, n: int, width: int, height: int, seed: int,
                 processes: int) -> tuple[list[str], Vocabulary, list[bytes]]:
    """Write n samples into SHARDS tars and vocab.tsv under ``out``; return the shards, the vocabulary and
    the JPEG bytes (for plain decoding)."""
    jpegs, tag_lists, per_shard = [], [], math.ceil(n / SHARDS)
    with mp.get_context("fork").Pool(processes) as pool, \
            wds.ShardWriter(str(out / "bench-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in pool.imap(make_sample, ((i, seed, width, height) for i in range(n)), chunksize=4):
            sink.write(sample)
            jpegs.append(sample["jpg"])
            tag_lists.append(json.loads(sample["json"])["tags"])
    vocab = Vocabulary.from_tag_lists(tag_lists)
    vocab.save(out / "vocab.tsv")
    return [str(out / f"bench-{i:06d}.tar") for i in range(math.ceil(n / per_shard))], vocab, jpegs


# ---------------------------------------------------------------- plain decoding of bytes in memory
_JPEGS: list[bytes] = []


def _keep(jpegs: list[bytes]) -> None:
    """Pool initializer: with fork the list is inherited, not pickled, so nothing is sent per task but a span."""
    global _JPEGS
    _JPEGS = jpegs


def _decode_span(span: tuple[int, int, int | None]) -> int:
    lo, hi, target = span
    for data in _JPEGS[lo:hi]:
        img = Image.open(io.BytesIO(data))
        if target:
            img.draft("RGB", (target, target))
        img.convert("RGB")
    return hi - lo


def plain_rate(jpegs: list[bytes], target: int | None, processes: int) -> float:
    """Images/s decoding every JPEG once (``target``: reduced-size decoding to at least target×target),
    in this process or in a Pool; the Pool's start is not timed."""
    if processes == 1:
        _keep(jpegs)
        start = time.perf_counter()
        _decode_span((0, len(jpegs), target))
        return len(jpegs) / (time.perf_counter() - start)
    chunks = processes * 4  # several spans per process: a slow span does not leave a core idle
    spans = [(i * len(jpegs) // chunks, (i + 1) * len(jpegs) // chunks, target) for i in range(chunks)]
    with mp.get_context("fork").Pool(processes, _keep, (jpegs,)) as pool:
        pool.map(abs, range(processes))  # the workers are up before the clock starts
        start = time.perf_counter()
        done = sum(pool.map(_decode_span, spans, chunksize=1))
        return done / (time.perf_counter() - start)


# ---------------------------------------------------------------- the training loader
def loader_rate(shards: list[str], vocab: Vocabulary, target: int, batch_size: int, images: int, workers: int,
                draft: bool, seed: int, decode: str = "cpu") -> tuple[float, int]:
    """(images/s, images counted) of ``train_loader``: the clock starts when every worker has delivered its
    first batch (worker start and shuffle-buffer fill are not timed) and stops at the last batch.
    ``decode="gpu"``: the workers' side only (JPEGs left encoded; nothing calls finish_batch)."""
    warm = max(1, workers)  # the workers run in step: their first batches arrive together
    timed = math.ceil(images / (batch_size * warm)) * warm  # a multiple of the worker count: no worker is ahead
    loader = train_loader(shards, vocab, target, batch_size, warm + timed, workers, seed, rank=0, world_size=1,
                          draft=draft, decode=decode)
    counted, start, stop = 0, 0.0, 0.0
    for i, batch in enumerate(loader):
        stop = time.perf_counter()
        if i == warm - 1:
            start = stop
        elif i >= warm:
            counted += len(batch["keys"])
    return counted / (stop - start), counted


# ---------------------------------------------------------------- data.decode=cpu against data.decode=gpu
def decode_comparison(device: str | torch.device = "cuda", images: int = 256, width: int = 1600, height: int = 1200,
                      target: int = 224, batch_size: int = 64, workers: int | None = None, rounds: int = 3,
                      seed: int = 0, workdir: str | Path | None = None) -> dict:
    """data.decode=cpu against data.decode=gpu, side by side in one run, on ``images`` generated photo-like
    width×height quality-90 JPEGs (written under ``workdir``, default a temporary folder; reused if there).

    Measures, each the best of ``rounds`` interleaved rounds:
      - ``loader_samples_per_s``: {"cpu": …, "gpu": …} samples/s of the training loader with ``workers``
        worker processes (default one per core; 0 = in this process), batches of ``batch_size`` crops of
        ``target`` px. For "gpu" it is the workers' side only (header read, crop drawn, bytes batched).
      - ``finish_batch``: images/s of ``gpu_decode.finish_batch`` on ``device`` (decode, crop, resize,
        flip) over the batches one pass of the gpu-mode loader delivered, the first batch a warm-up.
    Their ratio to each other says how many loader cores one device's decoding replaces. Returns a dict
    (JSON-ready): settings, the rates, every round's figures, wall_s."""
    from im2vec.data.gpu_decode import finish_rate

    t0 = time.perf_counter()
    workers = (os.cpu_count() or 1) if workers is None else workers
    device = torch.device(device)
    with contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "vocab.tsv").is_file() and len(list(folder.glob("bench-*.tar"))) == SHARDS:
            shards, vocab = sorted(str(p) for p in folder.glob("bench-*.tar")), Vocabulary.load(folder / "vocab.tsv")
        else:
            shards, vocab, _ = write_shards(folder, images, width, height, seed, os.cpu_count() or 1)
        steps = math.ceil(images / batch_size)
        encoded = list(train_loader(shards, vocab, target, batch_size, steps, 0, seed, rank=0, world_size=1,
                                    decode="gpu"))
        runs = {"cpu": [], "gpu": [], "finish_batch": []}
        for _ in range(max(1, rounds)):
            for mode in ("cpu", "gpu"):
                runs[mode].append(loader_rate(shards, vocab, target, batch_size, images, workers, True, seed,
                                              decode=mode)[0])
            runs["finish_batch"].append(finish_rate(encoded, device, target, rounds=1)["images_per_s"])
    return {"settings": {"images": images, "width": width, "height": height, "target": target,
                         "batch_size": batch_size, "workers": workers, "rounds": rounds, "seed": seed,
                         "device": str(device), "finish_batch_images": sum(len(b["keys"]) for b in encoded)},
            "loader_samples_per_s": {m: max(runs[m]) for m in ("cpu", "gpu")},
            "finish_batch": {"device": str(device), "images_per_s": max(runs["finish_batch"])},
            "rounds": runs, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- the report
def summarise(rates: dict[str, dict[str, float]], cores: int) -> dict:
    """Per-core ratios (both sides use the same cores) and the two goals, from the measured rates.

    The goal compares the loader as it trains (reduced-size decoding, crops, flips, batching) with
    plain decoding as a plain PyTorch loader does it (``Image.open(f).convert("RGB")``, torchvision's
    pil_loader). The like-for-like ratio (both decoding at full size) shows what the pipeline itself costs."""
    columns = ("1", str(cores))
    ratios = {
        "loader (as it trains) / plain decoding": {c: rates["loader, reduced"][c] / rates["plain, full"][c] for c in columns},
        "loader / plain, both full-size": {c: rates["loader, full"][c] / rates["plain, full"][c] for c in columns},
        "reduced/full, plain": {c: rates["plain, reduced"][c] / rates["plain, full"][c] for c in columns},
        "reduced/full, loader": {c: rates["loader, reduced"][c] / rates["loader, full"][c] for c in columns},
    }

    def lowest(names: list[str]) -> tuple[float, str]:
        return min((ratios[n][c], f"{n}, {c} core(s)") for n in names for c in columns)

    keep, keep_at = lowest(["loader (as it trains) / plain decoding"])
    speedup, speedup_at = lowest(["reduced/full, plain", "reduced/full, loader"])
    keep_goal = f"loader ≥ {GOAL_RATIO:.0%} of plain decoding per core"
    speed_goal = "reduced-size decoding beats full decoding on large photos"
    goals = {keep_goal: (keep >= GOAL_RATIO, f"lowest {keep:.2f}× ({keep_at})"),  # goal: (met, why)
             speed_goal: (speedup > 1, f"lowest {speedup:.2f}× ({speedup_at})")}
    return {"ratios": ratios, "goals": goals}


def table(rates: dict[str, dict[str, float]], summary: dict, cores: int) -> str:
    lines = [f"| measurement | 1 core | {cores} cores |", "| --- | ---: | ---: |"]
    lines += [f"| {name} (images/s) | {r['1']:.1f} | {r[str(cores)]:.1f} |" for name, r in rates.items()]
    ratios = summary["ratios"]
    lines += [f"| {name} (per core) | {r['1']:.2f}× | {r[str(cores)]:.2f}× |" for name, r in ratios.items()]
    lines += [""] + [f"- {goal}: {'PASS' if ok else 'FAIL'} — {why}" for goal, (ok, why) in summary["goals"].items()]
    return "\n".join(lines)


def measure(kind: str, mode: str, processes: int, a: argparse.Namespace, shards: list[str], vocab: Vocabulary,
            jpegs: list[bytes]) -> tuple[float, int]:
    """(images/s, images counted) of one measurement: ``processes`` 1 is this process, else one per core."""
    if kind == "plain":
        return plain_rate(jpegs, a.target if mode == "reduced" else None, processes), len(jpegs)
    workers = 0 if processes == 1 else processes
    return loader_rate(shards, vocab, a.target, a.batch_size, a.images, workers, mode == "reduced", a.seed)


def run(a: argparse.Namespace, workdir: Path) -> dict:
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    shards, vocab, jpegs = write_shards(workdir, a.images, a.width, a.height, a.seed, cores)
    probe = Image.open(io.BytesIO(jpegs[0]))
    probe.draft("RGB", (a.target, a.target))
    print(f"{len(jpegs)} JPEGs {a.width}×{a.height} q90, {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB on average, "
          f"in {len(shards)} shards under {workdir} ({time.perf_counter() - t0:.0f} s); reduced-size decoding gives "
          f"{probe.size[0]}×{probe.size[1]} for a {a.target} px target; {cores} cores; Pillow's block cache "
          f"{Image.core.get_blocks_max()} (PILLOW_BLOCKS_MAX)", flush=True)
    runs = {(kind, mode, p): [] for p in dict.fromkeys((1, cores)) for kind, mode in ROWS}
    counted = {}
    for r in range(a.rounds):  # interleaved, the best kept: one slow spell (machine or heap) does not decide
        for (kind, mode, processes), values in runs.items():
            rate, counted[(kind, processes)] = measure(kind, mode, processes, a, shards, vocab, jpegs)
            values.append(rate)
        print(f"round {r + 1}: " + ", ".join(f"{k} {m} {p}: {v[-1]:.0f}" for (k, m, p), v in runs.items()), flush=True)
    rates = {f"{kind}, {mode}": {str(p): max(runs[(kind, mode, p)]) for p in (1, cores)} for kind, mode in ROWS}
    counts = (f"images/s: the best of {a.rounds} round(s). plain: each of the {len(jpegs)} JPEGs decoded once from "
              f"bytes in memory (Pool start not timed); loader: {a.target} px random-resized crops + flips in "
              f"batches of {a.batch_size}, counting {counted[('loader', 1)]} images at 1 core and "
              f"{counted[('loader', cores)]} at {cores} cores, after each worker's first batch (worker start and "
              f"shuffle-buffer fill not timed); the stream is resampled, so images repeat")
    summary = summarise(rates, cores)
    print(f"\n{counts}\n\n{table(rates, summary, cores)}\n\nwall time {time.perf_counter() - t0:.0f} s", flush=True)
    settings = {k: getattr(a, k) for k in ("images", "width", "height", "target", "batch_size", "seed", "rounds")}
    settings.update(cores=cores, shards=len(shards), pillow_blocks_max=Image.core.get_blocks_max())
    return {"settings": settings, "counted": counts, "images_per_s": rates, "ratios": summary["ratios"],
            "goals": {goal: {"pass": ok, "detail": why} for goal, (ok, why) in summary["goals"].items()},
            "rounds": {f"{k}, {m}, {p} core(s)": v for (k, m, p), v in runs.items()},
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.loader", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400, help="JPEGs to generate; also about the images per loader run")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1200)
    ap.add_argument("--target", type=int, default=224, help="training crop size and reduced-decoding target (px)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="measure everything this many times, keep the best")
    ap.add_argument("--workdir", default=None, help="where to write the shards and vocab.tsv (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # the 1-core loader run must use one core; later runs do their work in workers
    if a.workdir:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(a.workdir) if a.workdir else tempfile.TemporaryDirectory() as workdir:
        results = run(a, Path(workdir))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    run_cli(main)
