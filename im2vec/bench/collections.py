"""Real tagged collections for the quality benchmark, each written for both kinds of split.

A builder (``openclipart``, ``emoji``, ``openmoji``) reads a collection into records
``{"image": path under OUT/images, "tags": [...], "user": ..., ...}``; ``write`` then lays it out
twice, once per split kind, so that every setting is measured on both:

- ``users``: uploaders held out: validation and test uploaders are never seen in training (how a
  model meets new photographers); each builder says how it assigns its uploaders;
- ``random``: images held out at random (``RANDOM_VAL`` and ``RANDOM_TEST`` of them, by a hash of
  the image path): the same uploaders in every split (how a model tags more of one collection).

    OUT/images/…                  the pictures, JPEG
    OUT/<kind>.jsonl              the manifest of that kind (each line's "split" set)
    OUT/<kind>/{train,val,test}/  shards written by im2vec.data.ingest --split-by manifest
    OUT/<kind>/vocab.tsv          tags on at least ``min_count`` training images of that kind
    OUT/collection.json           what was written, per kind and split (images, uploaders, tags)

``+experiment=<name> data.split_kind=<kind>`` trains on one of them.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from im2vec.data.ingest import run, split_of
from im2vec.data.ingest_sources import SPLITS, Settings, collection_samples
from im2vec.data.vocab import count_from_shards, from_counts

KINDS = ("users", "random")
RANDOM_VAL, RANDOM_TEST = 0.1, 0.2  # the random split's held-out shares of the images


def random_split(image: str, salt: str) -> str:
    """train, val or test for one image of the random split, by a hash of its path."""
    return split_of(image, RANDOM_VAL, RANDOM_TEST, salt=f"{salt}/random")


def users_split(records: list[dict], val: float, test: float, salt: str, heavy: int | None = None) -> dict[str, str]:
    """uploader -> split for the users split: by a hash of the uploader's name, except that uploaders with
    more than ``heavy`` images always train (in a held-out split a few of them would be most of it, and
    its figures would say more about them than about new uploaders)."""
    n = Counter(r["user"] for r in records)
    return {u: "train" if heavy is not None and c > heavy else split_of(u, val, test, salt=salt) for u, c in n.items()}


def _drop(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def drop_shards(out: Path) -> None:
    """Every kind's shards and manifest: shards of other images, which a resumed ingest would keep."""
    for kind in KINDS:
        _drop(out / kind)
        (out / f"{kind}.jsonl").unlink(missing_ok=True)


def save_square(img: Image.Image, out: str, side: int) -> None:
    """An RGB picture padded with white to a square (nothing cropped away), at most side×side, as JPEG."""
    edge = max(img.size)
    canvas = Image.new("RGB", (edge, edge), "white")
    canvas.paste(img, ((edge - img.width) // 2, (edge - img.height) // 2))
    if edge > side:
        canvas = canvas.resize((side, side), Image.LANCZOS)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, "JPEG", quality=90)


def _draw(job: tuple[Callable, str, str, int]) -> tuple[str, str | None]:
    """(source, None) or (source, why it could not be drawn)."""
    draw, src, out, side = job
    try:
        draw(src, out, side)
        return src, None
    except Exception as e:  # noqa: BLE001 -- a bad picture is left out and counted, never fatal
        Path(out).unlink(missing_ok=True)  # a half-written JPEG would be taken as done next time
        return src, f"{type(e).__name__}: {e}"


def draw_images(out: Path, sources: list[tuple[str, str]], draw: Callable[[str, str, int], None], side: int,
                workers: int = 0) -> dict[str, str]:
    """Each (source, image path under OUT/images) drawn by ``draw(source, jpeg, side)`` in a process pool, once: a
    rerun draws only what is missing; another ``side`` than the last run's redraws them all (and drops the
    shards made of the old ones). Returns source -> why, for those that could not be drawn."""
    marker = out / "images.side"
    if (out / "images").is_dir() and (not marker.is_file() or marker.read_text().strip() != str(side)):
        _drop(out / "images")
        drop_shards(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{side}\n")
    jobs = [(draw, src, str(out / "images" / image), side) for src, image in sources
            if not (out / "images" / image).is_file()]
    with cf.ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return {src: why for src, why in pool.map(_draw, jobs, chunksize=32) if why}


def write(out: Path, records: list[dict], splits: dict[str, dict[str, str]], min_count: int = 2,
          shard_size: int = 2000) -> dict:
    """Manifests, shards and a vocabulary per split kind; ``splits[kind][image]`` is the image's split.

    A kind whose manifest is unchanged keeps its shards (the ingest resumes, or finds them finished);
    a changed manifest, or shards written with other ingest settings, are written again."""
    out = Path(out)
    info = {"images": len(records), "uploaders": len({r["user"] for r in records}), "kinds": {}}
    for kind in KINDS:
        lines = "".join(json.dumps({**r, "split": splits[kind][r["image"]]}, ensure_ascii=False) + "\n"
                        for r in records)
        manifest, folder = out / f"{kind}.jsonl", out / kind
        s = Settings(source="collection", inputs=[str(manifest.resolve())], root=str((out / "images").resolve()),
                     split_by="manifest", shard_size=shard_size)
        if not manifest.is_file() or manifest.read_text(encoding="utf-8") != lines or _other_settings(folder, s):
            _drop(folder)
            manifest.write_text(lines, encoding="utf-8")
        summary = run(s, collection_samples(s), folder, workers=0, verbose=False)
        counts, _ = count_from_shards(sorted(str(p) for p in (folder / "train").glob("shard-*.tar")))
        vocab = from_counts(counts, min_count=min_count)
        vocab.save(folder / "vocab.tsv")
        users = {sp: len({r["user"] for r in records if splits[kind][r["image"]] == sp}) for sp in SPLITS}
        info["kinds"][kind] = {"images": summary["written"], "uploaders": users, "tags": len(vocab),
                               "skipped": summary["skipped"]}
    (out / "collection.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
    return info


def _other_settings(folder: Path, s: Settings) -> bool:
    """Shards in ``folder`` written with other ingest settings (an older version's order, another shard size)."""
    from dataclasses import asdict

    path = folder / "ingest.json"
    if not path.is_file():
        return False
    try:
        theirs = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return True
    return any(theirs.get(k) != v for k, v in asdict(s).items())


def describe(name: str, info: dict) -> str:
    """One line per split kind: images and uploaders per split, tags."""
    rows = []
    for kind, k in info["kinds"].items():
        rows.append(f"{name} ({kind} split): " + ", ".join(
            f"{sp} {k['images'][sp]:,} by {k['uploaders'][sp]:,} uploaders" for sp in SPLITS)
            + f"; {k['tags']:,} tags in {kind}/vocab.tsv")
    return "\n".join(rows)
