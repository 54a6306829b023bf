"""A collection of a few prolific uploaders: the same emoji drawn by Apple, Google, Twitter and Facebook.

    python -m im2vec.bench.emoji --out data/emoji      # ~25 s; 340 MB of npm tarballs, 86 MB unpacked, in OUT/npm

The ``emoji-datasource-<vendor>`` npm packages (16.0.0) hold each vendor's 64 px PNG of every emoji
it draws (1,860 to 1,911 base emoji each); ``emojibase-data`` (17.0.0) holds the English CLDR
annotations: a label and 1 to 16 keywords per emoji (``face``, ``grin``, ``smile``), and its
group and subgroup (``smileys-emotion``, ``face-smiling``). Each vendor is one uploader that drew
every concept the others drew, in its own style: the opposite of Open Clip Art's hundreds of
uploaders with a few drawings each. The ``users`` split asks whether tags learnt from two styles
carry over to a third; the ``random`` split has every vendor's drawing of most emoji in training,
so it measures little more than telling the styles' copies of a concept apart.

One record per (vendor, base emoji) the vendor has an image for (skin-tone variants are ignored):
``{"image": "<vendor>/<code>.jpg", "tags": CLDR keywords + group + subgroup, "user": vendor,
"title": CLDR label, "category": group}``. emoji-datasource's ``unified`` code is matched to
emojibase's ``hexcode`` upper-cased and without ``FE0F`` (the emoji presentation selector, which
the two spell differently: 207 of the 1,911 match only so); all 1,911 match in these versions. An emoji without an emojibase entry
or keywords is left out (``no_tags``; none in these versions), as is an unreadable PNG (``bad_png``;
none) and a drawing the vendor does not have (``no_image``: 3 of Apple's, 51 of Facebook's). That
leaves 7,590 drawings: Apple 1,908, Google 1,911, Twitter 1,911, Facebook 1,860.

A tag here is on every vendor's copy of an emoji, so ``--min-count`` (2) keeps in the ``users``
split the tags of any emoji both training vendors drew, including the 2,082 of the 3,667 keywords
that name one emoji only (``grimacing``; ``PE``, the one keyword of Peru's flag beside ``flag``):
3,665 tags in all.

The ``users`` split: ``--test-user`` (twitter) is the test uploader, ``--val-user`` (facebook) the
validation one, the other two train. The ``random`` split: ``collections.random_split``. Layout:
``im2vec.bench.collections``; what was built and left out: ``OUT/emoji.json``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from im2vec.bench import collections, npm
from im2vec.data.images import to_rgb
from im2vec.errors import ArgumentParser, BadValue, NotFound, run_cli

VENDORS = ("apple", "google", "twitter", "facebook")
DATASOURCE, EMOJIBASE = "16.0.0", "17.0.0"  # pinned: the layout and the figures above are theirs
PACKAGES = {**{f"emoji-datasource-{v}": DATASOURCE for v in VENDORS}, "emojibase-data": EMOJIBASE}


def code(hexcode: str) -> str:
    """One spelling of an emoji's code points: upper case, no FE0F (emoji-datasource writes ``263A-FE0F``
    where emojibase may write ``263A``)."""
    return "-".join(p for p in hexcode.upper().split("-") if p and p != "FE0F")


def annotations(emojibase: Path) -> dict[str, dict]:
    """code -> {"title", "tags", "category"}: emojibase's English label and keywords, with the emoji's group
    and subgroup names among its tags."""
    data = json.loads((emojibase / "en" / "data.json").read_text(encoding="utf-8"))
    meta = json.loads((emojibase / "meta" / "groups.json").read_text(encoding="utf-8"))
    groups, subgroups = meta["groups"], meta["subgroups"]
    out = {}
    for e in data:  # base emoji only: their skin tones are nested under "skins"
        group, sub = groups.get(str(e.get("group")), ""), subgroups.get(str(e.get("subgroup")), "")
        tags = [t.strip() for t in e.get("tags") or [] if t.strip()]
        # no keywords, no tags: a group name alone says too little of the picture
        out[code(e["hexcode"])] = {"title": e.get("label", ""), "category": group,
                                   "tags": tags + [t for t in (group, sub) if t] if tags else []}
    return out


def read_records(packages: dict[str, Path], vendors: tuple[str, ...] = VENDORS) -> tuple[list[dict], Counter, list[str]]:
    """One record per (vendor, base emoji) with a PNG and keywords; what was left out, by reason; the
    codes emojibase does not know."""
    notes = annotations(packages["emojibase-data"])
    records, skipped, unmatched = [], Counter(), set()
    for vendor in vendors:
        root = packages[f"emoji-datasource-{vendor}"]
        for e in json.loads((root / "emoji.json").read_text(encoding="utf-8")):
            png = root / "img" / vendor / "64" / e["image"]
            if not e.get(f"has_img_{vendor}") or not png.is_file():
                skipped["no_image"] += 1
                continue
            note = notes.get(code(e["unified"]))
            if note is None:
                unmatched.add(e["unified"])
            if note is None or not note["tags"]:
                skipped["no_tags"] += 1
                continue
            records.append({"image": f"{vendor}/{Path(e['image']).stem}.jpg", "png": str(png), "tags": note["tags"],
                            "user": vendor, "title": note["title"], "category": note["category"]})
    return records, skipped, sorted(unmatched)


def splits_of(records: list[dict], test_user: str, val_user: str) -> dict[str, dict]:
    """image -> split, for each split kind: the test and val vendors held out, or images at random."""
    def user(vendor: str) -> str:
        return "test" if vendor == test_user else "val" if vendor == val_user else "train"

    return {"users": {r["image"]: user(r["user"]) for r in records},
            "random": {r["image"]: collections.random_split(r["image"], "emoji") for r in records}}


def on_white(png: str, out: Path) -> None:
    """The emoji laid on white (its background is transparent), at its own size, as JPEG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(png) as img:
        to_rgb(img).save(out, "JPEG", quality=90)


def convert(records: list[dict], images: Path) -> set[str]:
    """Each record's JPEG not written yet (a rerun converts nothing); the PNGs that could not be read.
    64 px PNGs take about a millisecond each: no process pool."""
    failed = set()
    for r in records:
        out = images / r["image"]
        if out.is_file():
            continue
        try:
            on_white(r["png"], out)
        except Exception:  # noqa: BLE001 -- a bad PNG is left out and counted, never fatal
            out.unlink(missing_ok=True)  # a half-written JPEG would be taken as done next time
            failed.add(r["png"])
    return failed


def sources(out: Path, source: Path | None) -> dict[str, Path]:
    """package name -> its unpacked ``package`` folder: from ``source``, else fetched once into OUT/npm."""
    if source is not None:
        return {name: npm.find(source, name, version) for name, version in PACKAGES.items()}
    keep = {f"emoji-datasource-{v}": ("package/emoji.json", f"package/img/{v}/64/") for v in VENDORS}
    keep["emojibase-data"] = ("package/en/data.json", "package/meta/groups.json")
    return {name: npm.fetch(name, version, out / "npm", keep[name]) for name, version in PACKAGES.items()}


def build(out: Path, source: Path | None = None, test_user: str = "twitter", val_user: str = "facebook",
          min_count: int = 2) -> dict:
    out = Path(out)
    if test_user not in VENDORS or val_user not in VENDORS or test_user == val_user:
        raise BadValue(f"emoji: --test-user {test_user} and --val-user {val_user}",
                       f"name two different vendors of {', '.join(VENDORS)}")
    packages = sources(out, Path(source) if source else None)
    for name, folder in packages.items():
        if not (folder / ("en/data.json" if name == "emojibase-data" else "emoji.json")).is_file():
            raise NotFound(f"emoji: {folder} is not an unpacked {name}", f"pass --source with {name}@{PACKAGES[name]}")
    records, skipped, unmatched = read_records(packages)
    failed = convert(records, out / "images")
    skipped["bad_png"] += len(failed)
    records = [{k: v for k, v in r.items() if k != "png"} for r in records if r["png"] not in failed]
    info = collections.write(out, records, splits_of(records, test_user, val_user), min_count=min_count)
    info.update({"source": str(source or out / "npm"), "left_out": {k: n for k, n in skipped.items() if n},
                 "unmatched": unmatched, "per_vendor": dict(Counter(r["user"] for r in records)),
                 "test_user": test_user, "val_user": val_user, "min_count": min_count})
    (out / "emoji.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.emoji", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/emoji", help="output folder (default: data/emoji)")
    ap.add_argument("--source", default=None, help="a folder with the unpacked npm packages (NAME/package/…); "
                    "default: fetched once with npm pack into OUT/npm")
    ap.add_argument("--test-user", default="twitter", choices=VENDORS, help="the test split's vendor")
    ap.add_argument("--val-user", default="facebook", choices=VENDORS, help="the validation split's vendor")
    ap.add_argument("--min-count", type=int, default=2, help="vocabulary: tags on at least this many training images")
    a = ap.parse_args(argv)
    info = build(Path(a.out), Path(a.source) if a.source else None, a.test_user, a.val_user, a.min_count)
    print(collections.describe(f"emoji: {info['images']:,} drawings in {a.out}", info)
          + f"\nper vendor: {info['per_vendor']}\nleft out: {info['left_out'] or 'none'}"
          + f"; {len(info['unmatched'])} emoji without an emojibase entry", file=sys.stderr)
    return info


if __name__ == "__main__":
    run_cli(main)
