"""Raw collections -> webdataset shards, split into train/val/test.

    python -m im2vec.data.ingest yfcc META [META ...] --images MIRROR --out DIR [--template T] [--workers N]
    python -m im2vec.data.ingest collection MANIFEST --out DIR [--root FOLDER] [--max-side 512]

The main process reads the metadata (or manifest), skips and counts bad lines, gives each sample a
split by a hash of its photo id (or user) and cuts each split's sequence into shards of
``--shard-size`` samples. Worker processes read the images, skip and count missing, corrupt and
oversized ones, optionally shrink them, and write ``DIR/<split>/shard-NNNNNN.tar`` (through a
temporary name) and then its ``.stats.json``. A shard whose stats file exists is finished: a run
started again with the same settings skips it, so an interrupted ingest (even one killed with
``kill -9``) resumes where it stopped and ends with the same shards, byte for byte, as a run that was
never interrupted. A resumed run refuses inputs whose content changed since the first run started
(``input_stamps``): old and new samples are never mixed.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from im2vec.data.images import MAX_PIXELS
from im2vec.data.ingest_shard import shard_name, stats_name, write_json, write_shard
from im2vec.data.ingest_sources import (
    SPLIT_BY,
    SPLITS,
    Item,
    Settings,
    collection_samples,
    yfcc_samples,
)
from im2vec.data.stamps import input_changed, input_stamp
from im2vec.data.yfcc import DEFAULT_TEMPLATE, Skip
from im2vec.errors import ArgumentParser, BadValue, NotFound, run_cli


def split_of(value: str, val_fraction: float, test_fraction: float, salt: str = "im2vec") -> str:
    """train, val or test, fixed by a hash of ``value`` (a photo id or a user id): the same on every
    machine and every run, independent of the order of the input."""
    h = hashlib.blake2b(f"{salt}\0{value}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"



# ---------------------------------------------------------------- the main loop
def run(s: Settings, items: Iterable[Item], out: str | Path, workers: int = 0, verbose: bool = True,
        bar=None) -> dict:
    """Shard ``items`` into ``out``; returns the summary (also written to ``out/summary.json``)."""
    out = Path(out)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    _check_settings(out, s)
    for split in SPLITS:  # what a killed run was writing: rewritten from the start below
        for stale in (out / split).glob("shard-*.tmp*"):
            stale.unlink(missing_ok=True)
    skipped, examples = Counter(), {}
    shards: dict[str, dict] = {}  # "split/index" -> stats
    buffers = {split: [] for split in SPLITS}
    next_index = dict.fromkeys(SPLITS, 0)
    pool = cf.ProcessPoolExecutor(workers) if workers > 0 else None
    pending: set[cf.Future] = set()

    written = 0

    def finished(stats: dict) -> None:
        nonlocal written
        shards[f"{stats['split']}/{stats['index']}"] = stats
        written += stats["written"]
        if bar is not None:
            bar.set_postfix(shards=len(shards), written=written, refresh=False)

    # a window: whole shards' worth of samples (the split's whole input when smaller), permuted before cutting
    window = s.shard_size * max(1, -(-s.shuffle_window // s.shard_size)) if s.shuffle_window else s.shard_size
    windows = dict.fromkeys(SPLITS, 0)

    def flush_window(split: str) -> None:
        samples, buffers[split] = buffers[split], []
        if s.shuffle_window:
            random.Random(f"{s.shuffle_seed}/{split}/{windows[split]}").shuffle(samples)
        windows[split] += 1
        for i in range(0, len(samples), s.shard_size):
            flush(split, samples[i: i + s.shard_size])

    def flush(split: str, samples: list) -> None:
        index = next_index[split]
        next_index[split] = index + 1
        done = stats_name(shard_name(out, split, index))
        if done.exists():  # finished by an earlier run
            try:
                finished(json.loads(done.read_bytes()))
                return
            except (ValueError, RecursionError):  # not a stats file im2vec wrote whole: write the shard again
                done.unlink()
        args = (str(out), split, index, samples, s.max_pixels, s.max_side, s.quality)
        if pool is None:
            finished(write_shard(*args))
            return
        while len(pending) >= 2 * workers:  # bounded: the reader never runs far ahead of the writers
            done_now, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in done_now:
                pending.discard(f)
                finished(f.result())
        pending.add(pool.submit(write_shard, *args))

    try:
        for item in items:
            if isinstance(item, Skip):
                skipped[item.reason] += 1
                examples.setdefault(item.reason, str(item))
                continue
            key, path, meta, split_key = item
            split = split_key if s.split_by == "manifest" else split_of(split_key, s.val_fraction, s.test_fraction, s.salt)
            buffers[split].append((key, path, meta))
            if len(buffers[split]) == window:
                flush_window(split)
        for split in SPLITS:
            if buffers[split]:
                flush_window(split)
        for f in cf.as_completed(pending):
            finished(f.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for stats in shards.values():
        skipped.update(stats["skipped"])
        for reason, example in stats.get("examples", {}).items():
            examples.setdefault(reason, example)
    summary = {
        "written": {sp: sum(v["written"] for v in shards.values() if v["split"] == sp) for sp in SPLITS},
        "shards": {sp: sum(1 for v in shards.values() if v["split"] == sp and v["written"]) for sp in SPLITS},
        "uploaders": {sp: len({u for v in shards.values() if v["split"] == sp for u in v.get("users", {})})
                      for sp in SPLITS},
        "skipped": dict(sorted(skipped.items())),
        "examples": examples,
    }
    summary["warnings"] = split_warnings(summary, s)
    write_json(out / "summary.json", summary)
    if verbose:
        print(format_summary(summary, out), file=sys.stderr)
    return summary


def _check_settings(out: Path, s: Settings) -> None:
    """A first run records its settings and its inputs' stamps in ``out/ingest.json``; a resumed run
    must have the same settings and inputs of the same content."""
    path, mine = out / "ingest.json", asdict(s)
    if path.exists():
        try:
            theirs = json.loads(path.read_bytes())
            if not isinstance(theirs, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as e:
            raise BadValue(f"ingest: {path} is not an ingest's record ({type(e).__name__}: {str(e)[:100]})",
                           "write to a fresh folder (or remove the file if the folder holds no shards)") from None
        differ = sorted(k for k in mine if theirs.get(k) != mine[k])
        if differ:
            raise BadValue(f"ingest: {out} was written with other settings ({', '.join(differ)})",
                           "resume with the same ones or write to a fresh folder")
        for p, stamp in zip(s.inputs, theirs.get("input_stamps") or []):  # none in folders of older versions
            changed = input_changed(p, stamp)
            if changed:
                raise BadValue(f"ingest: {p} changed since the ingest into {out} started ({changed})",
                               "restore the original file, or ingest into a fresh folder")
    else:
        write_json(path, {**mine, "input_stamps": [input_stamp(p) for p in s.inputs]})


MIN_HELD_OUT = (300, 10)  # images, uploaders: fewer in a held-out split and its figures' intervals over uploaders
# (im2vec/eval/intervals.py) are too wide to compare settings on, or to trust the γ chosen on it


def split_warnings(summary: dict, s: Settings) -> list[str]:
    """With --split-by user: one line for each held-out split too small to choose or measure anything, with its
    numbers and the fraction that would do (expected counts: the split takes that share of the uploaders)."""
    if s.split_by != "user":
        return []
    n_img, n_up = sum(summary["written"].values()), sum(summary["uploaders"].values())
    lines = []
    for split, frac, flag in (("val", s.val_fraction, "--val-fraction"), ("test", s.test_fraction, "--test-fraction")):
        img, up = summary["written"][split], summary["uploaders"][split]
        if img >= MIN_HELD_OUT[0] and up >= MIN_HELD_OUT[1]:
            continue
        need = max(MIN_HELD_OUT[0] / max(n_img, 1), MIN_HELD_OUT[1] / max(n_up, 1))
        fix = (f"{flag} {need:.2g} would give about {need * n_img:,.0f} images of {need * n_up:,.0f} uploaders"
               if need < 0.5 else f"the collection has {n_img:,} images of {n_up:,} uploaders, too few to hold "
               "uploaders out: use --split-by id (images held out at random)")
        lines.append(f"ingest: warning: the {split} split has {img:,} images of {up:,} uploaders (--split-by user, "
                     f"{flag} {frac:g}): too few to choose γ on or to measure anything (at least "
                     f"{MIN_HELD_OUT[0]} images and {MIN_HELD_OUT[1]} uploaders) — {fix}")
    return lines


def format_summary(summary: dict, out: Path | str) -> str:
    w, n = summary["written"], summary["shards"]
    lines = [f"ingest: wrote {sum(w.values()):,} samples to {out}: "
             + ", ".join(f"{sp} {w[sp]:,} in {n[sp]} shard(s)" for sp in SPLITS)]
    sk = summary["skipped"]
    lines.append(f"ingest: skipped {sum(sk.values()):,}" + (": " + ", ".join(f"{r} {c:,}" for r, c in sk.items()) if sk else ""))
    lines += [f"  e.g. {e}" for e in summary["examples"].values()]
    return "\n".join(lines + summary.get("warnings", []))


def _progress_bar(paths: list[str], quiet: bool):
    from tqdm import tqdm

    total = sum(Path(p).stat().st_size for p in paths if Path(p).is_file())
    return tqdm(total=total, unit="B", unit_scale=True, desc="ingest", disable=quiet, mininterval=1.0)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.data.ingest", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="source", required=True)
    y = sub.add_parser("yfcc", help="the YFCC100M metadata file(s) and a local image mirror")
    y.add_argument("metadata", nargs="+", help="yfcc100m_dataset (25 columns) or yfcc100m_dataset-N parts (23), plain or .bz2")
    y.add_argument("--images", required=True, help="the mirror's root folder")
    y.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="image path below --images; fields {id} {hash} {hash_a} {hash_b} {user} {ext} {server} {farm} {secret}")
    y.add_argument("--machine-tags", action="store_true", help="add the machine tags to the user tags")
    c = sub.add_parser("collection", help="a manifest (JSONL or TSV) beside a folder of images")
    c.add_argument("manifest", help='.jsonl ({"image": path, "tags": [...]}) or .tsv (path<TAB>tag1,tag2)')
    c.add_argument("--root", default=None, help="the collection's folder (default: the manifest's); paths outside are refused")
    for p in (y, c):
        p.add_argument("--out", required=True, help="output folder: <out>/{train,val,test}/shard-NNNNNN.tar")
        p.add_argument("--shard-size", type=int, default=5000)
        p.add_argument("--split-by", choices=SPLIT_BY if p is c else ("id", "user"), default="id",
                       help="hash of the photo id, or of the user (one uploader's photos in one split), "
                            "or (collections) the manifest's own 'split' field: train, val or test")
        p.add_argument("--val-fraction", type=float, default=0.01)
        p.add_argument("--test-fraction", type=float, default=0.01)
        p.add_argument("--max-side", type=int, default=None, help="shrink longer images to this side (JPEG)")
        p.add_argument("--shuffle-window", type=int, default=Settings.shuffle_window,
                       help="samples of a split written in a seeded random order within windows of this many "
                            "(the whole split when smaller); 0: the input's order")
        p.add_argument("--shuffle-seed", type=int, default=0, help="the seed of that order")
        p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="larger images are skipped (decompression bombs)")
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shard-writing processes (0: in this one)")
        p.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    inputs = [os.path.abspath(p) for p in (a.metadata if a.source == "yfcc" else [a.manifest])]
    for p in inputs:
        if not Path(p).is_file():
            raise NotFound(f"ingest: input not found: {p}", "check the path")
    s = Settings(source=a.source, inputs=inputs, shard_size=a.shard_size, split_by=a.split_by,
                 val_fraction=a.val_fraction, test_fraction=a.test_fraction, max_side=a.max_side,
                 max_pixels=a.max_pixels, machine_tags=getattr(a, "machine_tags", False),
                 shuffle_window=a.shuffle_window, shuffle_seed=a.shuffle_seed,
                 template=getattr(a, "template", DEFAULT_TEMPLATE),
                 root=os.path.abspath(a.images if a.source == "yfcc" else (a.root or os.path.dirname(inputs[0]))))
    bar = _progress_bar(inputs, a.quiet)
    try:
        if a.source == "yfcc":
            items = yfcc_samples(s, bar.update)
        else:
            items = collection_samples(s, bar.update)
        summary = run(s, items, a.out, a.workers, verbose=False, bar=bar)
    finally:
        bar.close()
    print(format_summary(summary, a.out), file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_cli(main)
