"""Pretrained word vectors for tags: word2vec text and binary files, GloVe text files, read in one stream.

``read_vectors(path, words)`` keeps only the vectors of ``words``: memory grows with the vocabulary asked
for, not with the file (a 3M-word GoogleNews file is read for a 600k-tag vocabulary in one pass). Words in
the file are matched after the same normalization the YFCC ingest applies to tags (NFKC, lowercase,
trimmed: ``im2vec.data.yfcc.normalize_tag``); the first vector of a word wins.

Formats (``fmt="auto"`` decides from the file itself):

- word2vec text: a header line ``<count> <dim>``, then ``word v1 … vd`` per line;
- word2vec binary: the same header, then per word ``word<space>`` and d little-endian float32, with or
  without a newline after each record;
- GloVe text: no header, ``word v1 … vd`` per line (d taken from the first line; a word may contain
  spaces, as in GloVe 840B: the last d fields are the vector).

A line that does not parse (wrong number of values, not numbers, bytes that are not UTF-8) is skipped and
counted, never fatal; a file with no readable vector at all, or a header that is not a header, is a
one-line error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from im2vec.errors import BadValue, NotFound
from im2vec.tags import normalize_tag

TEXT_BYTES = set(b"0123456789.-+eEinfaINFA \t\r\n")  # what a text file's numbers are made of


@dataclass
class WordVectors:
    rows: torch.Tensor  # (n,) indices into the ``words`` asked for
    vectors: torch.Tensor  # (n, dim) float32
    dim: int
    fmt: str
    read: int = 0  # vectors read from the file
    skipped: int = 0  # lines that did not parse
    missing: list[str] = field(default_factory=list)  # asked-for words the file does not have


def detect_format(path: str | os.PathLike) -> str:
    """'word2vec_bin', 'word2vec_text' or 'glove' from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.readline(1 << 16)
        parts = head.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            dim = int(parts[1])
            word = f.read(1 << 12).split(b" ", 1)
            if len(word) < 2:
                return "word2vec_text"
            body = word[1][: 4 * dim]
            return "word2vec_text" if set(body) <= TEXT_BYTES else "word2vec_bin"
    return "glove"


def read_vectors(path: str | os.PathLike, words: list[str], fmt: str = "auto") -> WordVectors:
    """The vectors of ``words`` found in the file at ``path`` (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFound(f"model.tag_vectors: no file {path}", "pass a word2vec (.txt/.bin) or GloVe text file")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in ("word2vec_text", "word2vec_bin", "glove"):
        raise BadValue(f"word vectors format {fmt!r}", "use auto, word2vec_text, word2vec_bin or glove")
    want: dict[str, int] = {}
    for i, w in enumerate(words):
        want.setdefault(normalize_tag(w), i)
    got: dict[int, np.ndarray] = {}
    read = skipped = 0
    with open(path, "rb") as f:
        dim = None
        if fmt != "glove":
            header = f.readline().split()
            if len(header) != 2 or not all(h.isdigit() for h in header):
                raise BadValue(f"{path}: the first line is not a word2vec header '<count> <dim>'",
                               "pass fmt=glove for a file without one")
            dim = int(header[1])
            if dim < 1:
                raise BadValue(f"{path}: the header says {dim} dimensions", "is the file a word2vec file?")
        records = _binary(f, dim) if fmt == "word2vec_bin" else _text(f, dim)
        for word, vec in records:
            if vec is None:
                skipped += 1
                continue
            if dim is None:
                dim = vec.shape[0]
            if vec.shape[0] != dim:
                skipped += 1
                continue
            read += 1
            i = want.get(normalize_tag(word))
            if i is not None and i not in got:
                got[i] = vec
    if not read:
        raise BadValue(f"{path}: not one readable vector ({skipped:,} lines skipped)",
                       "is it a word2vec or GloVe file, and is fmt right?")
    rows = sorted(got)
    vectors = torch.from_numpy(np.stack([got[i] for i in rows])) if rows else torch.empty(0, dim)
    found = set(rows)
    return WordVectors(torch.tensor(rows, dtype=torch.long), vectors.float(), dim, fmt, read, skipped,
                       [w for i, w in enumerate(words) if i not in found])


def _text(f, dim: int | None):
    """(word, vector) per line; without a header the first line that parses fixes d."""
    for line in f:
        fields = line.rstrip(b"\r\n").split(b" ")
        while fields and fields[-1] == b"":
            fields.pop()
        n = dim if dim is not None else len(fields) - 1
        if n < 1 or len(fields) < n + 1:
            yield "", None
            continue
        try:
            word = b" ".join(fields[:-n]).decode("utf-8")
            vec = np.array([float(x) for x in fields[-n:]], dtype=np.float32)
        except (UnicodeDecodeError, ValueError):
            yield "", None
            continue
        if not word or not np.isfinite(vec).all():
            yield "", None
            continue
        dim = n
        yield word, vec


def _binary(f, dim: int, chunk: int = 1 << 20):
    """(word, vector) per record, read through a buffer (not a byte at a time: a 3M-word file is 3.6 GB)."""
    size = 4 * dim
    buf, pos, eof = b"", 0, False
    while True:
        space = buf.find(b" ", pos)
        while (space < 0 or len(buf) - space - 1 < size) and not eof:  # the word and its vector in the buffer
            more = f.read(max(chunk, size + 1))
            eof = not more
            buf, pos = buf[pos:] + more, 0
            space = buf.find(b" ", pos)
        word = buf[pos:space if space >= 0 else len(buf)].lstrip(b"\n")  # some writers end each record in \n
        if space < 0 or len(buf) - space - 1 < size:
            if word.strip():
                yield "", None  # a word with no (whole) vector: the file was cut short
            return
        data = buf[space + 1:space + 1 + size]
        pos = space + 1 + size
        try:
            text = word.decode("utf-8")
        except UnicodeDecodeError:
            yield "", None
            continue
        vec = np.frombuffer(data, dtype="<f4").copy()
        yield (text, vec) if text and np.isfinite(vec).all() else ("", None)
