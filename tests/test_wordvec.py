"""Word-vector files read against the dictionaries they were written from, in the three formats."""

import struct

import numpy as np
import pytest
import torch

from im2vec.errors import BadValue, NotFound
from im2vec.wide.wordvec import detect_format, read_vectors

rng = np.random.default_rng(0)
WORDS = ["dog", "beach", "ziegel", "hierba", "new york", "café", "x"]
VECS = {w: rng.standard_normal(5).astype(np.float32) for w in WORDS}


def write_text(path, vecs, header=True, extra=()):
    lines = [f"{len(vecs)} 5"] if header else []
    lines += [w + " " + " ".join(repr(float(x)) for x in v) for w, v in vecs.items()]
    path.write_bytes(("\n".join([*lines, *extra]) + "\n").encode())


def write_bin(path, vecs, newline=True, cut=0):
    out = f"{len(vecs)} 5\n".encode()
    for w, v in vecs.items():
        out += w.encode() + b" " + struct.pack("<5f", *v) + (b"\n" if newline else b"")
    path.write_bytes(out[: len(out) - cut])


def check(got, asked):
    want = [i for i, w in enumerate(asked) if w.lower() in VECS]
    assert got.rows.tolist() == want
    for r, v in zip(got.rows.tolist(), got.vectors):
        torch.testing.assert_close(v, torch.from_numpy(VECS[asked[r].lower()]), rtol=0, atol=0)
    assert got.missing == [w for w in asked if w.lower() not in VECS]
    assert got.dim == 5


ASKED = ["beach", "Dog", "unknown", "café", "x"]  # "Dog": matched after normalization


@pytest.mark.parametrize("kind", ["word2vec_text", "glove", "word2vec_bin", "word2vec_bin_no_newline"])
def test_formats_read_what_was_written(tmp_path, kind):
    p = tmp_path / "v"
    if kind == "word2vec_text":
        write_text(p, {w: v for w, v in VECS.items() if " " not in w})
    elif kind == "glove":
        write_text(p, VECS, header=False)
    else:
        write_bin(p, {w: v for w, v in VECS.items() if " " not in w}, newline=kind == "word2vec_bin")
    assert detect_format(p) == kind.replace("_no_newline", "")
    got = read_vectors(p, ASKED)
    check(got, ASKED)
    assert got.skipped == 0


def test_glove_words_with_spaces(tmp_path):
    p = tmp_path / "g.txt"
    write_text(p, VECS, header=False)
    got = read_vectors(p, ["new york"])
    torch.testing.assert_close(got.vectors[0], torch.from_numpy(VECS["new york"]))


def test_bad_lines_are_skipped_and_counted(tmp_path):
    p = tmp_path / "g.txt"
    write_text(p, VECS, header=False, extra=["short 1 2", "nan_word nan 1 2 3 4", "words a b c d e"])
    p.write_bytes(p.read_bytes() + b"\xff\xfe 1 2 3 4 5\n")
    got = read_vectors(p, ASKED, fmt="glove")
    check(got, ASKED)
    assert got.skipped == 4 and got.read == len(VECS)


def test_a_cut_binary_file_keeps_what_came_before(tmp_path):
    p = tmp_path / "v.bin"
    one_word = {w: v for w, v in VECS.items() if " " not in w}  # word2vec's binary words hold no space
    write_bin(p, one_word, cut=7)  # the last record is cut inside its vector
    got = read_vectors(p, list(one_word), fmt="word2vec_bin")
    assert got.skipped == 1 and got.read == len(one_word) - 1 and got.missing == [list(one_word)[-1]]


def test_the_first_vector_of_a_word_wins(tmp_path):
    p = tmp_path / "g.txt"
    write_text(p, VECS, header=False, extra=["DOG 9 9 9 9 9"])
    got = read_vectors(p, ["dog"])
    torch.testing.assert_close(got.vectors[0], torch.from_numpy(VECS["dog"]))


def test_clear_errors(tmp_path):
    with pytest.raises(NotFound):
        read_vectors(tmp_path / "none.txt", ["dog"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(BadValue, match="not one readable vector"):
        read_vectors(empty, ["dog"])
    bad = tmp_path / "bad.txt"
    bad.write_text("hello world\n")
    with pytest.raises(BadValue, match="word2vec header"):
        read_vectors(bad, ["dog"], fmt="word2vec_text")
    with pytest.raises(BadValue, match="format"):
        read_vectors(empty, ["dog"], fmt="fasttext")


def test_generated_corpus_vectors_put_synonyms_close(tmp_path):
    """The corpus's word vectors: a concept's names in its four languages are close, other pairs are not;
    read back through read_vectors."""
    from im2vec.data.corpus import COLOURS, SCENES, SHAPES, write_word_vectors

    groups = [names for g in (COLOURS, SHAPES, SCENES) for names in g.values()]
    noise = ["canon", "2015", "photo", "my_gear_and_me"]
    words = [n for names in groups for n in names] + noise
    p = write_word_vectors(tmp_path / "vectors.txt", words, dim=50)
    got = read_vectors(p, words)
    assert got.missing == [] and got.dim == 50
    v = torch.nn.functional.normalize(got.vectors, dim=1)
    cos = v @ v.t()
    index = {w: i for i, w in enumerate(words)}
    same = [cos[index[a], index[b]] for names in groups for a in names for b in names if a < b]
    other = [cos[index[a[0]], index[b[0]]] for a in groups for b in groups if a is not b]
    other += [cos[index[n], index[names[0]]] for n in noise for names in groups]
    assert min(same) > 0.6 and max(other) < 0.6  # every synonym pair closer than any unrelated pair
    assert float(torch.stack(same).mean()) > 0.85 and abs(float(torch.stack(other).mean())) < 0.1
    # stable: the same words give the same file
    q = write_word_vectors(tmp_path / "again.txt", list(reversed(words)), dim=50)
    assert sorted(p.read_text().splitlines()) == sorted(q.read_text().splitlines())


def test_binary_records_across_buffer_boundaries(tmp_path):
    """Many records read through a buffer smaller than a few records: every one comes back exactly."""
    from im2vec.wide import wordvec

    vecs = {f"w{i}": rng.standard_normal(5).astype(np.float32) for i in range(500)}
    p = tmp_path / "many.bin"
    out = b"500 5\n" + b"".join(w.encode() + b" " + struct.pack("<5f", *v) + b"\n" for w, v in vecs.items())
    p.write_bytes(out)
    with open(p, "rb") as f:
        f.readline()
        records = list(wordvec._binary(f, 5, chunk=37))
    assert [w for w, _ in records] == list(vecs)
    for (w, v) in records:
        assert np.array_equal(v, vecs[w])
