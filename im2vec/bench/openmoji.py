"""A collection of one style by many hands: OpenMoji, drawn by ~120 authors to one set of guidelines.

    python -m im2vec.bench.openmoji --out data/openmoji      # ~15 s; a 4 MB npm tarball in OUT/npm

The ``openmoji`` npm package (17.0.0) holds every emoji as a colour SVG (``color/svg/HEXCODE.svg``)
and a table of them (``data/openmoji.csv``) that names each one's author and two sets of tags: the
CLDR keywords of Unicode's emoji (``tags``) and the author's own (``openmoji_tags``; the only ones
on OpenMoji's 542 extra drawings: brands, animals, Braille, …). Each drawing is one record,
``{"image": "HEXCODE.jpg", "tags": CLDR keywords + the author's tags + group + subgroup,
"user": author, "title": annotation, "category": group}``, rendered with cairosvg to ``--side`` px
(128) on white. Here the uploaders differ and the style does not: the reverse of ``emoji``.

Left out, counted by reason, of the 4,495 rows: the 2,030 skin-tone variants (``skin_tone_variant``:
recolourings of a base drawing, which the random split would put on both sides of the train/test
line), the 120 extras without a keyword of either kind (``no_tags``), rows without an author
(``no_user``) or an SVG (``no_svg``; none in 17.0.0), and SVGs cairosvg cannot render (``bad_svg``:
one, a regional flag).

That leaves 2,344 drawings by 120 authors, as skewed as uploaders are: one drew 204, the next 116,
then 78, 67, 60; the median author drew 8 and 37 drew one. The ``users`` split holds authors out by
a hash of the name, test 35 % and val 25 %, except the 9 with more than ``--heavy`` (50) drawings,
who always train: train 1,392 drawings by 55 authors, val 449 by 30, test 503 by 35, no author
holding more than 11 % of a held-out split (Lisa Thiel and Jonas Roßner, 49 each, in val). With
``--heavy 40`` val and test shrink to ~260 drawings each; with 60 or 70 training falls to ~1,200
of the 2,344; with val and test at 20 % each test gets 20 authors and 155 drawings, one of them
holding 23 %. The ``random`` split: ``collections.random_split``. Layout:
``im2vec.bench.collections``; what was built and left out: ``OUT/openmoji.json``.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from im2vec.bench import collections, npm
from im2vec.data.images import to_rgb
from im2vec.errors import ArgumentParser, NotFound, run_cli

PACKAGE, VERSION = "openmoji", "17.0.0"
KEEP = ("package/data/openmoji.csv", "package/color/svg/")  # what is unpacked from the tarball
VAL, TEST = 0.25, 0.35  # the users split's held-out shares of the (light) authors


def _list(text: str) -> list[str]:
    """A comma-separated cell as a list, blanks dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def read_records(source: Path) -> tuple[list[dict], Counter]:
    """One record per base drawing with an author, keywords and an SVG; what was left out, by reason."""
    skipped, records = Counter(), []
    with open(source / "data" / "openmoji.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            keywords = _list(row.get("tags") or "") + _list(row.get("openmoji_tags") or "")
            user, hexcode = (row.get("openmoji_author") or "").strip(), (row.get("hexcode") or "").strip()
            svg = source / "color" / "svg" / f"{hexcode}.svg"
            why = ("skin_tone_variant" if (row.get("skintone") or "").strip() else "no_user" if not user
                   else "no_tags" if not keywords else "no_svg" if not hexcode or not svg.is_file() else None)
            if why:
                skipped[why] += 1
                continue
            group = (row.get("group") or "").strip()
            records.append({"image": f"{hexcode}.jpg", "svg": str(svg),
                            "tags": keywords + ([group] if group else []) + _list(row.get("subgroups") or ""),
                            "user": user, "title": (row.get("annotation") or "").strip(), "category": group})
    return records, skipped


def splits_of(records: list[dict], heavy: int = 50, val: float = VAL, test: float = TEST) -> dict[str, dict]:
    """image -> split, for each split kind: authors held out (the heavy ones always train), or images."""
    by_user = collections.users_split(records, val, test, salt="openmoji", heavy=heavy)
    return {"users": {r["image"]: by_user[r["user"]] for r in records},
            "random": {r["image"]: collections.random_split(r["image"], "openmoji") for r in records}}


def render(svg: str, out: str, side: int) -> None:
    """The drawing on white, side px wide (a tall one padded to a square, then shrunk to side), as JPEG."""
    import cairosvg

    png = cairosvg.svg2png(bytestring=Path(svg).read_bytes(), output_width=side)
    collections.save_square(to_rgb(Image.open(io.BytesIO(png))), out, side)  # transparent background -> white


def _need_cairosvg() -> None:
    try:
        importlib.import_module("cairosvg")  # only whether it loads: it needs the system's libcairo too
    except (ImportError, OSError) as e:
        raise NotFound(f"openmoji: cairosvg cannot be loaded ({e})",
                       "pip install 'im2vec[bench]' (and the system's libcairo2)") from None


def package(source: Path) -> Path:
    """The unpacked package's own folder: ``source`` itself, its ``package/``, or ``openmoji[-VERSION]/package``
    in it (the layouts of a tarball unpacked by hand and of ``npm.fetch``)."""
    for folder in (source, source / "package", source / PACKAGE / "package", source / f"{PACKAGE}-{VERSION}" / "package"):
        if (folder / "data" / "openmoji.csv").is_file() and (folder / "color" / "svg").is_dir():
            return folder
    raise NotFound(f"openmoji: {source} has no data/openmoji.csv and color/svg/",
                   f"pass --source with the unpacked npm package {PACKAGE}@{VERSION}")


def build(out: Path, source: Path | None = None, side: int = 128, min_count: int = 2, heavy: int = 50,
          workers: int = 0) -> dict:
    out = Path(out)
    _need_cairosvg()
    source = package(Path(source)) if source else npm.fetch(PACKAGE, VERSION, out / "npm", KEEP)
    records, skipped = read_records(source)
    failed = collections.draw_images(out, [(r["svg"], r["image"]) for r in records], render, side, workers)
    skipped["bad_svg"] += len(failed)
    records = [{k: v for k, v in r.items() if k != "svg"} for r in records if r["svg"] not in failed]
    info = collections.write(out, records, splits_of(records, heavy), min_count=min_count)
    info.update({"source": str(source), "left_out": {k: n for k, n in skipped.items() if n}, "side": side,
                 "min_count": min_count, "heavy": heavy, "val": VAL, "test": TEST})
    (out / "openmoji.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.openmoji", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/openmoji", help="output folder (default: data/openmoji)")
    ap.add_argument("--source", default=None, help="the unpacked npm package (package/ itself, or a folder with "
                    "openmoji/package in it); default: fetched once with npm pack into OUT/npm")
    ap.add_argument("--side", type=int, default=128, help="side of the stored images (px)")
    ap.add_argument("--min-count", type=int, default=2, help="vocabulary: tags on at least this many training drawings")
    ap.add_argument("--heavy", type=int, default=50, help="authors with more drawings always train")
    ap.add_argument("--workers", type=int, default=0, help="rendering processes (0: every core)")
    a = ap.parse_args(argv)
    info = build(Path(a.out), Path(a.source) if a.source else None, a.side, a.min_count, a.heavy, a.workers)
    print(collections.describe(f"openmoji: {info['images']:,} drawings in {a.out}", info)
          + f"\nleft out: {info['left_out'] or 'none'}", file=sys.stderr)
    return info


if __name__ == "__main__":
    run_cli(main)
