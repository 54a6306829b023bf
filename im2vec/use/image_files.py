"""Image files as the Tagger and its folder commands (im2vec.use.predict) read them: one file as evaluation sees
it (``read_image``; ``BadImage`` when it cannot be read), and a folder of them as plain generator stages: the
image files under it, each one read or skipped and counted by reason, in batches."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from torch import Tensor

from im2vec.data.images import MAX_PIXELS, TooLarge, open_image
from im2vec.data.samples import eval_view, to_uint8_tensor
from im2vec.errors import NotFound

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})  # what the folder commands read


class BadImage(ValueError):
    """An image file that cannot be read; ``reason`` is 'too_large' or 'bad_image'."""

    def __init__(self, message: str, reason: str = "bad_image"):
        super().__init__(message)
        self.reason = reason


def read_image(path: str | os.PathLike, size: int, max_pixels: int = MAX_PIXELS) -> Tensor:
    """An image file as evaluation sees it: (3, size, size) uint8, resized and center-cropped."""
    try:
        img = open_image(Path(path).read_bytes(), max_pixels)
        return to_uint8_tensor(eval_view(img, size))
    except TooLarge as e:
        raise BadImage(f"{path}: too large to decode ({e})", "too_large") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises many kinds on bad bytes
        raise BadImage(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


# ---- a folder of images, as plain generator stages
def find_images(folder: Path) -> tuple[list[Path], int]:
    """Every file under ``folder`` with an image suffix (sorted), and how many other files there are."""
    if not folder.is_dir():
        raise NotFound(f"{folder}: not a folder", "give the folder of images to read")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, len(files) - len(images)


def read_images(paths: Iterable[Path], size: int, skipped: Counter) -> Iterator[tuple[Path, Tensor]]:
    """(path, (3, S, S) uint8) for every readable image; the others are counted in ``skipped`` by reason."""
    for p in paths:
        try:
            yield p, read_image(p, size)
        except BadImage as e:
            skipped[e.reason] += 1


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch

