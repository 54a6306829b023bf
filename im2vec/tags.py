"""What every stage agrees a tag is: one spelling per tag (``normalize_tag``), and ``PAD``, the id that fills
the unused slots of a padded (B, T) tag-id tensor. The data stage writes both, the wide part and evaluation
read them; this module imports nothing of im2vec's."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

PAD = -1


def normalize_tag(tag: str) -> str:
    """One spelling per tag: Unicode NFKC, lowercase, trimmed, inner runs of whitespace made one space."""
    return " ".join(unicodedata.normalize("NFKC", tag).lower().split())


def normalize_tags(tags: Iterable[str]) -> list[str]:
    """Normalized, empty ones dropped, duplicates kept once in their first place."""
    return list(dict.fromkeys(t for t in map(normalize_tag, tags) if t))
