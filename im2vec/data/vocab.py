"""The vocabulary: a plain TSV ``tag<TAB>count`` sorted by count; row i of the tag table is line i."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from im2vec.errors import BadValue, NotFound, run_cli

_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of bytes that are not UTF-8
MAX_COUNT = 2**63 - 1  # counts are held as int64


def _count(text: str) -> int | None:
    """A count: decimal digits whose value fits an int64; else None."""
    if not text.isdigit():
        return None
    try:
        count = int(text)  # refuses digits int() does not read ('²') and numbers past Python's 4300 digits
    except ValueError:
        return None
    return count if count <= MAX_COUNT else None


class Vocabulary:
    def __init__(self, tags: list[str], counts: list[int]):
        if len(tags) != len(counts):
            raise ValueError("vocabulary: tags and counts differ in length")
        if not tags:
            raise BadValue("vocabulary is empty", "build one with python -m im2vec.data.vocab")
        self.tags = tags
        self.counts = torch.tensor(counts, dtype=torch.long)  # (V,)
        self.index = {t: i for i, t in enumerate(tags)}
        self.held_out: dict[str, int] = {}  # tags excluded by ``load`` and their counts

    def __len__(self) -> int:
        return len(self.tags)

    def fingerprint(self) -> str:
        """A short hash of the tag list, stored in checkpoints to refuse resuming with another vocabulary."""
        return hashlib.sha1("\n".join(self.tags).encode()).hexdigest()[:16]

    def without_positives(self, tags: Iterable[str]) -> "Vocabulary":
        """The same rows, counts and fingerprint, but ``ids`` no longer finds ``tags``: a training loader built on
        it never gives them to an image, so they are drawn only as negatives (data.visual_use=negatives)."""
        view = Vocabulary.__new__(Vocabulary)
        view.__dict__.update(self.__dict__)
        drop = set(tags)
        view.index = {t: i for t, i in self.index.items() if t not in drop}
        return view

    def ids(self, tags: Iterable[str]) -> list[int]:
        """In-vocabulary ids of ``tags`` (unknown tags dropped, duplicates kept once, order kept)."""
        return list(dict.fromkeys(self.index[t] for t in tags if t in self.index))

    @classmethod
    def from_tag_lists(cls, tag_lists: Iterable[Iterable[str]], min_count: int = 1, max_size: int | None = None):
        return from_counts(Counter(t for tags in tag_lists for t in set(tags)), min_count, max_size)

    @classmethod
    def load(cls, path: str | os.PathLike, max_size: int | None = None, min_count: int = 1,
             exclude: Iterable[str] = ()) -> "Vocabulary":
        """``exclude``: tags kept out (zero-shot evaluation holds some out of training); their counts in the
        file are kept in ``held_out`` ({tag: count}, the unseen tags' frequency prior)."""
        path = Path(path)
        exclude, held = set(exclude), {}
        if not path.is_file():
            raise NotFound(f"vocabulary file not found: {path}", "check data.vocab_path, or build one: "
                           "python -m im2vec.data.vocab OUT.tsv --shards 'DIR/train/*.tar'")
        tags, counts, last, cut, seen = [], [], None, False, {}
        # bytes that are not UTF-8 are read as lone surrogates, so that the line holding them can be named
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if not line.isascii() and _NOT_UTF8.search(line):
                    raise BadValue(f"{path}:{n}: not UTF-8 text: {line.rstrip()[:80]!r}",
                                   "is this a vocabulary file? python -m im2vec.data.vocab writes one (UTF-8)")
                parts = line.rstrip("\n").split("\t")
                count = _count(parts[1]) if len(parts) == 2 else None
                if count is None:
                    raise BadValue(f"{path}:{n}: expected 'tag<TAB>count', got {line.rstrip()[:80]!r}",
                                   "is this a vocabulary file? python -m im2vec.data.vocab writes one")
                if last is not None and count > last:  # the cut below assumes it: an unsorted file would be cut short
                    raise BadValue(f"{path}:{n}: count {count} after {last}: a vocabulary is sorted by count, most "
                                   "frequent first", "sort it (sort -t$'\\t' -k2,2nr) or rebuild it with python -m im2vec.data.vocab")
                if parts[0] in seen:  # two rows for one tag: ids would map to only one of them
                    raise BadValue(f"{path}:{n}: the tag {parts[0][:60]!r} again (first on line {seen[parts[0]]})",
                                   "one line per tag: rebuild it with python -m im2vec.data.vocab")
                seen[parts[0]] = n
                last = count
                if parts[0] in exclude:
                    held[parts[0]] = count
                    continue
                cut = cut or count < min_count or bool(max_size and len(tags) >= max_size)
                if not cut:  # sorted by count: nothing after the first line cut survives the cut
                    tags.append(parts[0])
                    counts.append(count)
        if not tags:
            raise BadValue(f"{path}: no tag left (an empty file, or vocab_min_count={min_count} is above every count)",
                           "lower data.vocab_min_count or rebuild the file with python -m im2vec.data.vocab")
        vocab = cls(tags, counts)
        vocab.held_out = held
        return vocab

    def save(self, path: str | os.PathLike) -> None:
        """Written under a temporary name, then renamed: a killed run leaves no half vocabulary."""
        path = Path(path)
        if path.name in ("", ".", "..") or path.is_dir():  # "", "/", "..": no temporary name beside it, no rename onto it
            raise BadValue(f"vocabulary: cannot write to {str(path)!r}: a folder, not a file", "give the file to write, e.g. vocab.tsv")
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for t, c in zip(self.tags, self.counts.tolist()):
                    f.write(f"{t}\t{c}\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write or rename leaves no temporary file behind


# ---------------------------------------------------------------- building one: a streaming count
def count_shard_tags(path: str) -> tuple[Counter, int, int]:
    """(tag counts, samples, read errors) of one shard, reading only its .json members."""
    import tarfile

    counts, samples, errors = Counter(), 0, 0
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                try:
                    tags = json.loads(tar.extractfile(member).read())["tags"]
                    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                        raise TypeError
                except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
                    errors += 1  # no json object, or no list of strings under "tags"
                    continue
                counts.update(set(tags))
                samples += 1
    except (OSError, tarfile.TarError, EOFError):  # a truncated shard: keep what was read, count it
        errors += 1
    return counts, samples, errors


def count_from_shards(paths: list[str], workers: int = 0, progress=None) -> tuple[Counter, dict]:
    counts, stats = Counter(), {"samples": 0, "read_errors": 0, "shards": len(paths)}
    pool = cf.ProcessPoolExecutor(workers) if workers > 0 else None
    results = pool.map(count_shard_tags, paths) if pool else map(count_shard_tags, paths)
    try:
        for c, n, e in results:
            counts.update(c)
            stats["samples"] += n
            stats["read_errors"] += e
            if progress:
                progress(1)
    finally:
        if pool:
            pool.shutdown()
    return counts, stats


def count_from_yfcc(paths: list[str], split: str | None, settings, progress=None) -> tuple[Counter, dict]:
    """One pass over the metadata; with ``split``, only the photos the ingest puts in that split."""
    from im2vec.data.ingest import split_of
    from im2vec.data.yfcc import Skip, parse_line, read_lines

    counts, stats = Counter(), {"photos": 0, "skipped": Counter()}
    for line in read_lines(paths, progress):
        try:
            if isinstance(line, Skip):
                raise line
            rec = parse_line(line, settings.machine_tags)
        except Skip as e:
            stats["skipped"][e.reason] += 1
            continue
        if split and split_of(rec[settings.split_by], settings.val_fraction, settings.test_fraction,
                              settings.salt) != split:
            continue
        counts.update(rec["tags"])  # already de-duplicated per photo
        stats["photos"] += 1
    stats["skipped"] = dict(stats["skipped"])
    return counts, stats


def from_counts(counts: Counter, min_count: int = 1, max_size: int | None = None) -> "Vocabulary":
    items = sorted(((t, c) for t, c in counts.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0]))
    items = items[:max_size] if max_size else items
    if not items:
        raise BadValue(f"vocabulary: no tag is seen {min_count} times or more", "lower --min-count")
    return Vocabulary([t for t, _ in items], [c for _, c in items])


def main(argv: list[str] | None = None) -> Vocabulary:
    import sys

    from tqdm import tqdm

    from im2vec.data.ingest import Settings
    from im2vec.errors import ArgumentParser

    ap = ArgumentParser(prog="python -m im2vec.data.vocab",
                                 description="Count tags in one streaming pass and write tag<TAB>count, sorted by count.")
    ap.add_argument("out", help="the vocabulary file to write (.tsv)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", help="shards (globs or brace patterns), e.g. 'data/yfcc/train/*.tar'")
    src.add_argument("--yfcc", nargs="+", help="YFCC100M metadata file(s), plain or .bz2")
    ap.add_argument("--split", choices=("train", "val", "test"), default=None,
                    help="with --yfcc: count only this split's photos (the split the ingest gives them)")
    ap.add_argument("--like", default=None, help="with --yfcc: an ingest output folder whose split settings to use")
    ap.add_argument("--split-by", choices=("id", "user"), default="id")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--test-fraction", type=float, default=0.01)
    ap.add_argument("--machine-tags", action="store_true")
    ap.add_argument("--min-count", type=int, default=1)
    ap.add_argument("--max-size", type=int, default=None, help="keep the most frequent tags only (600000 for YFCC)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="with --shards: parallel readers")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.shards:
        from im2vec.data.shards import expand_shards

        try:
            paths = [p for spec in a.shards for p in expand_shards(spec)]
        except ValueError as e:  # braceexpand: unbalanced braces
            raise BadValue(f"vocab: --shards {' '.join(a.shards)}: {e}",
                           "check the pattern's braces, e.g. 'DIR/train/shard-{000000..000099}.tar'") from None
        if not paths:
            raise NotFound(f"vocab: no shards match {a.shards}", "check the pattern (quote it so the shell does not expand it)")
        if "" in paths:  # tarfile.open("") is a ValueError, not a shard that cannot be read
            raise BadValue(f"vocab: --shards {' '.join(map(repr, a.shards))} names an empty path", "give shard files or patterns")
        with tqdm(total=len(paths), unit="shard", desc="vocab", disable=a.quiet) as bar:
            counts, stats = count_from_shards(paths, a.workers, bar.update)
    else:
        if a.like:
            like = Path(a.like) / "ingest.json"
            try:
                saved = json.loads(like.read_text(encoding="utf-8"))
                s = Settings(**{k: saved[k] for k in ("split_by", "val_fraction", "test_fraction", "salt", "machine_tags")})
            except BadValue:
                raise
            except (ValueError, KeyError, TypeError) as e:  # not json, not an object, a key missing, a value of another type
                raise BadValue(f"vocab: --like {a.like}: {like} is not an ingest's settings ({type(e).__name__}: {e})",
                               "give an output folder of python -m im2vec.data.ingest") from None
        else:
            s = Settings(split_by=a.split_by, val_fraction=a.val_fraction, test_fraction=a.test_fraction,
                         machine_tags=a.machine_tags)
            if a.split:
                print(f"vocab: the {a.split} split as --split-by {s.split_by} --val-fraction {s.val_fraction} "
                      f"--test-fraction {s.test_fraction} (--like DIR takes an ingest's own settings)", file=sys.stderr)
        missing = [p for p in a.yfcc if not Path(p).is_file()]
        if missing:
            raise NotFound(f"vocab: metadata file not found: {missing[0]}", "check the path")
        with tqdm(total=sum(Path(p).stat().st_size for p in a.yfcc), unit="B", unit_scale=True, desc="vocab",
                  disable=a.quiet, mininterval=1.0) as bar:
            counts, stats = count_from_yfcc(a.yfcc, a.split, s, bar.update)
    vocab = from_counts(counts, a.min_count, a.max_size)
    vocab.save(a.out)
    print(f"vocab: {len(counts):,} distinct tags, {len(vocab):,} kept (min_count {a.min_count}, max_size "
          f"{a.max_size}) -> {a.out}; {json.dumps(stats)}", file=sys.stderr)
    return vocab


if __name__ == "__main__":
    run_cli(main)
