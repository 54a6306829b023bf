"""The real-data development set: Open Clip Art Library drawings with the tags their uploaders wrote.

    python -m im2vec.bench.openclipart --out data/openclipart      # ~2 min; ~160 MB of .deb files

Debian packages the Open Clip Art Library 0.18 (2008) as ``openclipart-svg`` and ``openclipart-png``:
8,121 drawings by 528 uploaders, each SVG carrying its uploader (``dc:creator``) and the keywords
the uploader typed (``dc:subject``). Those keywords are tags as Flickr's are: written by people,
uneven and noisy (``unsorted``, ``hash``, ``magick``, ``lemon_theme_icon``, the uploader's own name
beside ``apple``, ``flag`` or ``saturn``). Nothing is downloaded at run time: the builder takes the
two packages from Debian's archive once (``apt-get download``), or from an installed
``/usr/share/openclipart``, or from ``--source``.

What it writes under ``--out`` (``im2vec.bench.collections``: the same layout for every real collection):
- ``images/…/NAME.jpg``: each PNG laid on white (the drawings have transparent backgrounds),
  padded to a square and shrunk to ``--side`` px (256);
- ``users.jsonl``, ``random.jsonl``: {"image", "tags", "user", "title", "category", "split"};
- ``users/`` and ``random/``, each with ``train/ val/ test/`` shards written by ``im2vec.data.ingest``
  (``--split-by manifest``) and a ``vocab.tsv`` of the training split's tags seen at least
  ``--min-count`` (2) times.

The ``users`` split holds uploaders out, so validation and test uploaders are never seen in
training: an uploader is put in test (35 %) or val (25 %) by a hash of the name, except the 11 with
more than ``--heavy`` (100) drawings, who always train (one of them alone drew 1,375 stars; in a
held-out split a few of them would be most of it, and the figures would say more about them than
about new uploaders). No uploader then holds more than 13 % of a held-out split. The ``random`` split
holds 10 % (val) and 20 % (test) of the drawings out at random, every uploader in every split.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from im2vec.bench import collections
from im2vec.data.images import to_rgb
from im2vec.errors import ArgumentParser, NotFound, UserError, run_cli

PACKAGES = ("openclipart-svg", "openclipart-png")
INSTALLED = Path("/usr/share/openclipart")
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_ITEM = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_CREATOR = re.compile(r"<dc:creator>(.*?)</dc:creator>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)  # a publisher's, creator's or rights holder's name


def svg_metadata(text: str) -> dict:
    """Uploader, keywords and title from an SVG's RDF metadata block (regular expressions, not an
    XML parser: several files of 2008 are not well-formed XML, their metadata blocks are)."""
    meta = text.split("</metadata>", 1)[0] if "</metadata>" in text else text
    subject = _SUBJECT.search(meta)
    tags = [html.unescape(t).strip() for t in _ITEM.findall(subject.group(1))] if subject else []
    creator = _CREATOR.search(meta)
    name = _TITLE.search(creator.group(1)) if creator else None  # the creator's own agent, nothing after it
    title = _TITLE.search(_AGENT.sub("", meta))  # the work's title, not an agent's
    return {"tags": [t for t in tags if t], "user": html.unescape(name.group(1)).strip() if name else "",
            "title": html.unescape(title.group(1)).strip() if title else ""}


def fetch_packages(work: Path) -> Path:
    """The two packages from Debian's archive, unpacked under ``work``; returns their openclipart folder."""
    root = work / "root"
    if (root / "usr/share/openclipart/png").is_dir() and (root / "usr/share/openclipart/svg").is_dir():
        return root / "usr/share/openclipart"
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise NotFound(f"openclipart: {tool} not found", f"install the Debian packages {' and '.join(PACKAGES)} "
                           "elsewhere and pass --source /usr/share/openclipart")
    work.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        if not list(work.glob(f"{pkg}_*.deb")):
            done = subprocess.run(["apt-get", "download", pkg], cwd=work, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"openclipart: 'apt-get download {pkg}' failed ({done.stderr.strip()[-300:]})",
                                "run 'apt-get update' first, or pass --source with an unpacked copy")
    for deb in sorted(work.glob("openclipart-*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / "usr/share/openclipart"


def read_records(source: Path) -> tuple[list[dict], Counter]:
    """One record per drawing with a PNG, tags and an uploader; what was left out, counted by reason."""
    skipped, records = Counter(), []
    for svg in sorted((source / "svg").rglob("*.svg")):
        rel = svg.relative_to(source / "svg").with_suffix("")
        png = source / "png" / rel.with_suffix(".png")
        if not png.is_file():
            skipped["no_png"] += 1
            continue
        meta = svg_metadata(svg.read_bytes().decode("utf-8", "replace"))
        if not meta["tags"] or not meta["user"]:
            skipped["no_tags" if not meta["tags"] else "no_user"] += 1
            continue
        records.append({"image": rel.with_suffix(".jpg").as_posix(), "png": str(png), **meta,
                        "category": rel.parent.as_posix()})
    return records, skipped


def splits_of(records: list[dict], heavy: int = 100, val: float = 0.25, test: float = 0.35) -> dict[str, dict]:
    """image -> split, for each split kind: uploaders held out (the heavy ones always train), or images."""
    by_user = collections.users_split(records, val, test, salt="openclipart", heavy=heavy)
    return {"users": {r["image"]: by_user[r["user"]] for r in records},
            "random": {r["image"]: collections.random_split(r["image"], "openclipart") for r in records}}


def square_on_white(png: str, out: str, side: int) -> None:
    """The drawing on white, padded to a square (nothing cropped away), at most side×side, as JPEG."""
    collections.save_square(to_rgb(Image.open(png)), out, side)


def build(out: Path, source: Path | None = None, side: int = 256, min_count: int = 2, heavy: int = 100,
          workers: int = 0) -> dict:
    out = Path(out)
    source = Path(source) if source else INSTALLED if (INSTALLED / "png").is_dir() else fetch_packages(out / "debs")
    if not (source / "svg").is_dir() or not (source / "png").is_dir():
        raise NotFound(f"openclipart: {source} has no svg/ and png/ folders",
                       "pass --source with an unpacked openclipart-svg and openclipart-png")
    records, skipped = read_records(source)
    failed = collections.draw_images(out, [(r["png"], r["image"]) for r in records], square_on_white, side, workers)
    skipped["bad_png"] += len(failed)
    records = [{k: v for k, v in r.items() if k != "png"} for r in records if r["png"] not in failed]
    info = collections.write(out, records, splits_of(records, heavy), min_count=min_count)
    info.update({"source": str(source), "left_out": dict(skipped), "side": side, "min_count": min_count,
                 "heavy": heavy})
    (out / "openclipart.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.openclipart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/openclipart", help="output folder (default: data/openclipart)")
    ap.add_argument("--source", default=None, help="an unpacked /usr/share/openclipart (svg/ and png/); "
                    "default: the installed one, else the .deb files from Debian's archive")
    ap.add_argument("--side", type=int, default=256, help="longest side of the stored images (px)")
    ap.add_argument("--min-count", type=int, default=2, help="vocabulary: tags on at least this many training drawings")
    ap.add_argument("--heavy", type=int, default=100, help="uploaders with more drawings always train")
    ap.add_argument("--workers", type=int, default=0, help="image conversion processes (0: every core)")
    a = ap.parse_args(argv)
    info = build(Path(a.out), Path(a.source) if a.source else None, a.side, a.min_count, a.heavy, a.workers)
    print(collections.describe(f"openclipart: {info['images']:,} drawings in {a.out}", info)
          + f"\nleft out: {info['left_out'] or 'none'}", file=sys.stderr)
    return info


if __name__ == "__main__":
    run_cli(main)
