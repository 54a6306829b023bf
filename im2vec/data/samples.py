"""One sample from a shard to a training or evaluation view: its json read and checked (``read_meta``), its
image decoded, cropped and resized (``crop_box``, ``train_view``, ``eval_view``), made a uint8 tensor and,
on the trunk's device, normalized (``normalize``); ``_Samples`` is the stage that does it in a loader
worker, counting what it skips by reason (``SKIP_REASONS``)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from im2vec.data.images import MAX_PIXELS, TooLarge, open_image, to_rgb
from im2vec.data.shards import user_of
from im2vec.data.vocab import Vocabulary
from im2vec.errors import BadValue, UserError
from im2vec.tags import PAD

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


SKIP_READ, SKIP_IMAGE, SKIP_NO_TAG, SKIP_TOO_LARGE, SKIP_BAD_META = 0, 1, 2, 3, 4


# truncated/unreadable tar; corrupt image; no in-vocabulary tag; decompression bomb; no/bad json or tag list
SKIP_REASONS = ("read_error", "bad_image", "no_tag", "too_large", "bad_meta")


MAX_BAD_DRAWS = 200  # this many shards in a row without one readable sample: stop with an error, not a hang
MAX_UNUSABLE = 20_000  # this many samples read past the shuffle buffer without one usable: stop and say why


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


MAX_META_BYTES = 1 << 20  # a sample's json: larger is not metadata (bad_meta), and is never parsed


DECODES = ("cpu", "gpu")  # data.decode: where JPEGs are decoded (gpu: im2vec.data.gpu_decode)


def crop_box(w: int, h: int, rng: random.Random, min_scale: float = 0.35,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (x, y, width, height): a random area fraction in [min_scale, 1] with a
    random aspect ratio; the randomness comes from ``rng`` so the stream owns it (exact resume)."""
    for _ in range(10):
        area = w * h * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    return 0, 0, w, h  # fall back to the whole image


def train_view(img: Image.Image, size: int, rng: random.Random, min_scale: float = 0.35,
               draft: bool = True) -> Image.Image:
    """A random-resized crop of an opened (not yet decoded) image, size×size, flipped half the time.

    The box is drawn first, from the header's size; then a JPEG is decoded at the smallest scale
    (1/8, 1/4, 1/2) that still leaves the box at least size×size, so reduced-size decoding never
    costs resolution. Crop and resize are one PIL call."""
    w, h = img.size
    x, y, cw, ch = crop_box(w, h, rng, min_scale)
    if draft:
        img.draft("RGB", (math.ceil(w * size / cw), math.ceil(h * size / ch)))
    sx, sy = img.width / w, img.height / h  # the scale the decoder chose (1 if none)
    box = (x * sx, y * sy, (x + cw) * sx, (y + ch) * sy)
    out = to_rgb(img).resize((size, size), Image.BILINEAR, box=box, reducing_gap=2.0)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def eval_view(img: Image.Image, size: int, rng: random.Random | None = None, draft: bool = True) -> Image.Image:
    """Resize the shorter side to ``size`` and take the central square (evaluation), decoding a JPEG
    at the smallest scale that keeps the shorter side ≥ size."""
    if draft:
        img.draft("RGB", (size, size))
    w, h = img.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return to_rgb(img).resize((size, size), Image.BILINEAR, box=box, reducing_gap=2.0)


def check_decode(decode: str) -> str:
    """``decode`` if it is one of DECODES, else a one-line BadValue."""
    if decode not in DECODES:
        raise BadValue(f"data.decode={decode!r}", "use cpu (JPEGs decoded in the loader workers) or gpu "
                       "(the workers pass JPEGs encoded, decoded in batches on the trunk's device)")
    return decode


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S) uint8


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32, ImageNet-normalized, on the images' device: batches travel as
    uint8 (a quarter of the bytes) and are normalized where the trunk runs. The constants are made
    once per device (a fresh ``torch.tensor(..., device=cuda)`` per batch is a blocking copy)."""
    if images.device not in _MEAN_STD:
        _MEAN_STD[images.device] = (torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255,
                                    torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255)
    mean, std = _MEAN_STD[images.device]
    return (images.float() - mean) / std


def _pad(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(1, max(map(len, rows)))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def read_meta(sample: dict) -> dict:
    """A sample's json as a dict with a "tags" list (and "clean_tags", where present, a list); raises one of
    META_ERRORS on anything else (no json, one too large, not UTF-8, not an object, no tag list)."""
    raw = sample["json"]
    if not isinstance(raw, (bytes, str)) or len(raw) > MAX_META_BYTES:
        raise ValueError("no json, or one too large to be metadata")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise TypeError("the json is not an object")
    if not isinstance(meta["tags"], list) or not isinstance(meta.get("clean_tags") or [], list):
        raise TypeError("tags and clean_tags must be lists")
    return meta


META_ERRORS = (KeyError, ValueError, TypeError, RecursionError)  # what read_meta raises: a bad_meta skip


def _worker_id() -> int:
    """This DataLoader worker's index (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return info.id if info else 0


class _Samples:
    """The stages after tar reading, sharing one skip counter per process."""

    payloads = IMAGE_EXTS  # the sample's member that ``image`` reads (im2vec.train.features: the stored features)

    def __init__(self, vocab: Vocabulary, transform, size: int, seed: int, max_pixels: int = MAX_PIXELS,
                 draft: bool = True, rank: int = 0, user_uses: dict[str, float] | None = None,
                 max_unusable: int | None = None):
        self.vocab, self.transform, self.size, self.seed, self.rank = vocab, transform, size, seed, rank
        self.max_pixels, self.draft = max_pixels, draft
        self.user_uses = user_uses or {}  # uploader -> expected uses of each sample of theirs a pass (user_uses)
        self.skipped = [0] * len(SKIP_REASONS)
        self.draws_without_sample = 0
        # samples read since the last usable one: past max_unusable (the shuffle buffer's lag + MAX_UNUSABLE)
        # the stream is all skips (a vocabulary of other shards, every image corrupt): stop and say why
        self.read_since_usable, self.max_unusable = 0, max_unusable

    def read_error(self, exn: Exception) -> bool:
        """Count a tar that cannot be read (on) once, and go on with the next: never fatal.

        webdataset calls this handler twice for one truncated tar: inside the tar (the message
        ends in " @ <file>") and again when the stopped tar surfaces. Stopping at the first call
        (a tar stream cannot be read past a bad block anyway) leaves nothing for the second."""
        self.skipped[SKIP_READ] += 1
        inside_tar = bool(exn.args) and " @ " in str(exn.args[0])
        return not inside_tar

    def drawn(self) -> None:
        """One more shard drawn: a stream whose shards are all unreadable stops here instead of hanging."""
        self.draws_without_sample += 1
        if self.draws_without_sample > MAX_BAD_DRAWS:
            raise UserError(f"data: {MAX_BAD_DRAWS} shards drawn in a row without one readable sample (rank {self.rank})",
                            "are this rank's shards all truncated or empty? (python -m im2vec.bench.loader reads them)")

    def seen(self, samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            self.draws_without_sample = 0
            self.read_since_usable += 1
            if self.max_unusable is not None and self.read_since_usable > self.max_unusable:
                counts = ", ".join(f"{r} {n:,}" for r, n in zip(SKIP_REASONS, self.skipped) if n)
                raise UserError(f"data: {self.read_since_usable:,} samples read (rank {self.rank}), none usable: "
                                f"{counts or 'nothing skipped yet'}", "does data.vocab_path belong to these shards, "
                                "and are their images readable?")
            yield s

    def balanced(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Each sample as often as its uploader's expected uses say (``user_uses``: m = 2.3 is 2 or 3 times,
        0.4 is once or not at all, at random), before the shuffle buffer spreads the copies apart. Reads and
        uses match on average (the uses sum to the samples read), so balancing costs no reading: a sample
        passed over is paid for by another one used twice, never by reading on until one is kept."""
        if not self.user_uses:
            yield from samples
            return
        rng = random.Random(wds.utils.make_seed(self.seed, self.rank * 1000 + _worker_id() + 500))
        for s in samples:
            try:
                m = self.user_uses.get(user_of(read_meta(s)), 1.0)
            except META_ERRORS:
                m = 1.0  # decode counts it (bad_meta)
            n = int(m)
            for _ in range(n + (rng.random() < m - n)):
                yield s

    def decode(self, samples: Iterator[dict]) -> Iterator[dict]:
        # each sample here: {"__key__", "jpg"|"png"|…: bytes, "json": bytes}
        rng = random.Random(wds.utils.make_seed(self.seed, self.rank * 1000 + _worker_id()))
        for s in samples:
            # Whatever is in a sample's json (any type at any depth, any size, bytes that are not UTF-8,
            # NUL characters), it is a sample or one skip: tested by a property-based fuzz (tests/test_fuzz.py)
            try:
                meta = read_meta(s)
                tags, clean_ids = self.vocab.ids(meta["tags"]), self.vocab.ids(meta.get("clean_tags") or [])
                user = user_of(meta)
            except META_ERRORS:  # no json, bad json, no tag list
                self.skipped[SKIP_BAD_META] += 1
                continue
            if not tags:
                self.skipped[SKIP_NO_TAG] += 1
                continue
            try:
                x = self.image(next(s[e] for e in self.payloads if e in s), rng)
            except TooLarge:
                self.skipped[SKIP_TOO_LARGE] += 1
                continue
            except Exception:  # noqa: BLE001 -- PIL raises many kinds on bad bytes; none may stop training
                self.skipped[SKIP_IMAGE] += 1
                continue
            # each sample here: (image (3, S, S) uint8, tag ids, clean tag ids, key, uploader)
            self.read_since_usable = 0
            yield x, tags, clean_ids, s["__key__"], user

    def image(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """A sample's image as its batch carries it: here decoded, (3, S, S) uint8 (gpu_decode.EncodedSamples
        leaves JPEGs encoded). Raises on bytes that are no readable image; TooLarge on a decompression bomb."""
        img = open_image(data, self.max_pixels)
        return to_uint8_tensor(self.transform(img, self.size, rng, draft=self.draft))

    def collate(self, items: list[tuple]) -> dict:
        skipped, self.skipped = torch.tensor(self.skipped), [0] * len(SKIP_REASONS)
        images, tags, clean, keys, users = zip(*items)
        return {"image": torch.stack(images), "tags": _pad(list(tags)), "clean": _pad(list(clean)),
                "skipped": skipped, "keys": list(keys), "users": list(users)}
