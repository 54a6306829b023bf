"""The worker side of an ingest (im2vec.data.ingest): an image file made storable (checked whole, upright,
optionally shrunk) or skipped with its reason, and one shard written through a temporary name, then its
``.stats.json``, whose presence marks the shard finished (a resumed ingest skips it)."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageOps

from im2vec.data.images import MAX_PIXELS, TooLarge, open_image, to_rgb
from im2vec.data.yfcc import Skip

KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others: JPEG
SHARD_MTIME = 1_000_000_000  # every tar member's time: the same input gives the same shard bytes on every run


def prepare_image(path: str | Path, max_pixels: int = MAX_PIXELS, max_side: int | None = None,
                  quality: int = 90) -> tuple[str, bytes]:
    """(extension, bytes) to store, or Skip(missing_image | unreadable_image | corrupt_image | too_large).

    JPEG/PNG/WebP bytes are stored unchanged after one decode at 1/8 scale proves them whole (a
    truncated JPEG fails here, not in training). An image is decoded and re-encoded as JPEG when it
    is in another format, carries an EXIF rotation (applied here: shards hold upright pixels) or is
    longer than ``max_side``."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise Skip("missing_image", str(path)) from None
    except OSError as e:
        raise Skip("unreadable_image", f"{path}: {e}") from None
    try:
        img = open_image(data, max_pixels)
        shrink = bool(max_side) and max(img.size) > max_side
        if img.format in KEPT_FORMATS and _orientation(img) == 1 and not shrink:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # all the data, 1/8 the work
            img.load()
            return KEPT_FORMATS[img.format], data
        if shrink:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at the smallest scale still ≥ max_side
        img = to_rgb(ImageOps.exif_transpose(img))
        if shrink:
            img.thumbnail((max_side, max_side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return "jpg", buf.getvalue()
    except TooLarge as e:
        raise Skip("too_large", f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises many kinds on bad bytes; none may stop an ingest
        raise Skip("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))  # EXIF Orientation: 1 is upright
    except Exception:  # noqa: BLE001 -- unreadable EXIF: the pixels are still good, take them as they are
        return 1


def shard_name(out: Path, split: str, index: int) -> Path:
    return out / split / f"shard-{index:06d}.tar"


def stats_name(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".tar")] + ".stats.json")


def write_shard(out: str, split: str, index: int, samples: list[tuple[str, str, dict]], max_pixels: int,
                max_side: int | None, quality: int) -> dict:
    """Write one shard of (key, image path, metadata) samples; returns and stores its stats."""
    shard = shard_name(Path(out), split, index)
    tmp = shard.with_name(f"{shard.name}.tmp{os.getpid()}")  # a writer orphaned by a killed run never shares it
    written, skipped, examples, users = 0, Counter(), {}, Counter()
    with wds.TarWriter(str(tmp), mtime=SHARD_MTIME) as sink:
        for key, path, meta in samples:
            try:
                ext, data = prepare_image(path, max_pixels, max_side, quality)
            except Skip as e:
                skipped[e.reason] += 1
                examples.setdefault(e.reason, str(e))
                continue
            sink.write({"__key__": key, ext: data, "json": _json_bytes(meta)})
            written += 1
            if meta.get("user") not in (None, ""):
                users[str(meta["user"])] += 1
    if written:
        _fsync(tmp)
        os.replace(tmp, shard)  # only whole shards carry the final name
    else:
        tmp.unlink()  # every image skipped: a stats file only (an empty tar would be drawn in training)
    # samples per uploader: the loader's uploader balance (data.user_temperature) reads these (im2vec.data.loader.user_counts)
    stats = {"split": split, "index": index, "written": written, "skipped": dict(skipped), "examples": examples,
             "users": dict(users)}
    write_json(stats_name(shard), stats)  # written last: its presence marks the shard finished
    return stats


def _json_bytes(obj, **kwargs) -> bytes:
    """UTF-8 JSON; text that is not UTF-8 (a file name read with surrogate escapes) as \\u escapes."""
    try:
        return json.dumps(obj, ensure_ascii=False, **kwargs).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kwargs).encode("ascii")


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(_json_bytes(obj, indent=1, sort_keys=True))
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """On disk before it is renamed: after a power cut a finished-looking shard is a whole one."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())

