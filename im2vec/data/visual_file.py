"""The file ``python -m im2vec.visualness`` writes (im2vec/use/visualness.py): ``#`` header lines, the column names,
one line per tag with ``visual`` 1, 0 or NA (not tested). Read here, below every stage that reads it: training
(``data.visual_tags``), evaluation and the Tagger."""

from __future__ import annotations

from pathlib import Path

from im2vec.errors import BadValue, NotFound

COLUMNS = ("tag", "visual", "ap_model", "ap_prior", "lift", "lower", "n_heldout", "n_train")
USES = ("only", "negatives")  # data.visual_use


def read_tsv(path: str | Path) -> list[dict]:
    """The rows of a file written by write_tsv, as dicts of strings (header lines skipped)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    cols = lines[0].split("\t")
    return [dict(zip(cols, ln.split("\t"))) for ln in lines[1:]]


def nonvisual_tags(path: str | Path, what: str = "visual tags") -> list[str]:
    """The tags a file of ``python -m im2vec.visualness`` marks non-visual (visual = 0), in its order. Refused with
    one line (``what`` names the setting) when the file is missing or not such a file."""
    fix = "write it with python -m im2vec.visualness CKPT 'val-*.tar' --out visual_tags.tsv"
    if not Path(path).expanduser().is_file():
        raise NotFound(f"{what}: no file {path}", fix)
    try:
        rows = read_tsv(Path(path).expanduser())
    except (UnicodeDecodeError, IndexError):  # binary, or no line but comments
        rows = None
    if not rows or not {"tag", "visual"} <= rows[0].keys():
        raise BadValue(f"{what}: {path} is not a tag visualness file (no tag/visual columns)", fix)
    bad = [r for r in rows if r.get("visual") not in ("0", "1", "NA")]
    if bad:
        raise BadValue(f"{what}: {path}: {len(bad)} line(s) whose visual is not 1, 0 or NA (the first: tag "
                       f"{str(bad[0].get('tag'))[:40]!r}, visual {str(bad[0].get('visual'))[:20]!r})", fix)
    return [r["tag"] for r in rows if r["visual"] == "0"]


def read_nonvisual(path: str | None, use: str = "only") -> list[str]:
    """data.visual_tags (a file of python -m im2vec.visualness, best made from validation images) and
    data.visual_use: the tags it marks 0; untested (NA) and visual (1) tags are kept."""
    if use not in USES:
        raise BadValue(f"data.visual_use={use!r}", "use only (non-visual tags out of the vocabulary) or negatives "
                       "(in it, never an image's positive)")
    return nonvisual_tags(path, "data.visual_tags") if path else []
