"""An ingest's input side (im2vec.data.ingest): its ``Settings`` (everything that decides which sample lands in
which shard: a resumed run must match them) and the two sources, YFCC metadata lines and a collection's
manifest, read as items (key, image path, metadata, split key), or skips with their reason."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from im2vec.data.images import MAX_PIXELS
from im2vec.data.yfcc import (
    DEFAULT_TEMPLATE,
    Skip,
    image_path,
    normalize_tags,
    parse_line,
    read_lines,
)
from im2vec.errors import BadValue

SPLITS = ("train", "val", "test")
SPLIT_BY = ("id", "user", "manifest")


@dataclass
class Settings:
    """Everything that decides which sample lands in which shard: a resumed run must match it."""

    source: str = "yfcc"  # yfcc | collection
    inputs: list[str] = field(default_factory=list)
    root: str = ""  # the image mirror (yfcc) or the collection's folder: resumed runs must read the same
    shard_size: int = 5000
    split_by: str = "id"  # id | user (one uploader's photos never straddle splits) | manifest (its "split" field)
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    salt: str = "im2vec"
    machine_tags: bool = False
    template: str = DEFAULT_TEMPLATE
    max_side: int | None = None  # shrink images whose longest side is longer (re-encoded as JPEG)
    max_pixels: int = MAX_PIXELS
    quality: int = 90
    # samples are written in a random order, seeded, within windows of this many samples of a split (0: the
    # input's order): a manifest sorted by folder or uploader would otherwise give shards of one slice each
    shuffle_window: int = 200_000
    shuffle_seed: int = 0

    def __post_init__(self):
        if self.split_by not in SPLIT_BY:
            raise BadValue(f"ingest: split_by must be one of {', '.join(SPLIT_BY)}, not {self.split_by!r}",
                           "use --split-by id, user or (collections) manifest")
        if self.split_by == "manifest" and self.source != "collection":
            raise BadValue("ingest: split_by 'manifest' needs a collection manifest", "use it with `ingest collection`, whose manifest has a 'split' field")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise BadValue("ingest: val_fraction and test_fraction must be ≥ 0 and sum to less than 1", "change --val-fraction / --test-fraction")
        if self.shard_size < 1:
            raise BadValue("ingest: shard_size must be ≥ 1", "change --shard-size")
        if self.shuffle_window < 0:
            raise BadValue("ingest: shuffle_window must be ≥ 0", "change --shuffle-window (0: keep the input's order)")



# ---------------------------------------------------------------- sources: lines -> samples or skips
Item = tuple[str, str, dict, str] | Skip  # (key, image path, metadata, split key) or why not


def yfcc_samples(s: Settings, progress=None) -> Iterator[Item]:
    """The metadata's photos, each with its image's place in the mirror ``s.root``."""
    for line in read_lines(s.inputs, progress):
        if isinstance(line, Skip):
            yield line
            continue
        try:
            rec = parse_line(line, s.machine_tags)
            path = image_path(rec, s.root, s.template)
        except Skip as e:
            yield e
            continue
        meta = {"tags": rec["tags"], "id": rec["id"], "user": rec["user"], "title": rec["title"]}
        yield rec["id"], str(path), meta, rec[s.split_by]


def collection_samples(s: Settings, progress=None) -> Iterator[Item]:
    """A manifest beside a folder of images: JSONL {"image": path, "tags": [...], ...} or TSV
    path<TAB>tag1,tag2. Paths are relative to ``s.root`` (default: the manifest's folder); a path
    that leads outside it is refused (outside_root)."""
    (manifest,) = s.inputs
    base = Path(s.root or Path(manifest).parent).resolve()
    suffixes = [x.lower() for x in Path(manifest).suffixes if x.lower() != ".bz2"]  # read_lines decompresses .bz2
    jsonl = bool(suffixes) and suffixes[-1] in (".jsonl", ".json", ".ndjson")
    seen: set[str] = set()
    for n, line in enumerate(read_lines([manifest], progress), 1):
        if isinstance(line, Skip):
            yield line
            continue
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield Skip("bad_utf8", f"{manifest}:{n}")
            continue
        if not text.strip() or (not jsonl and text.startswith("#")):
            continue  # blank lines and TSV comments are not samples
        try:
            if jsonl:
                row = json.loads(text)
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    raise ValueError("expected an object with an 'image' path")
                tags = row.get("tags") or []
                tags = tags.split(",") if isinstance(tags, str) else tags
                if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                    raise ValueError("'tags' must be a list of strings")
                extra = {k: v for k, v in row.items() if k not in ("image", "tags")}
            else:
                cols = text.split("\t")
                if len(cols) != 2:
                    raise ValueError(f"{len(cols)} columns, expected path<TAB>tags")
                row, tags, extra = {"image": cols[0]}, cols[1].split(","), {}
            if "\0" in row["image"]:
                raise ValueError("a NUL character in the image path")
            json.dumps([row, tags], ensure_ascii=False).encode("utf-8")  # lone surrogates ("\udcff") fail here
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeEncodeError; nested past the parser's depth
            yield Skip("bad_line", f"{manifest}:{n}: {type(e).__name__}: {str(e)[:200]}")
            continue
        path = (base / row["image"]).resolve()
        if not path.is_relative_to(base):
            yield Skip("outside_root", f"{manifest}:{n}: {row['image']} is outside {base}")
            continue
        tags = normalize_tags(tags)
        if not tags:
            yield Skip("no_tags", f"{manifest}:{n}")
            continue
        rel = path.relative_to(base).as_posix()
        if rel in seen:
            yield Skip("duplicate", f"{manifest}:{n}: {rel}")
            continue
        seen.add(rel)
        meta = {"id": rel, **extra, "tags": tags}
        user = meta.get("user")
        if s.split_by == "user" and (user is None or user == ""):
            yield Skip("no_user", f"{manifest}:{n}: --split-by user needs a 'user' field")
            continue
        if s.split_by == "manifest" and meta.get("split") not in SPLITS:
            yield Skip("no_split", f"{manifest}:{n}: --split-by manifest needs a 'split' field, one of {SPLITS}")
            continue
        key = hashlib.sha1(rel.encode()).hexdigest()[:20]  # no dots in keys (webdataset splits on them)
        split_key = {"user": user, "manifest": meta.get("split")}.get(s.split_by, meta["id"])
        yield key, str(path), meta, str(split_key)

