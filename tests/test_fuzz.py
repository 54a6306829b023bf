"""Property-based fuzzing (hypothesis) of everything that reads user input: YFCC metadata lines,
collection manifests, a sample's json in the loader, vocabulary files, the module commands' argument
parsers, and the ranking code on random small shapes and non-finite values.

Each property compares with a brute-force reference written independently of the module, or at
least checks that only the documented outcomes occur (a result, a counted skip, or a ``UserError``).

Profiles: ``ci`` (default, a few hundred examples per property) and ``slow`` (10,000 per property),
chosen by the environment variable ``IM2VEC_FUZZ``:

    IM2VEC_FUZZ=slow python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

No example database is kept (``database=None``), and Hypothesis's own folder (caches, patches of
failing examples) goes to the system's temporary folder unless HYPOTHESIS_STORAGE_DIRECTORY says
otherwise: nothing is written into the repository. The commands run in temporary folders.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import io
import json
import math
import os
import re
import string
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.control import currently_in_test_context
from PIL import Image

from im2vec.data import ingest, vocab, yfcc
from im2vec.data import samples as data
from im2vec.errors import PREFIX, BadValue, NotFound, UserError, run_cli
from im2vec.eval import ranking, scoring
from im2vec.use import predict
from im2vec.wide.sampler import PAD

# ----------------------------------------------------------------------------- profiles

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # no .hypothesis/ (caches, failure patches) in the repository
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "im2vec-hypothesis")

settings.register_profile("ci", max_examples=200, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=10_000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = "slow" if os.environ.get("IM2VEC_FUZZ", "").strip().lower() == "slow" else "ci"
settings.load_profile(PROFILE)


def examples(ci: int) -> settings:
    """``ci`` examples in the ci profile; the slow profile's 10,000 otherwise."""
    return settings(max_examples=ci if PROFILE == "ci" else 10_000)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and avoids oversubscribing a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- shared strategies

ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates included
SURROGATE_ESCAPES = st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF)  # raw bytes 0x80-0xff as text


def chars(exclude: str = "") -> st.SearchStrategy[str]:
    """Any character but ``exclude`` and lone surrogates (which exclude_characters alone lets in)."""
    return st.characters(exclude_characters=exclude, exclude_categories=("Cs",))


TRICKY = ["\0", "\r", "\x0b", "\x1c", "\x85", "\u2028", "\u00a0", "\u3000", "\ufeff", "İ", "ß", "ﬁ", "Ⅻ", "ＴＯＫＹＯ",
          "\u0301", "e\u0301", "\u00b4", "Ω", "ǅ", "😀", "#", ",", "+", " ", "%", "..", "/", "\\"]


def to_bytes(text: str) -> bytes:
    """UTF-8, lone surrogates \\udc80-\\udcff made the raw bytes they stand for (non-UTF-8 input), any
    other lone surrogate encoded as CESU-style bytes (also not UTF-8)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(ANY_CHAR, max_size=8), st.sampled_from(["sea", "sky", "dog", "cat", "SEA", " sea", "", "a.jpg"]),
)
json_keys = st.one_of(st.sampled_from(["image", "tags", "clean_tags", "user", "split", "id", "title"]),
                      st.text(ANY_CHAR, max_size=6))
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(json_keys, c, max_size=4), max_leaves=12)


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# ============================================================================ 1. YFCC metadata lines

SKIP_REASONS = {"bad_utf8", "bad_columns", "bad_field", "bad_escape", "video", "no_tags"}


def ref_url_decode(text: str) -> str | None:
    """Flickr's URL encoding by hand: '+' a space, '%' and two hex digits a byte, the bytes UTF-8; None if not."""
    out, i = bytearray(), 0
    while i < len(text):
        c = text[i]
        if c == "%":
            h = text[i + 1 : i + 3]
            if len(h) != 2 or any(x not in string.hexdigits for x in h):
                return None
            out.append(int(h, 16))
            i += 3
            continue
        out += b" " if c == "+" else c.encode("utf-8")
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def ref_parse(raw: bytes | str, machine_tags: bool) -> dict | str:
    """The record parse_line should return, or the reason it should skip the line."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bad_utf8"
    elif any(0xD800 <= ord(c) < 0xE000 for c in raw):  # text that is not UTF-8 either
        return "bad_utf8"
    while raw and raw[-1] in "\r\n":
        raw = raw[:-1]
    f = raw.split("\t")
    if len(f) == 25:
        _, pid, phash, user, _, _, _, _, title, _, utags, mtags, *rest = f
    elif len(f) == 23:
        pid, user, _, _, _, _, title, _, utags, mtags, *rest = f
        phash = None
    else:
        return "bad_columns"
    ext, marker = rest[-2], rest[-1]
    server, farm, secret = rest[-6], rest[-5], rest[-4]
    if not re.fullmatch(r"[0-9]+", pid) or marker not in ("0", "1"):
        return "bad_field"
    if phash is not None and not (6 <= len(phash) <= 64 and all(c in string.hexdigits for c in phash)):
        return "bad_field"
    if marker == "1":
        return "video"
    raw_tags = [t for t in utags.split(",") if t] + ([t for t in mtags.split(",") if t] if machine_tags else [])
    decoded = [ref_url_decode(t) for t in raw_tags]
    if None in decoded:
        return "bad_escape"
    tags = []
    for t in map(yfcc.normalize_tag, decoded):
        if t and t not in tags:
            tags.append(t)
    if not tags:
        return "no_tags"
    user, title = ref_url_decode(user), ref_url_decode(title)
    if user is None or title is None:
        return "bad_escape"
    return {"id": pid, "hash": phash or None, "user": user, "title": title, "tags": tags, "ext": ext or "jpg",
            "server": server, "farm": farm, "secret": secret}


def check_parse(raw: bytes | str, machine_tags: bool) -> None:
    want = ref_parse(raw, machine_tags)
    note(f"expected: {want!r}")
    event(f"outcome: {want if isinstance(want, str) else 'record'}")
    try:
        got = yfcc.parse_line(raw, machine_tags)
    except yfcc.Skip as e:
        assert e.reason in SKIP_REASONS, e.reason
        assert e.reason == want
        return
    assert got == want
    tags = got["tags"]
    assert tags and len(set(tags)) == len(tags)
    assert all(isinstance(t, str) and t and yfcc.normalize_tag(t) == t for t in tags)
    for text in [got[k] for k in ("id", "user", "title", "ext", "server", "farm", "secret")] + tags:
        text.encode("utf-8")  # every string is UTF-8 text (it goes into json)


escapes = st.one_of(
    st.integers(0, 255).map(lambda b: f"%{b:02X}"), st.integers(0, 255).map(lambda b: f"%{b:02x}"),
    st.sampled_from(["%", "%4", "%zz", "%%", "%G0", "%e2%82%ac", "%C3", "%C3%A9", "%ED%A0%80", "%00", "%2C", "%09"]),
)
plain_text = st.text(chars("\t\n%,"), max_size=6)  # no surrogates, no escapes
good_pieces = st.one_of(plain_text, plain_text.map(lambda t: "".join(f"%{b:02X}" for b in t.encode())),  # escaped UTF-8
                        st.sampled_from(["+", "%2C", "%25", "%20", "\0", "İ", "ﬁ", "Ⅻ", "e\u0301", "\u00a0", "😀"]))
bad_pieces = st.one_of(st.text(chars("\t\n"), max_size=6), escapes, st.sampled_from(TRICKY))


def text_of(pieces) -> st.SearchStrategy[str]:
    return st.lists(pieces, max_size=5).map("".join)


def tags_of(pieces, min_size: int = 0) -> st.SearchStrategy[str]:
    tag = st.one_of(st.sampled_from(["sea", "Sky", "new+york", "caf%C3%A9", " x "]), text_of(pieces), st.just(""))
    return st.lists(tag, min_size=min_size, max_size=5).map(",".join)


BREAKS = ["columns", "id", "hash", "marker", "text", "bytes", "escape", "tags"]


@st.composite
def yfcc_lines(draw) -> bytes | str:
    """A metadata line from random fields, every one well-formed (free text and tags random) except
    the few drawn to be broken: the column count, the id, the hash, the marker, the text (odd
    characters, bad escapes), bytes that are not UTF-8, one bad escape, the tags (maybe none)."""
    broken = set(draw(st.lists(st.sampled_from(BREAKS), max_size=draw(st.sampled_from([0, 0, 1, 1, 2])))))
    pieces = st.one_of(good_pieces, bad_pieces) if "text" in broken else good_pieces
    ncols = draw(st.sampled_from([24, 26, 22, 1, 50] if "columns" in broken else [25, 23]))
    cols = dict.fromkeys(yfcc.COLUMNS_25, "")
    for c in cols:
        cols[c] = draw(text_of(pieces)) if draw(st.integers(0, 3)) == 0 else ""
    cols["id"] = draw(st.one_of(text_of(pieces), st.sampled_from(["", "١٢٣", "²", "12a", " 1", "+1"]))
                      if "id" in broken else st.integers(0, 10**12).map(str))
    cols["hash"] = draw(st.one_of(text_of(pieces), st.sampled_from(["", "abc", "g" * 10, "a" * 65, "０１２３４５"]))
                        if "hash" in broken else st.text("0123456789abcdefABCDEF", min_size=6, max_size=64))
    cols["marker"] = draw(st.one_of(st.sampled_from(["2", "", " 0", "00"]), text_of(pieces))
                          if "marker" in broken else st.sampled_from(["0", "0", "0", "1"]))
    cols["user_tags"] = draw(tags_of(pieces, min_size=0 if "tags" in broken else 1))
    cols["machine_tags"] = draw(tags_of(pieces))
    if "escape" in broken:
        where = draw(st.sampled_from(["user_tags", "machine_tags", "user", "title"]))
        cols[where] += draw(st.sampled_from(["%", "%4", "%zz", "%ff", "%C3", "%ED%A0%80", "%G0"]))
    names = yfcc.COLUMNS_25 if ncols != 23 else yfcc.COLUMNS_23
    fields = [cols[c] for c in names]
    fields = (fields + [draw(text_of(pieces)) for _ in range(max(0, ncols - len(fields)))])[:ncols]
    if "bytes" in broken:  # raw bytes 0x80-0xff (or, in text, lone surrogates) somewhere
        i = draw(st.integers(0, len(fields) - 1))
        fields[i] += draw(st.text(SURROGATE_ESCAPES, min_size=1, max_size=3))
    line = "\t".join(fields) + draw(st.sampled_from(["", "\n", "\r\n", "\r", "\n\n"]))
    return to_bytes(line) if draw(st.booleans()) else line


@examples(300)
@given(raw=st.one_of(st.binary(max_size=300), st.text(ANY_CHAR, max_size=300), *[yfcc_lines()] * 4),
       machine_tags=st.booleans())
@example(raw=b"1\t2\tabcdef\tu\tn\td\td\tdev\tt\tdesc\tsea\t\t\t\t\t\t\t\t\t\t\t\t\tjpg\t0\n", machine_tags=False)
@example(raw="1\t2\tabcdef\tu\tn\td\td\tdev\tt\tdesc\tsea,\udcff\t\t\t\t\t\t\t\t\t\t\t\t\tjpg\t0", machine_tags=False)
def test_yfcc_parse_line(raw, machine_tags):
    check_parse(raw, machine_tags)
    if isinstance(raw, bytes):  # the same line as text (non-UTF-8 bytes as surrogate escapes): the same outcome
        text = raw.decode("utf-8", "surrogateescape")
        assert _outcome(raw, machine_tags) == _outcome(text, machine_tags)


def _outcome(raw, machine_tags):
    try:
        return yfcc.parse_line(raw, machine_tags)
    except yfcc.Skip as e:
        return e.reason


@examples(200)
@given(template=st.one_of(st.sampled_from(["{id}.jpg", "{", "}", "{nope}", "{0}", "{}", "{id.real}", "{id[0]}", "{id!z}",
                                           "{id:d}", "{id:{nope}}", "{hash}/{id}", "{{id}}", "{ext:.>2}/{id}", "{user}/{id}.jpg",
                                           "{user:.>2}", "/abs/{id}"]),
                          st.text(string.printable, max_size=12)),
       rec_user=st.sampled_from(["u", "a/b", "..", ""]))
def test_yfcc_image_path_template(template, rec_user):
    """A template the user gives (ingest --template) either fills, or is one BadValue; a record field
    that would lead out of the mirror is Skip('bad_field')."""
    rec = {"id": "123", "hash": "abcdef012345", "user": rec_user, "title": "t", "tags": ["x"], "ext": "jpg",
           "server": "1", "farm": "2", "secret": "s"}
    try:
        path = yfcc.image_path(rec, "/mirror", template)
    except yfcc.Skip as e:
        assert e.reason == "bad_field"
        return
    except BadValue as e:
        assert "template" in str(e) or "{hash" in template
        return
    assert isinstance(path, Path)
    if not template.startswith("/") and not any(x in template for x in ("..", ":", "!")):
        assert os.path.normpath(path).startswith("/mirror")  # no record field leads out of the mirror


# ============================================================================ 2. collection manifests

PATHS = ["a.jpg", "b/c.jpg", "./a.jpg", "b/../a.jpg", "../x.jpg", "/etc/passwd", "//etc/x", "", ".", "a\0b.jpg",
         "b//c.jpg", "~/x.jpg", "..", "b/../../y.jpg", "a.jpg/", "\udcff.jpg", "é.jpg", "e\u0301.jpg", "a b.jpg", "#c.jpg"]
paths = st.one_of(st.sampled_from(PATHS), st.text(chars("\n"), max_size=8))
tag_texts = st.one_of(st.sampled_from(["sea", "Sea ", " ", "", "a,b", "\udcff", "\0", "İ", "sky,sea"]), st.text(ANY_CHAR, max_size=6))


@st.composite
def jsonl_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["object"] * 6 + ["value", "bytes", "blank", "surrogate_bytes", "huge_int", "deep"]))
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"\r", b"\x0c", "\u2028".encode(), b"\x1c"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    if kind == "huge_int":
        return b'{"image": "a.jpg", "tags": ["sea"], "n": ' + b"9" * 5000 + b"}"
    if kind == "deep":  # nested past the json parser's depth
        return draw(st.sampled_from([nested(100_000), b'{"image": "a.jpg", "tags": ["sea"], "x": ' + nested(5000) + b"}"]))
    if kind == "value":
        value = draw(json_values)
    else:
        value = {}
        if draw(st.integers(0, 9)):
            value["image"] = draw(st.one_of(paths, json_values))
        if draw(st.integers(0, 9)):
            value["tags"] = draw(st.one_of(st.lists(tag_texts, max_size=4), tag_texts, json_values))
        for key in draw(st.lists(st.sampled_from(["user", "split", "id", "title", "other"]), max_size=3, unique=True)):
            value[key] = draw(st.one_of(st.sampled_from(["train", "val", "test", "u1", ""]), json_values))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))  # ensure_ascii: lone surrogates as "\udcff"
    if kind == "surrogate_bytes":
        return text.encode("utf-8", "surrogatepass")
    return to_bytes(text)


@st.composite
def tsv_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["row"] * 6 + ["comment", "blank", "bytes", "columns"]))
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\r", b"\x0c", b"\x1c"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    no_tab = chars("\n\t")
    if kind == "comment":
        return to_bytes("#" + draw(st.text(no_tab, max_size=10)))
    if kind == "columns":
        return to_bytes("\t".join(draw(st.lists(st.text(no_tab, max_size=5), max_size=4))))
    path = draw(paths).replace("\n", "").replace("\t", "")
    tags = ",".join(t.replace("\n", "").replace("\t", "") for t in draw(st.lists(tag_texts, max_size=4)))
    return to_bytes(f"{path}\t{tags}")


def file_lines(blob: bytes) -> list[bytes]:
    """The lines a binary file iterates over, without their b'\\n'."""
    lines = blob.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


def ref_collection(blob: bytes, jsonl: bool, base: str, split_by: str) -> list:
    """What each line of a manifest becomes: ("sample", key, path, meta as json, split key) or a skip reason.
    Blank lines and TSV comments become nothing."""
    out, seen = [], set()
    for line in file_lines(blob):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            out.append("bad_utf8")
            continue
        while text and text[-1] in "\r\n":
            text = text[:-1]
        if text.strip() == "" or (not jsonl and text.startswith("#")):
            continue
        if jsonl:
            try:
                row = json.loads(text)
            except (ValueError, RecursionError):  # the json module's refusals: bad syntax, too deep
                out.append("bad_line")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                out.append("bad_line")
                continue
            tags = row.get("tags") or []
            if isinstance(tags, str):
                tags = tags.split(",")
            if not isinstance(tags, list) or any(not isinstance(t, str) for t in tags):
                out.append("bad_line")
                continue
            image, extra = row["image"], {k: v for k, v in row.items() if k not in ("image", "tags")}
        else:
            cols = text.split("\t")
            if len(cols) != 2:
                out.append("bad_line")
                continue
            image, tags, extra, row = cols[0], cols[1].split(","), {}, {"image": cols[0]}
        texts = [image, *tags, *_strings(row)]
        if "\0" in image or any(0xD800 <= ord(c) < 0xE000 for s in texts for c in s):
            out.append("bad_line")
            continue
        full = os.path.realpath(os.path.join(base, image))
        if full != base and not full.startswith(base + os.sep):
            out.append("outside_root")
            continue
        norm = list(dict.fromkeys(t for t in map(yfcc.normalize_tag, tags) if t))
        if not norm:
            out.append("no_tags")
            continue
        rel = os.path.relpath(full, base)
        if rel in seen:
            out.append("duplicate")
            continue
        seen.add(rel)
        meta = {"id": rel, **extra, "tags": norm}
        if split_by == "user" and meta.get("user") in (None, ""):
            out.append("no_user")
            continue
        if split_by == "manifest" and meta.get("split") not in ("train", "val", "test"):
            out.append("no_split")
            continue
        key = hashlib.sha1(rel.encode()).hexdigest()[:20]
        split_key = {"user": meta.get("user"), "manifest": meta.get("split")}.get(split_by, meta["id"])
        out.append(("sample", key, full, json.dumps(meta), str(split_key)))
    return out


def _strings(x):
    """Every string in a JSON value, keys included."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from _strings(v)


@examples(200)
@given(jsonl=st.booleans(), data_=st.data(), split_by=st.sampled_from(["id", "id", "user", "manifest"]),
       root=st.sampled_from(["", "same", "b"]), trailing_newline=st.booleans())
def test_collection_manifest_lines_are_each_accounted_for(jsonl, data_, split_by, root, trailing_newline):
    lines = data_.draw(st.lists(jsonl_lines() if jsonl else tsv_lines(), max_size=12), label="lines")
    blob = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.realpath(tmp)
        (Path(folder) / "b").mkdir()
        manifest = Path(folder) / ("manifest.jsonl" if jsonl else "manifest.tsv")
        manifest.write_bytes(blob)
        # the images' folder: by default the manifest's, or one given (the same, or a subfolder)
        base = os.path.join(folder, "b") if root == "b" else folder
        s = ingest.Settings(source="collection", inputs=[str(manifest)], root={"": "", "same": folder, "b": base}[root],
                            split_by=split_by)
        items = list(ingest.collection_samples(s, None))
        want = ref_collection(blob, jsonl, base, split_by)
    got = []
    for item in items:
        if isinstance(item, yfcc.Skip):
            got.append(item.reason)
        else:
            key, path, meta, split_key = item
            assert isinstance(key, str) and re.fullmatch(r"[0-9a-f]{20}", key)
            tags = meta["tags"]
            assert tags and len(set(tags)) == len(tags) and all(yfcc.normalize_tag(t) == t for t in tags)
            json.dumps(meta, ensure_ascii=False).encode("utf-8")  # the ingest writes it as UTF-8 json
            got.append(("sample", key, path, json.dumps(meta), split_key))
    # every non-blank, non-comment line is one item, in order: a sample or a skip with its reason
    assert got == want
    for outcome in {x if isinstance(x, str) else "sample" for x in got}:
        event(f"a line became: {outcome}")
    read = sum(1 for ln in file_lines(blob) if _counted(ln, jsonl))
    skipped = Counter(x for x in got if isinstance(x, str))
    assert read == sum(1 for x in got if isinstance(x, tuple)) + sum(skipped.values())
    assert set(skipped) <= {"bad_utf8", "bad_line", "outside_root", "no_tags", "duplicate", "no_user", "no_split"}


def _counted(line: bytes, jsonl: bool) -> bool:
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return True
    return bool(text.strip()) and not (not jsonl and text.startswith("#"))


# ============================================================================ 3. a sample's json in the loader

VOCAB = vocab.Vocabulary(["sea", "sky", "dog"], [3, 2, 1])


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _sized_json(n: int) -> bytes:
    """A well-formed json object of exactly n bytes whose tags would be usable."""
    head = b'{"tags": ["sea"], "pad": "'
    return head + b"x" * (n - len(head) - 2) + b'"}'


BIG_JSON = {n: _sized_json(n) for n in (data.MAX_META_BYTES, data.MAX_META_BYTES + 1)}
DEEP = [nested(100_000), b'{"tags": ' + nested(100_000, b'"sea"') + b"}", b'{"tags": ["sea"], "user": ' + nested(5000) + b"}",
        b'{"tags": ' + nested(990, b'"sea"') + b"}", b'{"tags": ["sea"], "n": ' + b"9" * 5000 + b"}"]
tag_items = st.one_of(st.sampled_from(["sea", "sky", "dog", "cat", "SEA", " sea", "sea\0", ""]), json_scalars, json_values)
tag_lists = st.one_of(st.lists(tag_items, max_size=5), json_values)
good_tag_lists = st.lists(st.sampled_from(["sea", "sky", "dog", "cat", "SEA", " sea", "sea\0", "", "\udcff"]), max_size=5)


@st.composite
def metas(draw, good: bool) -> dict:
    """A json object as a shard holds it: well-formed (a list of strings under "tags", and under
    "clean_tags" if any), or with "tags", "clean_tags", "user" of any type at any depth (or missing)."""
    meta = draw(st.dictionaries(json_keys, json_values, max_size=3))
    if good:
        meta["tags"] = draw(good_tag_lists)
        meta.pop("clean_tags", None)
        if draw(st.booleans()):
            meta["clean_tags"] = draw(good_tag_lists)
    for key, values in ((() if good else (("tags", tag_lists), ("clean_tags", tag_lists))) + (("user", json_values),)):
        choice = draw(st.integers(0, 3))
        if choice == 1:
            meta.pop(key, None)
        elif choice >= 2:
            meta[key] = draw(values)
    return meta


@st.composite
def json_payloads(draw):
    kind = draw(st.sampled_from(["good"] * 6 + ["meta"] * 4 + ["value", "bytes", "surrogates", "deep", "big", "str", "other"]))
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "deep":
        return draw(st.sampled_from(DEEP))
    if kind == "big":
        return BIG_JSON[draw(st.sampled_from(sorted(BIG_JSON)))]
    if kind == "other":
        return draw(st.sampled_from([None, 0, 1.5, ["sea"], {"tags": ["sea"]}, bytearray(b'{"tags": ["sea"]}')]))
    value = draw(metas(kind != "meta")) if kind in ("good", "meta", "str", "surrogates") else draw(json_values)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    if kind == "str":
        return text
    return text.encode("utf-8", "surrogatepass") if kind == "surrogates" else to_bytes(text)


@st.composite
def loader_samples(draw) -> list[dict]:
    out = []
    for i in range(draw(st.integers(0, 8))):
        s = {"__key__": f"k{i}"}
        if draw(st.integers(0, 9)):
            s["json"] = draw(json_payloads())
        image = draw(st.sampled_from(["jpeg"] * 4 + ["random", "truncated", "none", "other_ext"]))
        ext = draw(st.sampled_from(data.IMAGE_EXTS))
        if image == "jpeg":
            s[ext] = JPEG
        elif image == "random":
            s[ext] = draw(st.binary(max_size=80))
        elif image == "truncated":
            s[ext] = JPEG[: draw(st.integers(0, len(JPEG) - 1))]
        elif image == "other_ext":
            s["txt"] = JPEG
        out.append(s)
    return out


def ref_meta(s: dict):
    """-> "bad_meta", "no_tag", or (tag ids, clean tag ids), by the loader's rules written out."""
    raw = s.get("json")
    if not isinstance(raw, (bytes, str)) or len(raw) > data.MAX_META_BYTES:
        return "bad_meta"
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # the json module's own refusals: bad syntax, not UTF-8, too deep
        return "bad_meta"
    if not isinstance(meta, dict) or "tags" not in meta:
        return "bad_meta"
    tags, clean = meta["tags"], meta.get("clean_tags") or []
    if not isinstance(tags, list) or not isinstance(clean, list):
        return "bad_meta"
    if any(isinstance(t, (list, dict)) for t in tags + clean):  # unhashable: not a tag list
        return "bad_meta"
    ids = []
    for found in (tags, clean):
        seen = []
        for t in found:
            if isinstance(t, str) and t in VOCAB.tags and VOCAB.tags.index(t) not in seen:
                seen.append(VOCAB.tags.index(t))
        ids.append(seen)
    return "no_tag" if not ids[0] else tuple(ids)


@examples(200)
@given(samples=loader_samples())
def test_loader_decode_never_raises_and_counts_every_sample(samples):
    stages = data._Samples(VOCAB, data.eval_view, 16, seed=0)
    got = list(stages.decode(iter(samples)))
    skipped = dict(zip(data.SKIP_REASONS, stages.skipped))
    note(f"skipped: {skipped}")
    for reason in [r for r, n in skipped.items() if n] + (["yielded"] if got else []):
        event(f"a sample: {reason}")
    assert len(got) + sum(stages.skipped) == len(samples)
    want = {s["__key__"]: ref_meta(s) for s in samples}
    assert skipped["bad_meta"] == sum(1 for w in want.values() if w == "bad_meta")
    assert skipped["no_tag"] == sum(1 for w in want.values() if w == "no_tag")
    assert skipped["read_error"] == 0
    by_key = {key: (x, tags, clean) for x, tags, clean, key, _ in got}
    for s in samples:
        w, key = want[s["__key__"]], s["__key__"]
        image = next((s[e] for e in data.IMAGE_EXTS if e in s), None)
        if isinstance(w, str) or image is None:
            assert key not in by_key
            continue
        if image == JPEG:  # usable metadata and a whole JPEG: always a sample
            assert key in by_key
        if key in by_key:
            x, tags, clean = by_key[key]
            assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
            assert (tags, clean) == w
    # the images not yielded for usable metadata are counted as bad (or too large) images
    unusable = sum(1 for s in samples if isinstance(want[s["__key__"]], tuple)) - len(got)
    assert skipped["bad_image"] + skipped["too_large"] == unusable


def test_loader_decode_a_well_formed_sea_sample_is_always_used():
    """A json object whose "tags" list holds "sea" (its other entries JSON scalars, clean_tags absent),
    with a valid JPEG, is a sample whatever its other fields; a json of exactly MAX_META_BYTES is still
    metadata, one byte more is not."""
    samples = [{"__key__": "a", "json": json.dumps({"tags": ["x", "sea", 3, None], "user": [1, {"a": 2}]}).encode(), "jpg": JPEG},
               {"__key__": "b", "json": BIG_JSON[data.MAX_META_BYTES], "png": JPEG},
               {"__key__": "c", "json": BIG_JSON[data.MAX_META_BYTES + 1], "jpg": JPEG}]
    stages = data._Samples(VOCAB, data.eval_view, 16, seed=0)
    got = list(stages.decode(iter(samples)))
    assert [key for _, _, _, key, _ in got] == ["a", "b"] and got[0][1] == [0]
    assert [user for *_, user in got] == ["", ""]  # a list is no uploader's name
    assert stages.skipped[data.SKIP_BAD_META] == 1


# ============================================================================ 4. vocabulary files

counts_text = st.one_of(
    st.integers(0, 50).map(str),
    st.sampled_from(["-3", "+3", " 3", "3 ", "3.0", "1e3", "", "²", "①", "٣", "0x1", "3_0", "9" * 5000,
                     str(2**63), str(2**63 - 1), str(2**64), "0" * 30 + "7"]),
    st.text(max_size=4),
)
vocab_tags = st.one_of(st.text(ANY_CHAR, max_size=6), st.sampled_from(TRICKY + ["sea", "a\tb", "a\rb", "a\nb", ""]))


@st.composite
def vocab_files(draw) -> bytes:
    """A vocabulary file: well-formed (tags without tab or line breaks, counts sorted) or with broken
    lines (odd counts, columns, bytes that are not UTF-8, line breaks inside tags, unsorted counts)."""
    clean = draw(st.booleans())
    n = draw(st.integers(0, 8))
    counts = sorted(draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)), reverse=clean or draw(st.integers(0, 4)) > 0)
    lines = []
    for c in counts:
        kind = 0 if clean else draw(st.integers(0, 9))
        tag = draw(st.text(chars("\t\n\r"), max_size=6) if clean else vocab_tags)
        if kind <= 6:
            lines.append(f"{tag}\t{c}")
        elif kind == 7:
            lines.append(f"{tag}\t{draw(counts_text)}")
        elif kind == 8:
            lines.append(draw(st.sampled_from([tag, f"{tag}\t{c}\t{c}", "", f"\t{c}"])))
        else:
            lines.append(draw(st.text(SURROGATE_ESCAPES, min_size=1, max_size=3)) + f"{tag}\t{c}")
    ends = [draw(st.sampled_from(["\n", "\n", "\r\n", "\r"])) for _ in lines]
    text = "".join(ln + e for ln, e in zip(lines, ends))
    if lines and draw(st.booleans()):
        text = text[: -len(ends[-1])]  # no newline after the last line
    return to_bytes(text)


def ref_vocab(blob: bytes, max_size, min_count):
    """-> (tags, counts), or ("error", line number or None): lines as text-mode Python reads them
    (\\n, \\r\\n and \\r end a line), each tag<TAB>count with count a decimal number that fits 64 bits,
    counts never increasing, no tag twice; kept: the lines before the first one under min_count or past max_size."""
    text = blob.decode("utf-8", "surrogateescape")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    tags, counts, last, cut, seen = [], [], None, False, set()
    for n, line in enumerate(lines, 1):
        if any(0xDC80 <= ord(c) <= 0xDCFF for c in line):  # bytes that are not UTF-8
            return "error", n
        parts = line.split("\t")
        if (len(parts) != 2 or not parts[1] or not all(c.isdecimal() for c in parts[1])
                or len(parts[1]) > sys.get_int_max_str_digits()):  # Python's own limit on int("...")
            return "error", n
        count = int(parts[1])
        if count >= 2**63 or (last is not None and count > last) or parts[0] in seen:  # unsorted, or a tag twice
            return "error", n
        seen.add(parts[0])
        last = count
        if count < min_count or (max_size and len(tags) >= max_size):
            cut = True
        if not cut:
            tags.append(parts[0])
            counts.append(count)
    return (tags, counts) if tags else ("error", None)


@examples(300)
@given(blob=st.one_of(vocab_files(), st.binary(max_size=60)), max_size=st.one_of(st.none(), st.integers(-2, 8)),
       min_count=st.one_of(st.integers(-3, 35), st.just(2**70)))
@example(blob=b"sea\t\xc2\xb2\n", max_size=None, min_count=1)
@example(blob=b"sea\t" + b"9" * 5000 + b"\n", max_size=None, min_count=1)
@example(blob=b"sea\t" + str(2**64).encode() + b"\n", max_size=None, min_count=1)
@example(blob=b"sea\t5\n\xff\t3\n", max_size=None, min_count=1)
def test_vocabulary_load(blob, max_size, min_count):
    want = ref_vocab(blob, max_size, min_count)
    note(f"expected: {want!r}")
    event("refused" if want[0] == "error" else "loaded")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.tsv"
        path.write_bytes(blob)
        try:
            v = vocab.Vocabulary.load(path, max_size, min_count)
        except UserError as e:
            assert isinstance(e, BadValue), type(e)
            assert want[0] == "error", f"refused a good file: {e}"
            if want[1] is not None:  # the line that breaks the format is named
                assert f"{path}:{want[1]}:" in str(e), str(e)
            assert "\n" not in str(e)
            return
    assert want[0] != "error", "accepted a bad file"
    assert v.tags == want[0] and v.counts.tolist() == want[1]
    assert len(v) == len(want[0])


def test_vocabulary_load_missing_file(tmp_path):
    with pytest.raises(NotFound):
        vocab.Vocabulary.load(tmp_path / "nope.tsv")
    with pytest.raises(NotFound):
        vocab.Vocabulary.load(tmp_path)  # a folder


# ============================================================================ 5. the module commands' argument parsers


def make_cwd(root: Path) -> None:
    """Small inputs the commands may be pointed at: none is large enough to start real work."""
    good = ["1", "123", "abcdef0123", "u%40x", "n", "d", "d", "dev", "t+itle", "", "sea,sky", "", "", "", "", "",
            "", "", "", "", "", "", "", "jpg", "0"]
    (root / "meta.txt").write_text("\t".join(good) + "\nbroken line\n", encoding="utf-8")
    (root / "meta.txt.bz2").write_bytes(bz2.compress((root / "meta.txt").read_bytes())[:-10])  # cut short
    (root / "m.tsv").write_text("# a comment only\n", encoding="utf-8")
    (root / "m.jsonl").write_text('{"image": "missing.jpg", "tags": ["sea"]}\n[1]\n', encoding="utf-8")
    (root / "dir").mkdir()
    (root / "garbage.ckpt").write_bytes(os.urandom(64))
    with zipfile.ZipFile(root / "zip.ckpt", "w") as z:
        z.writestr("archive/other.txt", "x")
    with zipfile.ZipFile(root / "fake.ckpt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x04garbage")
    (root / "imgs").mkdir()
    (root / "imgs" / "a.jpg").write_bytes(JPEG)
    (root / "shards").mkdir()
    with tarfile.open(root / "shards" / "s-000000.tar", "w") as tar:
        for name, body in (("k1.json", b'{"tags": ["sea", "sky"]}'), ("k2.json", b"[1"), ("k1.jpg", JPEG)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    for name, body in (("like_ok", json.dumps(asdict(ingest.Settings(inputs=["x"])))), ("like_garbage", "not json {"),
                       ("like_empty", "{}"), ("like_list", "[1, 2]"), ("like_bad", json.dumps({
                           "split_by": "nope", "val_fraction": 0.1, "test_fraction": 0.1, "salt": "s", "machine_tags": False})),
                       ("like_typed", json.dumps({"split_by": "id", "val_fraction": "x", "test_fraction": None, "salt": 3,
                                                  "machine_tags": 1}))):
        (root / name).mkdir()
        (root / name / "ingest.json").write_text(body, encoding="utf-8")


def values(*choices: str) -> st.SearchStrategy[str]:
    return st.sampled_from(choices)


bad_ints = values("1.5", "x", "", "1e3", "9" * 30, "-0", "0x10", " 3", "-5", "0")
bad_floats = st.one_of(st.floats(-1, 2).map(repr), values("nan", "inf", "-inf", "x", "", "1e-300", "1,5", "0.6"))
noise = st.one_of(
    st.text(chars("\0"), max_size=8),
    values("-", "--", "-x", "--nope", "--quiet", "-h", "--help", "--out", "=", "--k=3", "--out=x"),
).filter(lambda t: t != "--debug")  # --debug shows a user error's traceback: not this property
EXISTING = ["meta.txt", "meta.txt.bz2", "m.tsv", "m.jsonl", "dir", "imgs", "garbage.ckpt", "zip.ckpt", "fake.ckpt"]
NOT_UTF8 = ["r\udcff", "o\udce9/x"]  # file names that are not UTF-8, as Python reads them from argv
bad_paths = st.one_of(values(*EXISTING, *NOT_UTF8, "nope.txt", "nope/deeper.txt", "", "-", "meta.txt/x", "."), noise)


class Opt:
    """An option of a command: good values, bad values (None: a flag without value); required ones are
    always given in a clean command line."""

    def __init__(self, flag: str, good=None, bad=None, required: bool = False):
        self.flag, self.good, self.bad, self.required = flag, good, bad, required


@st.composite
def command_line(draw, sub: str | None, positionals: list, options: list[Opt], front: list[str]) -> list[str]:
    """A command line: clean (every value good, required options given: the command gets as far as
    its inputs) or messy (bad values, missing values and positionals, random tokens); in random order."""
    clean = draw(st.booleans())
    chunks = []
    for good, bad in positionals:
        if clean or draw(st.integers(0, 5)):
            chunks.append([draw(good if clean else st.one_of(good, bad))])
    for o in options:
        if not ((clean and o.required) or draw(st.integers(0, 3)) == 0):
            continue
        if o.good is None:
            chunks.append([o.flag])
            continue
        v = draw(o.good if clean else st.one_of(o.good, o.bad))
        form = draw(st.integers(0, 4 if clean else 5))
        chunks.append([o.flag, v] if form <= 2 else [f"{o.flag}={v}"] if form <= 4 else [o.flag])
    if not clean:
        chunks += [[draw(noise)] for _ in range(draw(st.integers(0, 2)))]
    order = draw(st.permutations(range(len(chunks)))) if chunks else []
    argv = ([] if sub is None else [sub]) + front + [t for i in order for t in chunks[i]]
    return [t for t in argv if t != "--debug"]  # --debug shows a user error's traceback: not this property


def commands(table: dict, front: list[str]) -> st.SearchStrategy[list[str]]:
    """One of the subcommands' command lines, or no/an unknown subcommand."""
    return st.one_of(*[command_line(sub, pos, opts, front) for sub, (pos, opts) in table.items()],
                     st.lists(noise, max_size=3), st.just([]), st.just(["-h"]))


def common_ingest(split_by: tuple[str, ...]) -> list[Opt]:
    def ints(lo: int, hi: int) -> st.SearchStrategy[str]:
        return st.integers(lo, hi).map(str)

    fractions = st.floats(0, 0.45).map(repr)
    return [Opt("--out", values("out", "out2/deeper", *NOT_UTF8), values("meta.txt", "dir/../meta.txt", "", "imgs/a.jpg"),
                required=True),
            Opt("--shard-size", ints(1, 10), bad_ints), Opt("--split-by", values(*split_by), values("x", "manifest", "")),
            Opt("--val-fraction", fractions, bad_floats), Opt("--test-fraction", fractions, bad_floats),
            Opt("--max-side", ints(1, 64), bad_ints), Opt("--max-pixels", ints(1, 10**9), bad_ints),
            Opt("--workers", values("0", "-1"), values("x", "1.5", "")),  # never > 0: no process pools in a fuzz
            Opt("--quiet"), Opt("--quiet")]


INGEST = {
    "yfcc": ([(values("meta.txt", "meta.txt.bz2"), bad_paths), (values("meta.txt", "m.tsv"), bad_paths)],
             [Opt("--images", values("imgs", ".", "nope", *NOT_UTF8), bad_paths, required=True),
              Opt("--template", values("{id}.jpg", "imgs/a.jpg", "{farm}/{id}_{secret}.{ext}", "{hash_a}/{hash}.jpg"),
                  values("{", "}", "{nope}", "{0}", "{}", "{id!z}", "{id:d}", "{id.real}", "../{id}", "", "{id:{user}}")),
              Opt("--machine-tags"), *common_ingest(("id", "user"))]),
    "collection": ([(values("m.tsv", "m.jsonl"), bad_paths)],
                   [Opt("--root", values(".", "imgs", "dir", "nope", *NOT_UTF8), bad_paths),
                    *common_ingest(("id", "user", "manifest"))]),
}
VOCAB_CLI = {
    "shards": [Opt("--shards", values("shards/*.tar", "shards/s-{000000..000001}.tar", "nope*.tar", "x{1..3}.tar"),
                   values("{", "}", "{a,b", "x{1..3", "meta.txt", "dir", "[", "shards", "", "{,}"), required=True)],
    "yfcc": [Opt("--yfcc", values("meta.txt", "meta.txt.bz2"), bad_paths, required=True),
             Opt("--split", values("train", "val", "test"), values("x", "")),
             Opt("--like", values("like_ok"), values("like_garbage", "like_empty", "like_list", "like_bad", "like_typed",
                                                     "nope", "meta.txt", "dir"))],
}
VOCAB_COMMON = [Opt("--split-by", values("id", "user"), values("manifest", "x")),
                Opt("--val-fraction", st.floats(0, 0.45).map(repr), bad_floats),
                Opt("--test-fraction", st.floats(0, 0.45).map(repr), bad_floats), Opt("--machine-tags"),
                Opt("--min-count", st.integers(-2, 3).map(str), bad_ints), Opt("--max-size", st.integers(1, 5).map(str), bad_ints),
                Opt("--workers", values("0", "-1"), values("x", "1.5", "")), Opt("--quiet"), Opt("--quiet")]
vocab_out = (values("v.tsv", "out.tsv", "imgs/a.jpg", "v\udcff.tsv"), values("dir", "", ".", "..", "/", "nope/v.tsv", "imgs/a.jpg/x"))
vocab_commands = st.one_of(
    *[command_line(None, [vocab_out], opts + VOCAB_COMMON, ["--workers", "0"]) for opts in VOCAB_CLI.values()],
    command_line(None, [vocab_out], VOCAB_CLI["shards"] + VOCAB_CLI["yfcc"] + VOCAB_COMMON, ["--workers", "0"]),
    st.lists(noise, max_size=3), st.just([]), st.just(["-h"]),
)
ckpts = (values("nope.ckpt", "garbage.ckpt", "zip.ckpt", "fake.ckpt", "dir", "meta.txt"), bad_paths)
PREDICT_COMMON = [Opt("--device", values("cpu"), values("cuda", "cuda:9", "nope", "")),
                  Opt("--image-size", st.integers(1, 64).map(str), bad_ints)]
PREDICT = {
    "tag": ([ckpts, (values("imgs"), bad_paths)],
            [Opt("--out", values("tags.jsonl"), bad_paths, required=True), Opt("--k", st.integers(1, 9).map(str), bad_ints),
             Opt("--gamma", st.floats(-2, 2).map(repr), bad_floats), Opt("--batch-size", st.integers(1, 9).map(str), bad_ints),
             *PREDICT_COMMON]),
    "index": ([ckpts, (values("imgs"), bad_paths)],
              [Opt("--out", values("index.pt"), bad_paths, required=True), Opt("--batch-size", st.integers(1, 9).map(str), bad_ints),
               *PREDICT_COMMON]),
    "search": ([ckpts, (values("index.pt", "garbage.ckpt"), bad_paths), (values("sea", "nope"), values("", "-x"))],
               [Opt("--k", st.integers(1, 9).map(str), bad_ints), *PREDICT_COMMON]),
}


def run_in_tmp(call, argv: list[str], leftovers: list[str] | None = None) -> tuple[int, str]:
    """Run a command in a fresh temporary folder holding the small inputs; -> (status, stderr).
    ``leftovers`` receives the temporary files (``*.tmp*``) the command left there."""
    here, pil_limit = os.getcwd(), Image.MAX_IMAGE_PIXELS
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        make_cwd(Path(tmp))
        os.chdir(tmp)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = call(argv)
        finally:
            os.chdir(here)
            Image.MAX_IMAGE_PIXELS = pil_limit  # --max-pixels above PIL's limit raises it for the process
        if leftovers is not None:
            leftovers += [str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.tmp*")]
    return code, err.getvalue()


def check_status(code, stderr: str) -> None:
    if currently_in_test_context():
        event(f"exit status {code}")
    assert code in (0, 2), code
    lines = [ln for ln in stderr.split("\n") if ln and "\r" not in ln]  # tqdm redraws with \r
    errors = [ln for ln in lines if ln.startswith(PREFIX)]
    if code == 2:
        assert len(errors) == 1, stderr
        assert lines[-1] == errors[0], stderr  # the error is the last thing said
    else:
        assert not errors, stderr


@examples(200)
@given(argv=commands(INGEST, ["--workers", "0"]))
def test_cli_ingest_arguments(argv):
    code, stderr = run_in_tmp(lambda a: run_cli(ingest.main, a, exit=False), argv)
    note(stderr)
    check_status(code, stderr)


@examples(200)
@given(argv=vocab_commands)
def test_cli_vocab_arguments(argv):
    leftovers = []
    code, stderr = run_in_tmp(lambda a: run_cli(vocab.main, a, exit=False), argv, leftovers)
    note(stderr)
    check_status(code, stderr)
    assert not leftovers  # the vocabulary is written under a temporary name and renamed, never left half


@examples(200)
@given(argv=commands(PREDICT, []))
def test_cli_predict_arguments(argv):
    code, stderr = run_in_tmp(predict.main, argv)
    note(stderr)
    check_status(code, stderr)


# ============================================================================ 6. ranking

GAMMAS = [0.0, 0.5, 1.0, 2.0, -1.0, 1.5]  # exact in binary: integer-valued scores stay exact in float32


@st.composite
def ranking_inputs(draw):
    n, v, d = draw(st.integers(1, 12)), draw(st.integers(1, 30)), draw(st.integers(1, 6))
    lo, hi = draw(st.sampled_from([(-1, 1), (-2, 2), (-3, 3), (0, 1)]))
    arr = lambda *shape: np.array(draw(st.lists(st.integers(lo, hi), min_size=math.prod(shape), max_size=math.prod(shape))),
                                  dtype=np.float64).reshape(shape)  # noqa: E731
    u, table = arr(n, d), arr(v, d)
    lc = np.array(draw(st.lists(st.integers(0, 4), min_size=v, max_size=v)), dtype=np.float64)
    gamma = draw(st.sampled_from(GAMMAS))
    truths = []
    for _ in range(draw(st.integers(1, 2))):
        t = draw(st.integers(1, min(5, v)))
        truth = np.full((n, t), PAD, dtype=np.int64)
        for i in range(n):
            row = draw(st.lists(st.integers(0, v - 1), max_size=t, unique=True))
            truth[i, : len(row)] = row
        truths.append(truth)
    return u, table, lc, gamma, truths


def f32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def ref_top(S: np.ndarray, k: int) -> np.ndarray:
    """Top k of each row, best first, equal scores in tag-index order (explicit sort keys)."""
    return np.array([sorted(range(S.shape[1]), key=lambda t: (-S[i, t], t))[:k] for i in range(S.shape[0])],
                    dtype=np.int64).reshape(S.shape[0], k)


def ref_tagging(S: np.ndarray, truth: np.ndarray, ks) -> dict[str, float]:
    n = S.shape[0]
    rows = [[int(t) for t in r if t != PAD] for r in truth]
    has = [i for i in range(n) if rows[i]]
    m = {"images": float(len(has))}
    for k in ks:
        p, r, f = [], [], []
        for i in has:
            hits = 0.0
            for t in rows[i]:
                a = sum(1 for x in S[i] if x > S[i, t]) + 1
                b = sum(1 for x in S[i] if x >= S[i, t])
                hits += min(1.0, max(0.0, (k - a + 1) / (b - a + 1)))
            pi, ri = hits / k, hits / len(rows[i])
            p.append(pi)
            r.append(ri)
            f.append(2 * pi * ri / (pi + ri) if pi + ri > 0 else 0.0)
        for name, x in (("precision", p), ("recall", r), ("f1", f)):
            m[f"{name}@{k}"] = float(np.mean(x)) if x else math.nan
    aps = [ref_ap(S[i], rows[i]) for i in has]
    m["map"] = float(np.mean(aps)) if aps else math.nan
    m["map_all_images"] = float(np.sum(aps) / n)
    return m


def ref_ap(s: np.ndarray, relevant: list[int]) -> float:
    """(1/R) Σ_{relevant t} |{relevant t': s_t' ≥ s_t}| / |{t': s_t' ≥ s_t}| (pessimistic ties)."""
    return sum(sum(1 for t2 in relevant if s[t2] >= s[t]) / sum(1 for x in s if x >= s[t]) for t in relevant) / len(relevant)


def ref_per_tag(top: np.ndarray, truth: np.ndarray, v: int, ks, noise: set[int]) -> dict[str, float]:
    rows = [[int(t) for t in r if t != PAD] for r in truth]
    has = [i for i in range(len(rows)) if rows[i]]
    m = {}
    for k in ks:
        pred, correct, relevant = [0] * v, [0] * v, [0] * v
        for r in rows:
            for t in r:
                relevant[t] += 1
        for i in has:
            for t in top[i, :k]:
                pred[t] += 1
                correct[t] += t in rows[i]
        seen = [t for t in range(v) if relevant[t]]
        m[f"tag_precision@{k}"] = float(np.mean([correct[t] / pred[t] if pred[t] else 0.0 for t in seen])) if seen else math.nan
        m[f"tag_recall@{k}"] = float(np.mean([correct[t] / relevant[t] for t in seen])) if seen else math.nan
        m[f"noise_share@{k}"] = float(np.mean([np.mean([t in noise for t in top[i, :k]]) for i in range(len(rows))]))
    return m


def same(got: dict, want: dict) -> None:
    for key, w in want.items():
        assert got[key] == pytest.approx(w, abs=1e-5, nan_ok=True), (key, got[key], w)


@examples(250)
@given(inputs=ranking_inputs(), kmax=st.integers(1, 12), batch=st.integers(1, 13), budget=st.integers(1, 400),
       noise_ids=st.lists(st.integers(0, 29), max_size=5), ks=st.sampled_from([ranking.KS, (1, 2), (3,), (1, 40)]))
def test_rank_tags_and_tagging_metrics_match_brute_force(inputs, kmax, batch, budget, noise_ids, ks):
    u, table, lc, gamma, truths = inputs
    n, v = u.shape[0], table.shape[0]
    S = u @ table.T + gamma * lc[None, :]
    r = ranking.rank_tags(f32(u), f32(table), f32(lc), gamma, [torch.tensor(t) for t in truths],
                          kmax=kmax, batch=batch, budget=budget)
    assert np.array_equal(r.top_ids.numpy(), ref_top(S, min(kmax, v)))
    for j, truth in enumerate(truths):
        for i in range(n):
            for c, t in enumerate(truth[i]):
                if t == PAD:
                    want = (0, 0, 0.0)
                else:
                    want = (int(np.sum(S[i] > S[i, t])), int(np.sum(S[i] >= S[i, t])), S[i, t])
                assert (int(r.n_gt[j][i, c]), int(r.n_ge[j][i, c]), float(r.true_scores[j][i, c])) == want
        noise = torch.tensor(sorted({x for x in noise_ids if x < v}), dtype=torch.long)
        m = ranking.tagging_metrics(r, which=j, ks=ks, noise_ids=noise, num_tags=v)
        same(m, ref_tagging(S, truth, ks))
        same(m, ref_per_tag(r.top_ids.numpy(), truth, v, ks, set(noise.tolist())))


@examples(200)
@given(inputs=ranking_inputs(), kmax=st.integers(1, 12))
def test_rank_prior_matches_brute_force(inputs, kmax):
    _, _, lc, _, truths = inputs
    v = len(lc)
    S = np.repeat(lc[None, :], truths[0].shape[0], 0)
    r = ranking.rank_prior(f32(lc), [torch.tensor(t) for t in truths], kmax=kmax)
    assert np.array_equal(r.top_ids.numpy(), ref_top(S, min(kmax, v)))
    for j, truth in enumerate(truths):
        for i, row in enumerate(truth):
            for c, t in enumerate(row):
                want = (0, 0) if t == PAD else (int(np.sum(lc > lc[t])), int(np.sum(lc >= lc[t])))
                assert (int(r.n_gt[j][i, c]), int(r.n_ge[j][i, c])) == want
        same(ranking.tagging_metrics(r, which=j, num_tags=v), ref_tagging(S, truth, ranking.KS))


@examples(250)
@given(inputs=ranking_inputs(), k=st.integers(1, 12), chunk=st.integers(1, 10), budget=st.integers(1, 500),
       queries=st.one_of(st.none(), st.lists(st.integers(0, 29), max_size=6)))
def test_retrieval_metrics_match_brute_force(inputs, k, chunk, budget, queries):
    u, table, _, _, truths = inputs
    truth, v = truths[0], table.shape[0]
    S0 = u @ table.T  # (N, V): γ·log count(t) does not change an image ranking
    present = sorted({int(t) for t in truth.flat if t != PAD})
    asked = present if queries is None else [q for q in queries if q < v]
    kept = [q for q in asked if q in present]
    q_arg = None if queries is None else torch.tensor(asked, dtype=torch.long)
    m, ap, pk = ranking.retrieval_metrics(f32(u), f32(table), torch.tensor(truth), queries=q_arg, k=k, chunk=chunk,
                                          budget=budget)
    want_ap, want_pk = [], []
    for q in kept:
        s = S0[:, q]
        rel = [i for i in range(len(s)) if q in truth[i]]
        want_ap.append(ref_ap(s, rel))
        hits = 0.0
        for i in rel:
            a, b = int(np.sum(s > s[i])) + 1, int(np.sum(s >= s[i]))
            hits += min(1.0, max(0.0, (k - a + 1) / (b - a + 1)))
        want_pk.append(hits / k)
    np.testing.assert_allclose(ap.numpy(), want_ap, atol=1e-6, rtol=0)
    np.testing.assert_allclose(pk.numpy(), want_pk, atol=1e-6, rtol=0)
    assert m["queries"] == len(kept) and m["queries_without_images"] == len(asked) - len(kept)
    same(m, {"map": np.mean(want_ap) if kept else math.nan, f"precision@{k}": np.mean(want_pk) if kept else math.nan})


@examples(250)
@given(inputs=ranking_inputs(), k=st.integers(1, 35), chunk=st.integers(1, 35), budget=st.integers(1, 300),
       gammas=st.lists(st.sampled_from(GAMMAS), min_size=1, max_size=3, unique=True))
def test_topk_tags_matches_brute_force(inputs, k, chunk, budget, gammas):
    u, table, lc, _, _ = inputs
    v = table.shape[0]
    out = scoring.topk_tags(f32(u), f32(table), f32(lc), gammas, k, chunk=chunk, budget=budget)
    assert sorted(out) == sorted(gammas)
    for g in gammas:
        S = u @ table.T + g * lc[None, :]
        scores, ids = out[g]
        assert scores.shape == ids.shape == (u.shape[0], min(k, v))
        for i in range(u.shape[0]):
            assert len(set(ids[i].tolist())) == ids.shape[1]  # k distinct tags
            assert scores[i].tolist() == [S[i, t] for t in ids[i].tolist()]  # each with its own score
            assert scores[i].tolist() == sorted(S[i], reverse=True)[: ids.shape[1]]  # the k best, best first


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


@examples(250)
@given(inputs=ranking_inputs(), where=st.sampled_from(["u", "table", "log_counts", "gamma"]), bad=NON_FINITE,
       fn=st.sampled_from(["rank_tags", "rank_prior", "retrieval", "topk"]), pos=st.integers(0, 10**6))
def test_ranking_refuses_nan_and_inf(inputs, where, bad, fn, pos):
    u, table, lc, gamma, truths = inputs
    takes = {"rank_tags": {"u", "table", "log_counts", "gamma"}, "rank_prior": {"log_counts"},
             "retrieval": {"u", "table"}, "topk": {"u", "table", "log_counts", "gamma"}}[fn]
    if where not in takes:
        where = sorted(takes)[pos % len(takes)]
    args = {"u": u.copy(), "table": table.copy(), "log_counts": lc.copy()}
    if where == "gamma":
        gamma = bad
    else:
        args[where].flat[pos % args[where].size] = bad
    u_, t_, lc_ = (f32(args[x]) for x in ("u", "table", "log_counts"))
    tr = [torch.tensor(t) for t in truths]
    with pytest.raises(BadValue, match="NaN or infinite"):
        if fn == "rank_tags":
            ranking.rank_tags(u_, t_, lc_, gamma, tr)
        elif fn == "rank_prior":
            ranking.rank_prior(lc_, tr)
        elif fn == "retrieval":
            ranking.retrieval_metrics(u_, t_, tr[0])
        else:
            scoring.topk_tags(u_, t_, lc_, [0.5, gamma], 3, chunk=2, budget=4)


@examples(150)
@given(inputs=ranking_inputs(), scale=st.sampled_from([1e18, 1e19, 1e20, 3e38]), fn=st.sampled_from(["rank_tags", "retrieval", "topk"]))
def test_ranking_scores_that_overflow_are_refused_not_ranked(inputs, scale, fn):
    """Finite inputs whose scores overflow float32 (a diverged model): refused like NaN inputs, or
    ranked with finite scores only, never a ranking of inf/NaN scores."""
    u, table, lc, gamma, truths = inputs
    u_, t_, lc_ = f32(u * scale), f32(table * scale), f32(lc)
    tr = [torch.tensor(t) for t in truths]
    cols = sorted({int(t) for t in truths[0].flat if t != PAD}) if fn == "retrieval" else list(range(table.shape[0]))
    try:
        if fn == "rank_tags":
            r = ranking.rank_tags(u_, t_, lc_, gamma, tr)
            finite = all(torch.isfinite(x).all() for x in r.true_scores)
        elif fn == "retrieval":
            _, ap, pk = ranking.retrieval_metrics(u_, t_, tr[0])
            finite = bool(torch.isfinite(ap).all() and torch.isfinite(pk).all())
        else:
            scores, _ = scoring.topk_tags(u_, t_, lc_, [gamma], 3, chunk=4, budget=8)[gamma]
            finite = bool(torch.isfinite(scores).all())
    except BadValue as e:
        assert "NaN or infinite" in str(e)
        return
    S = (u_.double() @ t_.double().T).numpy()[:, cols]  # the scores the function ranks
    assert finite and np.isfinite(S.astype(np.float32)).all()


# ============================================================================ regressions found by this suite


def test_collection_deeply_nested_jsonl_line_is_a_bad_line(tmp_path):
    """json.loads raises RecursionError (not a ValueError) past its depth: one bad_line, not a crash."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(nested(100_000) + b"\n" + b'{"image": "a.jpg", "tags": ' + nested(5000, b'"sea"') + b"}\n")
    items = list(ingest.collection_samples(ingest.Settings(source="collection", inputs=[str(manifest)]), None))
    assert [x.reason for x in items] == ["bad_line", "bad_line"]


@pytest.mark.parametrize("option", ["--root", "--out"])
def test_cli_ingest_paths_that_are_not_utf8(option):
    """A POSIX file name need not be UTF-8 (Python reads it with surrogate escapes): ingest.json and the
    summary are still written, no UnicodeEncodeError."""
    argv = ["collection", "m.jsonl", "--out", "out", "--quiet", "--workers", "0", option, "r\udcff"]
    code, stderr = run_in_tmp(lambda a: run_cli(ingest.main, a, exit=False), argv)
    check_status(code, stderr)
    assert code == 0


def test_cli_ingest_out_folder_with_a_broken_ingest_json():
    """An output folder whose ingest.json is not json (a stray file, a crash mid-write by another tool):
    one line, status 2."""
    def call(argv):
        Path("out").mkdir()
        Path("out/ingest.json").write_text("not json", encoding="utf-8")
        return run_cli(ingest.main, argv, exit=False)

    code, stderr = run_in_tmp(call, ["collection", "m.tsv", "--out", "out", "--quiet", "--workers", "0"])
    check_status(code, stderr)
    assert code == 2 and "ingest.json" in stderr
