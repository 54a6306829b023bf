"""Frozen-trunk fast mode: the trunk runs once over the images, then only W and the tag table train.

    python -m im2vec.train.features CKPT 'SHARDS' --out DIR                 # the trunk of a training checkpoint
    python -m im2vec.train.features --trunk resnet50 --weights resnet50.pth --image-size 224 'SHARDS' --out DIR
    python -m im2vec.train.features --trunk small_cnn --image-size 64 'SHARDS' --out DIR   # random init (--seed 0)

With a frozen trunk f = trunk(x) is the same at every epoch: computed once and stored, a training step
costs the projection u = W·f and the tag head instead of the trunk's forward and backward. The images
are seen as evaluation sees them (``data.eval_view``: the central square at ``--image-size``, no crops or
flips, ``data.normalize``), the features stored as fp16. One split per call (SHARDS: a brace pattern or
a glob, as data.train_shards takes); the generated corpus's three splits:

    CORPUS=$(python -c "from im2vec.data.corpus import ensure_corpus; print(ensure_corpus('$HOME/.cache/im2vec'))")
    for s in train val test; do
        python -m im2vec.train.features --trunk small_cnn --image-size 64 "$CORPUS/$s-*.tar" --out data/features/corpus/$s
    done
    python train.py +experiment=features        # W and the table from data/features/corpus/{train,val}

(``--trunk small_cnn`` draws the same random trunk at every call, from ``--seed``; ``--weights
DIR/train/trunk.pt`` or a checkpoint gives every split the same trained one.) DIR then holds

    <source shard's name>  one webdataset tar per source shard with a usable sample: KEY.f16 (the F
                           features, fp16 little-endian) and KEY.json (the source json as it was: tags, user, …)
    trunk.pt               the trunk's weights, weights-only loadable: a model trained from these features
                           carries the same trunk, so its checkpoint tags images (Tagger) unchanged
    features.json          the manifest: trunk, feature width, image size, digest of the trunk's weights,
                           source shards, samples per shard, skipped samples by reason

all written into a temporary folder beside DIR and renamed when complete: DIR is whole or as it was.
A sample with a corrupt image or json is skipped and counted (``data.SKIP_REASONS``); which tags count
is left to training's vocabulary, so one extraction serves any vocabulary, as the image shards do.

Training (``+experiment=features``) reads them through ``FeatureDataModule`` (im2vec.train.feature_data:
batches with "features" (B, F) where image batches have "image") and ``frozen_encoder``
(im2vec.train.frozen_trunk: the real ImageEncoder with trunk.pt's weights, its trunk's parameters frozen:
AdamW trains W alone).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import webdataset as wds
from torch import nn

from im2vec.data.images import MAX_PIXELS, TooLarge
from im2vec.data.loader import worker_init
from im2vec.data.samples import (
    IMAGE_EXTS,
    META_ERRORS,
    SKIP_BAD_META,
    SKIP_IMAGE,
    SKIP_REASONS,
    SKIP_TOO_LARGE,
    _Samples,
    eval_view,
    normalize,
    read_meta,
)
from im2vec.data.shards import expand_shards
from im2vec.errors import ArgumentParser, BadValue, NotFound, positive_int, run_cli
from im2vec.train import threads
from im2vec.train.feature_data import EXT, FORMAT, MANIFEST
from im2vec.train.frozen_trunk import TRUNK_FILE, TRUNK_FORMAT, load_trunk, trunk_digest


# ---------------------------------------------------------------- extraction
class _Extraction(_Samples):
    """Extraction's per-sample stage: the eval view of every readable image, its json kept byte for byte.
    A sample is skipped (and counted) only for a bad json or image: tags are the training vocabulary's
    business."""

    def decode(self, samples):
        for s in samples:
            # each sample here: {"__key__", "__url__", "jpg"|"png"|…: bytes, "json": bytes}
            try:
                read_meta(s)
            except META_ERRORS:
                self.skipped[SKIP_BAD_META] += 1
                continue
            try:
                x = self.image(next(s[e] for e in IMAGE_EXTS if e in s), None)
            except TooLarge:
                self.skipped[SKIP_TOO_LARGE] += 1
                continue
            except Exception:  # noqa: BLE001 -- PIL raises many kinds on bad bytes; none may stop the pass
                self.skipped[SKIP_IMAGE] += 1
                continue
            yield x, s["json"], s["__key__"], s["__url__"]

    def collate(self, items: list[tuple]) -> dict:
        skipped, self.skipped = torch.tensor(self.skipped), [0] * len(SKIP_REASONS)
        images, metas, keys, urls = zip(*items) if items else ((), (), (), ())
        image = torch.stack(images) if images else torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
        return {"image": image, "json": list(metas), "keys": list(keys), "urls": list(urls), "skipped": skipped}

    def flush(self, batches):
        """The batches, then one empty batch with the skips counted after the last one: every skip is reported."""
        yield from batches
        if any(self.skipped):
            yield self.collate([])


def extraction_loader(shards: list[str], image_size: int, batch_size: int, num_workers: int,
                      max_pixels: int = MAX_PIXELS) -> wds.WebLoader:
    stages = _Extraction(None, eval_view, image_size, seed=0, max_pixels=max_pixels)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,  # worker w reads shards w, w+n, w+2n, … in that order (extract relies on it)
        wds.tarfile_to_samples(handler=stages.read_error),
        stages.decode,
        # at this point each sample is (image (3, S, S) uint8, json bytes, key, source shard)
        wds.batched(batch_size, collation_fn=stages.collate, partial=True),
        stages.flush,
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                         worker_init_fn=functools.partial(worker_init, 0) if num_workers else None)


def _local(url: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]+:", url)  # pipe:, s3:, http:// are not paths


@torch.no_grad()
def extract(trunk: nn.Module, name: str, width: int, shards: list[str], out: str | os.PathLike, image_size: int,
            batch_size: int = 64, device: str = "cpu", num_workers: int = 1, source: dict | None = None) -> dict:
    """Every usable sample of ``shards`` through ``trunk``: feature shards, trunk.pt and features.json in ``out``
    (replacing an earlier extraction there). Returns the manifest."""
    out = Path(out)
    names = [Path(s).name for s in shards]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadValue(f"features: two source shards named {twice[0]}: feature shards are named after them",
                       "extract each folder into its own --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise BadValue(f"features: --out {out} exists and is not a features folder", "give a new or empty folder")
    missing = [s for s in shards if _local(s) and not Path(s).is_file()]
    if missing:
        raise NotFound(f"features: shard not found: {missing[0]}", "check SHARDS")
    trunk = trunk.to(device).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    where = {s: i for i, s in enumerate(shards)}
    counts, skipped, writers, n = [0] * len(shards), torch.zeros(len(SKIP_REASONS), dtype=torch.long), {}, 0
    lanes = max(1, num_workers)
    t0 = time.perf_counter()
    try:
        for batch in extraction_loader(shards, image_size, batch_size, num_workers):
            skipped += batch["skipped"]
            if not batch["keys"]:
                continue
            f = trunk(normalize(batch["image"].to(device))).to(torch.float16).cpu()  # (B, F)
            for key, meta, url, row in zip(batch["keys"], batch["json"], batch["urls"], f):
                i = where[url]
                if i not in writers:  # the worker that reads shard i has finished its earlier shards: close them
                    for j in [j for j in writers if j % lanes == i % lanes and j < i]:
                        writers.pop(j).close()
                    writers[i] = wds.TarWriter(str(tmp / names[i]))
                writers[i].write({"__key__": key, EXT: row.numpy().tobytes(), "json": meta})
                counts[i] += 1
            n += len(batch["keys"])
        for w in writers.values():
            w.close()
        seconds = time.perf_counter() - t0
        if n == 0:
            raise BadValue(f"features: not one usable image in {len(shards)} shard(s) "
                           f"({', '.join(f'{r} {k}' for r, k in zip(SKIP_REASONS, skipped.tolist()) if k) or 'empty'})",
                           "check SHARDS: webdataset tars of KEY.jpg + KEY.json")
        state = {k: v.detach().cpu() for k, v in trunk.state_dict().items()}
        digest = trunk_digest(trunk)
        torch.save({"format": TRUNK_FORMAT, "trunk": name, "width": width, "digest": digest, "state_dict": state},
                   tmp / TRUNK_FILE)
        manifest = {
            "format": FORMAT, "trunk": name, "width": width, "dtype": "float16", "image_size": image_size,
            "view": "eval", "trunk_digest": digest, "trunk_file": TRUNK_FILE, "source": source or {},
            "source_shards": [str(Path(s).resolve()) if _local(s) else s for s in shards],
            "shards": [{"name": names[i], "source": shards[i], "samples": c} for i, c in enumerate(counts) if c],
            "samples": n, "skipped": dict(zip(SKIP_REASONS, skipped.tolist())),
            "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace(tmp, out)
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 -- already failing: the first error is the one to show
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an earlier extraction there is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



# ---------------------------------------------------------------- the command
def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m im2vec.train.features", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=None, help="a training checkpoint whose trunk to run "
                   "(else --trunk)")
    p.add_argument("shards", help="image shards: a brace pattern ('train-{000000..000009}.tar') or a glob, quoted")
    p.add_argument("--out", required=True, help="the folder to write (replaced if it holds an earlier extraction)")
    p.add_argument("--trunk", default=None, help="a trunk by name (small_cnn, resnet50, …) instead of a checkpoint")
    p.add_argument("--weights", default=None, help="with --trunk: a trunk.pt of an earlier extraction, a local "
                   ".pth or a torchvision weights name in torch's hub cache (default: random init from --seed)")
    p.add_argument("--seed", type=int, default=0, help="with --trunk and no --weights: the random init's seed")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="side of the eval view (default: the checkpoint's training size; needed with --trunk)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="cpu", help="where the trunk runs (cpu, cuda, cuda:1, …)")
    p.add_argument("--num-workers", type=int, default=1, help="decoding processes beside the trunk (0: in it)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; 0, or 2 after one line `im2vec: error: …`; --debug shows the traceback instead."""
    return run_cli(_run, argv, exit=False)


def _run(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if bool(args.checkpoint) == bool(args.trunk):
        raise BadValue("features: give a checkpoint or --trunk NAME (one of them)",
                       "see python -m im2vec.train.features --help")
    if args.weights and not args.trunk:
        raise BadValue("features: --weights goes with --trunk (a checkpoint has its own)", "drop --weights")
    if args.num_workers < 0:
        raise BadValue(f"features: --num-workers {args.num_workers}", "use 0 or more")
    # torch's threads planned as training plans them: one core per loader worker (here two torch threads beside
    # a decoding worker on 2 cores ran resnet18 at half the speed of one)
    threads.apply(threads.plan(args.num_workers, 1, args.device.startswith("cuda"), False))
    trunk, name, width, trained_at = load_trunk(args.checkpoint, args.trunk, args.weights, args.seed)
    size = args.image_size or trained_at
    if not size:
        raise BadValue("features: no image size", "give --image-size S (the side the trunk should see)")
    shards = expand_shards(args.shards)
    if not shards:
        raise NotFound(f"features: no shards match {args.shards!r}", "check SHARDS")
    source = {"checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
              "weights": args.weights, "seed": None if (args.checkpoint or args.weights) else args.seed}
    m = extract(trunk, name, width, shards, args.out, size, args.batch_size, args.device, args.num_workers, source)
    why = ", ".join(f"{r}: {k}" for r, k in m["skipped"].items() if k)
    print(f"im2vec.train.features: {m['samples']:,} samples of {len(shards)} shard(s) -> {args.out} ({name}, {width} "
          f"features at {size} px, fp16; {m['images_per_s']:,.0f} images/s); {sum(m['skipped'].values())} skipped"
          + (f" ({why})" if why else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
