"""YFCC100M metadata: one line -> one photo record, or a reason why the line is skipped.

The ``yfcc100m_dataset`` file has 25 tab-separated columns; the ten original ``yfcc100m_dataset-N``
parts have 23 (no line number, no photo hash). Free text is URL-encoded ('+' is a space, %XX
escapes); user tags are comma-separated. Files may be plain or .bz2.
"""

from __future__ import annotations

import bz2
import re
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote_to_bytes

from im2vec.errors import BadValue, NotFound
from im2vec.tags import normalize_tag, normalize_tags  # noqa: F401  (this module's normalization)

COLUMNS_25 = ("line", "id", "hash", "user", "nickname", "date_taken", "date_uploaded", "device", "title",
              "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url",
              "download_url", "license", "license_url", "server", "farm", "secret", "secret_original", "ext",
              "marker")
COLUMNS_23 = tuple(c for c in COLUMNS_25 if c not in ("line", "hash"))
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HEX = re.compile(r"[0-9A-Fa-f]{6,64}")


class Skip(Exception):
    """A sample that is not written, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def url_decode(text: str) -> str:
    """Flickr's URL encoding, strictly: '+' is a space, every '%' starts two hex digits, and the
    bytes they make are UTF-8. Anything else raises Skip('bad_escape')."""
    if _BAD_ESCAPE.search(text):
        raise Skip("bad_escape", text[:60])
    try:
        return unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("bad_escape", text[:60]) from None


def parse_line(raw: bytes | str, machine_tags: bool = False) -> dict:
    """One metadata line -> {"id", "hash", "user", "title", "tags", "ext", "server", "farm", "secret"}.

    Raises Skip with reason bad_utf8, bad_columns, bad_field, bad_escape, video or no_tags."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("bad_utf8") from None
    elif not raw.isascii():
        try:  # text with lone surrogates (bytes decoded with surrogateescape) is no UTF-8 line either
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise Skip("bad_utf8") from None
    fields = raw.rstrip("\r\n").split("\t")
    if len(fields) == len(COLUMNS_25):
        row = dict(zip(COLUMNS_25, fields))
    elif len(fields) == len(COLUMNS_23):
        row = dict(zip(COLUMNS_23, fields), hash=None)
    else:
        raise Skip("bad_columns", f"{len(fields)} columns, expected 25 or 23")
    if not (row["id"].isascii() and row["id"].isdigit()) or row["marker"] not in ("0", "1"):
        raise Skip("bad_field", f"photo id {row['id'][:20]!r}, marker {row['marker'][:5]!r}")
    if row["hash"] is not None and not _HEX.fullmatch(row["hash"]):  # it names a file: nothing but hex digits
        raise Skip("bad_field", f"photo hash {row['hash'][:40]!r}")
    if row["marker"] != "0":
        raise Skip("video")
    tags = [url_decode(t) for t in row["user_tags"].split(",") if t]
    if machine_tags:
        tags += [url_decode(t) for t in row["machine_tags"].split(",") if t]
    tags = normalize_tags(tags)
    if not tags:
        raise Skip("no_tags")
    return {"id": row["id"], "hash": row["hash"] or None, "user": url_decode(row["user"]),
            "title": url_decode(row["title"]), "tags": tags, "ext": row["ext"] or "jpg",
            "server": row["server"], "farm": row["farm"], "secret": row["secret"]}


def read_lines(paths: Iterable[str | Path], progress=None) -> Iterator[bytes | Skip]:
    """Raw lines of every file in turn; ``progress(n)`` is told how many input bytes were consumed
    (compressed bytes for .bz2, so a progress bar over the files' sizes ends at 100%). A file that
    cannot be read to its end (a truncated .bz2) yields Skip('truncated_input') and the next file
    follows: the lines before the damage are kept."""
    for path in paths:
        if not Path(path).is_file():
            raise NotFound(f"metadata file not found: {path}", "check the path")
        with open(path, "rb") as raw:
            f = bz2.open(raw, "rb") if str(path).endswith(".bz2") else raw
            last = 0
            try:
                for n, line in enumerate(f):
                    yield line
                    if progress is not None and n % 4096 == 0:
                        pos = raw.tell()
                        progress(pos - last)
                        last = pos
            except (EOFError, OSError) as e:
                yield Skip("truncated_input", f"{path}: {e}")
            if progress is not None:
                progress(raw.tell() - last)


DEFAULT_TEMPLATE = "images/{hash_a}/{hash_b}/{hash}.jpg"  # the public mirror's layout


def image_path(record: dict, root: str | Path, template: str = DEFAULT_TEMPLATE) -> Path:
    """Where the photo lies in a local mirror. Template fields: every record field ({id}, {hash},
    {user}, {ext}, {server}, {farm}, {secret}) plus {hash_a} and {hash_b}, the hash's first and
    second three characters. A field that would lead out of its folder raises Skip('bad_field')."""
    h = record.get("hash") or ""
    fields = {**record, "hash_a": h[:3], "hash_b": h[3:6]}
    if not h and ("{hash" in template):
        raise BadValue("yfcc: this file has no photo hash column (the 23-column parts)",
                       "pass a --template without {hash}, e.g. '{id}.jpg'")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise _bad_template(template, e) from None
    for _, name, _, _ in parsed:
        value = str(fields.get(name, "")) if name else ""
        if "/" in value or "\\" in value or "\0" in value or value in (".", ".."):
            raise Skip("bad_field", f"{name} {value[:40]!r} in an image path")
    try:
        rel = template.format(**fields)
    except (ValueError, LookupError, AttributeError, TypeError) as e:  # {nope}, {0}, {id.x}, {id!z}, {id:d}
        raise _bad_template(template, e) from None
    if rel.startswith("/") and not template.startswith("/"):  # '{farm}/…' with an empty farm: an absolute path
        raise Skip("bad_field", f"an empty field starts the image path {rel[:60]!r}")
    return Path(root) / rel


def _bad_template(template: str, e: Exception) -> BadValue:
    return BadValue(f"yfcc: the image path template {template!r} cannot be filled ({type(e).__name__}: {e})",
                    "use the record's fields in braces: {id} {hash} {hash_a} {hash_b} {user} {ext} {server} {farm} {secret}")
