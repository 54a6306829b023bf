"""The vocabulary: a plain TSV ``tag<TAB>count`` sorted by count; row i of the tag table is line i."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch


class Vocabulary:
    def __init__(self, tags: list[str], counts: list[int]):
        if len(tags) != len(counts):
            raise ValueError("vocabulary: tags and counts differ in length")
        if not tags:
            raise ValueError("vocabulary is empty")
        self.tags = tags
        self.counts = torch.tensor(counts, dtype=torch.long)  # (V,)
        self.index = {t: i for i, t in enumerate(tags)}

    def __len__(self) -> int:
        return len(self.tags)

    def fingerprint(self) -> str:
        """A short hash of the tag list, stored in checkpoints to refuse resuming with another vocabulary."""
        return hashlib.sha1("\n".join(self.tags).encode()).hexdigest()[:16]

    def ids(self, tags: Iterable[str]) -> list[int]:
        """In-vocabulary ids of ``tags`` (unknown tags dropped, duplicates kept once, order kept)."""
        return list(dict.fromkeys(self.index[t] for t in tags if t in self.index))

    @classmethod
    def from_tag_lists(cls, tag_lists: Iterable[Iterable[str]], min_count: int = 1, max_size: int | None = None):
        counter = Counter(t for tags in tag_lists for t in set(tags))
        items = sorted(((t, c) for t, c in counter.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0]))
        items = items[:max_size] if max_size else items
        return cls([t for t, _ in items], [c for _, c in items])

    @classmethod
    def load(cls, path: str | os.PathLike, max_size: int | None = None, min_count: int = 1) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        tags, counts = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError(f"{path}:{n}: expected 'tag<TAB>count', got {line.rstrip()!r}")
                if int(parts[1]) < min_count or (max_size and len(tags) >= max_size):
                    break  # sorted by count: nothing after this line survives the cut
                tags.append(parts[0])
                counts.append(int(parts[1]))
        return cls(tags, counts)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for t, c in zip(self.tags, self.counts.tolist()):
                f.write(f"{t}\t{c}\n")
