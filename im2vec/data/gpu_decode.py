"""``data.decode=gpu``: the loader workers leave JPEGs encoded; ``finish_batch`` decodes them on the trunk's device.

In a worker, a JPEG sample is only opened (its header read, as the CPU path does before decoding), its
crop box and flip are drawn with exactly the calls of the CPU path (``train_view``: ``crop_box`` then one
``rng.random()`` for the flip; ``eval_view``: the central square, no draw), and its bytes travel on. Any
other image (png, webp, …), a CMYK JPEG, and a JPEG whose bytes do not end with the end-of-image marker
(truncated, or with data after the image) is decoded in the worker exactly as with ``decode=cpu``: the
device decoder (nvJPEG) gets only plain RGB or greyscale JPEGs, and an image the CPU path would refuse is
refused the same way, in the worker, before any device sees it.

A batch then carries, instead of "image" (B rows in all; J JPEGs, D = B - J decoded rows):

    jpeg          (N,) uint8, the J JPEGs' bytes end to end (one tensor: one shared-memory block per
                  batch between processes, not J)
    jpeg_offsets  (J + 1,) long, JPEG j is jpeg[jpeg_offsets[j]:jpeg_offsets[j + 1]]
    jpeg_rows     (J,) long, the batch row of each JPEG
    jpeg_boxes    (J, 5) long, x, y, width, height of the crop in the JPEG's own pixels, then flip (0/1)
    decoded       (D, 3, S, S) uint8, the rows decoded in the worker
    decoded_rows  (D,) long, their batch rows

and, as with ``decode=cpu``, "tags", "clean", "keys" and "skipped" for all B rows. ``finish_batch`` turns it
into the ``decode=cpu`` format ("image" (B', 3, S, S) uint8 on the device), dropping the rows whose JPEG
cannot be decoded (counted in "skipped" as bad_image).

The pixels are close to the CPU path's, not equal: the CPU path decodes at a reduced DCT scale
(``Image.draft``) and resizes with Pillow; here the JPEG is decoded at full size and the crop resized with
``torch.nn.functional.interpolate`` (bilinear, antialiased). The random draws are the same, so the same
samples, boxes and flips come out for a given seed. Except after a JPEG whose header reads and whose data
does not decode (which only decoding finds): here its row is dropped by ``finish_batch``, so its batch is a
row short where the CPU path's batch took the next sample instead (later batches' boundaries shift by one),
and the CPU path drew its crop but not its flip where this path drew both (the worker's later crops and flips
differ). The same samples are used and the same skips counted in all.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from im2vec.data.images import open_image, to_rgb
from im2vec.data.samples import SKIP_IMAGE, _pad, _Samples, crop_box, normalize, to_uint8_tensor

ENCODED_KEYS = ("jpeg", "jpeg_offsets", "jpeg_rows", "jpeg_boxes", "decoded", "decoded_rows")
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera JPEG with appended preview images; its first image is the photo
DEVICE_MODES = ("RGB", "L")  # JPEGs the device decodes; CMYK (Adobe, often inverted) is left to Pillow
EOI = b"\xff\xd9"  # a JPEG's end-of-image marker


class Encoded(NamedTuple):
    """A JPEG left encoded by a worker: its bytes and its crop (x, y, width, height, flip)."""

    data: bytes
    box: tuple[int, int, int, int, int]


def is_encoded(batch: dict) -> bool:
    """Whether ``batch`` came from a ``decode="gpu"`` loader (then ``finish_batch`` makes its "image")."""
    return "jpeg" in batch


def center_box(w: int, h: int) -> tuple[int, int, int, int, int]:
    """``eval_view``'s crop: the central square, not flipped."""
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side, side, 0


def train_box(w: int, h: int, rng: random.Random, min_scale: float) -> tuple[int, int, int, int, int]:
    """``train_view``'s crop and flip, drawn with the same calls on ``rng`` (crop_box, then one random())."""
    x, y, cw, ch = crop_box(w, h, rng, min_scale)
    return x, y, cw, ch, int(rng.random() < 0.5)


def ends_whole(data: bytes) -> bool:
    """Whether a JPEG's bytes end with the end-of-image marker (trailing padding allowed): a truncated
    one does not. Inside the entropy-coded data a 0xFF byte is always followed by 0x00 or a restart
    marker, so FF D9 at the end is the real end of the image."""
    return data[-64:].rstrip(b"\0\r\n ").endswith(EOI)


class EncodedSamples(_Samples):
    """The loader's stages with ``decode="gpu"``: JPEGs stay encoded (``Encoded``); the rest as ``_Samples``."""

    def __init__(self, *args, train: bool, min_scale: float = 0.35, **kwargs):
        super().__init__(*args, **kwargs)
        self.train, self.min_scale = train, min_scale

    def image(self, data: bytes, rng: random.Random) -> torch.Tensor | Encoded:
        img = open_image(data, self.max_pixels)  # the header only; TooLarge for a decompression bomb
        if img.format in JPEG_FORMATS and img.mode in DEVICE_MODES and ends_whole(data):
            w, h = img.size
            box = train_box(w, h, rng, self.min_scale) if self.train else center_box(w, h)
            return Encoded(bytes(data), box)
        return super().image(data, rng)  # decoded here, exactly as with decode="cpu"

    def collate(self, items: list[tuple]) -> dict:
        skipped, self.skipped = torch.tensor(self.skipped), [0] * len(self.skipped)
        images, tags, clean, keys, users = zip(*items)
        jpeg_rows = [i for i, x in enumerate(images) if isinstance(x, Encoded)]
        decoded_rows = [i for i, x in enumerate(images) if not isinstance(x, Encoded)]
        data = [images[i].data for i in jpeg_rows]
        joined = bytearray(b"".join(data))
        return {
            "jpeg": torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8),
            "jpeg_offsets": torch.tensor([0, *itertools.accumulate(map(len, data))], dtype=torch.long),
            "jpeg_rows": torch.tensor(jpeg_rows, dtype=torch.long),
            "jpeg_boxes": torch.tensor([images[i].box for i in jpeg_rows], dtype=torch.long).view(-1, 5),
            "decoded": (torch.stack([images[i] for i in decoded_rows]) if decoded_rows
                        else torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)),
            "decoded_rows": torch.tensor(decoded_rows, dtype=torch.long),
            "tags": _pad(list(tags)), "clean": _pad(list(clean)), "skipped": skipped, "keys": list(keys),
            "users": list(users),
        }


def jpegs(batch: dict) -> list[torch.Tensor]:
    """The batch's JPEGs, each a 1-D uint8 view of ``batch["jpeg"]`` (on the CPU, as decode_jpeg wants them)."""
    offsets = batch["jpeg_offsets"].tolist()
    return [batch["jpeg"][a:b] for a, b in zip(offsets, offsets[1:])]


def decode_all(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG decoded to (3, H, W) uint8 RGB on ``device``, or None where it cannot be decoded.

    One batched ``decode_jpeg`` call (nvJPEG on a CUDA device decodes the batch at once); if it raises
    (one bad JPEG fails the whole call), each is decoded alone, and one the device decoder refuses is
    tried once with Pillow (the CPU path's decoder) before it counts as bad."""
    if not encoded:
        return []
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except torch.OutOfMemoryError:
        raise  # not a bad image: the device is too small for this batch
    except RuntimeError:  # torchvision's (and nvJPEG's) decode errors
        pass
    out = []
    for data in encoded:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            out.append(_pillow(data, device))
    return out


def _pillow(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        img = to_rgb(open_image(data.numpy().tobytes()))
    except Exception:  # noqa: BLE001 -- Pillow raises many kinds on bad bytes: this image is bad
        return None
    return to_uint8_tensor(img).to(device)


def crop_resize(pixels: torch.Tensor, box: list[int], size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> the box (x, y, width, height, flip) resized to (3, size, size) uint8, bilinear and
    antialiased (as Pillow's resize), flipped left-right if asked. The box is clamped to the decoded image."""
    x, y, w, h, flip = box
    height, width = pixels.shape[-2:]
    x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
    w, h = max(1, min(w, width - x)), max(1, min(h, height - y))
    crop = pixels[:, y:y + h, x:x + w].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]
    return out.flip(-1) if flip else out


def finish_batch(batch: dict, device: torch.device | str, size: int) -> dict:
    """A ``decode="gpu"`` batch made whole on ``device``: every JPEG decoded (one batched ``decode_jpeg``),
    cropped, resized to size×size and flipped as the worker drew, placed with the worker-decoded rows in
    the batch's order.

    Returns the batch in the ``decode="cpu"`` format: "image" (B', 3, size, size) uint8 on ``device`` (not
    normalized: ``data.normalize`` does that), "tags", "clean", "keys" for the same B' rows, "skipped" with
    the rows dropped here added to bad_image; the encoded keys are gone. A JPEG that cannot be decoded
    drops its row; when every row is dropped the batch has 0 rows (image (0, 3, size, size), tags (0, T),
    keys []): the caller decides what a step on it means (skip it, but count its "skipped")."""
    device = torch.device(device)
    n = len(batch["keys"])
    decoded = batch["decoded"]
    if decoded.shape[1:] != (3, size, size):
        raise ValueError(f"finish_batch: the worker decoded {tuple(decoded.shape[1:])} images, not (3, {size}, {size})")
    image = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    ok = torch.ones(n, dtype=torch.bool)
    if len(decoded):
        image[batch["decoded_rows"].to(device)] = decoded.to(device, non_blocking=True)
    rows, boxes = batch["jpeg_rows"].tolist(), batch["jpeg_boxes"].tolist()
    for row, box, pixels in zip(rows, boxes, decode_all(jpegs(batch), device)):
        if pixels is None:
            ok[row] = False
        else:
            image[row] = crop_resize(pixels, box, size)
    out = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
    bad = n - int(ok.sum())
    if bad:
        keep = ok.nonzero().squeeze(1)
        image = image[keep.to(device)]
        out["tags"], out["clean"] = batch["tags"][keep], batch["clean"][keep]
        out["keys"] = [batch["keys"][i] for i in keep.tolist()]
        out["skipped"] = batch["skipped"].clone()
        out["skipped"][SKIP_IMAGE] += bad
    out["image"] = image
    return out


def finish_rate(batches: list[dict], device: torch.device | str, size: int, rounds: int = 3) -> dict:
    """Decode throughput of ``finish_batch`` on ``device`` over ``batches`` (already collated, on the CPU):
    {"images_per_s": best of ``rounds`` passes, "images": per pass, "rounds_s": each pass's seconds}.
    The first pass warms the device up (nvJPEG's buffers, kernels) and is not counted; each pass ends
    with a device synchronization, so the time is the decode's, not its launch's."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    images = sum(len(finish_batch(b, device, size)["keys"]) for b in batches[:1])  # warm-up
    sync()
    times = []
    for _ in range(max(1, rounds)):
        start, images = time.perf_counter(), 0
        for b in batches:
            images += len(finish_batch(b, device, size)["keys"])
        sync()
        times.append(time.perf_counter() - start)
    return {"images_per_s": images / min(times) if images else math.nan, "images": images, "rounds_s": times}


def batch_to_trunk(batch: dict, device, image_size: int) -> dict:
    """A batch on the trunk's device: its images sent as uint8 (a quarter of float32's bytes; pinned by the loader
    when the trunk is on a GPU) and normalized there; with data.decode=gpu the JPEGs themselves, decoded there
    (undecodable rows dropped and counted); in frozen-trunk mode the stored trunk features (fp16). Tag ids stay
    on the CPU for sampling."""
    if "features" in batch:
        return {**batch, "features": batch["features"].to(device, non_blocking=True)}
    if is_encoded(batch):
        batch = finish_batch(batch, device, image_size)
        return {**batch, "image": normalize(batch["image"])}
    return {**batch, "image": normalize(batch["image"].to(device, non_blocking=True))}
