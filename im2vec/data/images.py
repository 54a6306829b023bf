"""Opening and converting images, shared by the ingest and the loader (no torch here)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold; larger images are skipped, not decoded


class TooLarge(ValueError):
    """An image whose header claims more pixels than ``max_pixels`` (a decompression bomb)."""


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read the header only; a decompression bomb is refused before any pixel is decoded.

    ``max_pixels`` is honoured above PIL's own limit too: PIL refuses an image of more than twice
    ``Image.MAX_IMAGE_PIXELS`` (≈179M pixels) by itself, at open and again while decoding some formats,
    so that limit is raised to ``max_pixels`` in this process when it is lower (never lowered: the check
    below is the one that applies to each call)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > limit:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():  # PIL warns past its limit; the check below refuses such images anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise TooLarge(str(e)) from None
    if img.width * img.height > max_pixels:
        raise TooLarge(f"{img.width}x{img.height} pixels > max_pixels={max_pixels}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Decoded, in 8-bit RGB; no copy when it already is (convert would copy a full-size image).

    16-bit and float images are scaled to 8 bits first: PIL's convert would clip them (a 16-bit
    PNG comes out almost white). Transparent pixels are laid on white: ``convert("RGB")`` would keep
    whatever colour they happen to store (often black), so a drawing on a transparent background
    (clip art, icons, logos) would come out as a black square."""
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I") else max(float(a.max()), 1e-12)
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8))
    return img.convert("RGB")
