"""Shards -> batches: a webdataset pipeline written as one visible list of stages.

A training batch is a dict:
    image   (B, 3, S, S) uint8 (``normalize`` makes it float on the trunk's device)
    tags    (B, T) long, in-vocabulary tag ids, left-aligned, PAD (-1) after the last one
    clean   (B, Tc) long, the same for clean tags where the corpus has them (else all PAD)
    skipped (4,) long, samples dropped since the previous batch, by reason (SKIP_REASONS)
    keys    list[str], the samples' keys (photo ids for YFCC shards)
    users   list[str], the samples' uploaders ("" where the json names none)
With ``decode="gpu"`` the workers leave JPEGs encoded: "image" is replaced by the keys that
``im2vec.data.gpu_decode`` describes, and its ``finish_batch`` makes "image" on the trunk's device.

Every rank of a run reads its own part of the shards: rank r of w takes shards r, r+w, r+2w, …,
so no two ranks ever see the same sample; each of its DataLoader workers draws from that whole part
in its own order (training) or takes every n-th of its shards (evaluation).

The training stream is a deterministic function of (seed, epoch, rank, worker): the data module
rebuilds it every epoch (``reload_dataloaders_every_n_epochs=1``), so a run resumed from an
end-of-epoch checkpoint sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import random
import signal
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from im2vec.data.images import MAX_PIXELS, TooLarge, open_image, to_rgb
from im2vec.data.vocab import Vocabulary
from im2vec.errors import BadValue, UserError
from im2vec.wide.sampler import PAD

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


def user_of(meta: dict) -> str:
    """A sample's uploader as a string ("" where the json names none, or names one by anything but a string or a
    number: such a sample is still a sample, of no known uploader)."""
    user = meta.get("user")
    return str(user) if isinstance(user, (str, int, float)) and not isinstance(user, bool) else ""


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


def interleaved(streams: int, handler, seed: int, urls: Iterator[dict]) -> Iterator[dict]:
    """The samples of ``streams`` shards read at once, each next sample from one of them at random.

    A shard is often one slice of a sorted list (a folder of one category, one uploader's photos): read
    one shard at a time, a shuffle buffer smaller than a shard would still give batches of one slice.
    A shard that ends is replaced by the next url; every shard gives its samples at the same rate, so
    (with uniform shard draws) every sample is still used equally often."""
    rng = random.Random(wds.utils.make_seed(seed, 7 + _worker_id()))
    urls, open_ = iter(urls), []
    read = wds.tarfile_to_samples(handler=handler)
    while True:
        while len(open_) < max(1, streams):
            url = next(urls, None)
            if url is None:
                break
            open_.append(iter(read(iter([url]))))
        if not open_:
            return
        i = rng.randrange(len(open_))
        sample = next(open_[i], None)
        if sample is None:
            open_.pop(i)  # this shard is done (or unreadable: the handler counted it)
        else:
            yield sample


def _worker_shuffle(bufsize: int, seed: int, samples: Iterator[dict]) -> Iterator[dict]:
    """webdataset's shuffle buffer, seeded inside the worker so that every worker draws its own order."""
    yield from wds.shuffle(bufsize, initial=min(bufsize, 200), seed=seed + 104729 * _worker_id())(samples)


def _worker_id() -> int:
    """This DataLoader worker's index (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return info.id if info else 0


def rank_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else from torch.distributed or the RANK/WORLD_SIZE variables."""
    if rank is None or world_size is None:
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if not 0 <= rank < world_size:
        raise BadValue(f"data: rank {rank} is not in [0, {world_size})", "check RANK and WORLD_SIZE")
    return rank, world_size


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's shards: every world_size-th one, so ranks never share a sample."""
    if len(urls) < world_size:
        raise BadValue(f"data: {len(urls)} shard(s) for {world_size} ranks: every rank needs its own",
                       "write smaller shards (ingest --shard-size)")
    return urls[rank::world_size]


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Samples per shard, from the ingest's ``.stats.json`` files when every shard has one (else None)."""
    from im2vec.data.ingest import stats_name

    sizes = []
    for u in urls:
        stats = stats_name(Path(u))
        if not stats.is_file():
            return None
        sizes.append(json.loads(stats.read_text(encoding="utf-8"))["written"])
    return sizes if sum(sizes) > 0 else None


def user_counts(urls: list[str]) -> Counter:
    """Samples per uploader (the json's "user") in these shards: from the ingest's ``.stats.json``
    files when every shard's has them, else by reading the shards' json members once."""
    from im2vec.data.ingest import stats_name

    counts = Counter()
    stats = [stats_name(Path(u)) for u in urls]
    if all(p.is_file() for p in stats):
        found = [json.loads(p.read_text(encoding="utf-8")).get("users") for p in stats]
        if all(f is not None for f in found):
            for f in found:
                counts.update(f)
            return counts
    for u in urls:
        counts.update(_shard_users(u))
    return counts


def _shard_users(url: str) -> Counter:
    counts = Counter()
    try:
        with tarfile.open(url, "r|*") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    try:
                        user = user_of(json.loads(tar.extractfile(member).read()))
                    except (ValueError, AttributeError, RecursionError):
                        continue  # the loader counts such samples (bad_meta) when it meets them
                    if user:
                        counts[user] += 1
    except (OSError, tarfile.TarError, EOFError):
        pass  # a truncated shard: what was read counts; the loader counts the read error
    return counts


def user_uses(counts: Counter, temperature: float | None) -> dict[str, float]:
    """uploader -> how often each of their samples is used per pass over the data, so that uploader u's
    share of a pass is ∝ n_u^τ (τ = ``temperature``): τ = 1 is no balance (every sample once: an empty
    map), τ = 0 gives every uploader the same share, τ = 0.5 shares ∝ √n_u. The uses sum to the samples,
    so a pass uses as many samples as it reads, whatever the collection's shape (4 uploaders of 1,900
    images or 500 of a few): the prolific uploaders' samples are used less than once a pass, the others'
    more. Samples without an uploader are used once."""
    if temperature is None or temperature == 1:
        return {}
    if not 0 <= temperature <= 1:
        raise BadValue(f"data.user_temperature={temperature}", "use a number in [0, 1] (1 or null: no balance)")
    mass = {u: float(n) ** temperature for u, n in counts.items() if n > 0}
    scale = sum(counts.values()) / max(sum(mass.values()), 1e-12)
    return {u: scale * m / counts[u] for u, m in mass.items()}


def resampled_shards(urls: list[str], seed: int, rank: int = 0, stages: "_Samples | None" = None) -> Iterator[dict]:
    """An endless stream of shard urls drawn uniformly with replacement from this rank's shards, seeded
    by (seed, rank, worker): every worker of a rank draws from all of the rank's shards in its own order,
    so no worker is left with only unreadable ones. A drawn shard is read whole, so uniform draws use
    every sample equally often whatever the shards' sizes (drawing a shard in proportion to its size
    would use its samples in proportion to it: a short last shard's 5 times less than the others').

    Every call starts the same stream again (unlike wds.ResampledShards, whose seed also counts
    how often it was iterated), so a stream depends on nothing but its seed."""
    rng = random.Random(wds.utils.make_seed(seed, rank * 1000 + _worker_id()))
    while True:
        if stages is not None:
            stages.drawn()
        yield {"url": rng.choice(urls)}


def train_loader(shards: list[str], vocab: Vocabulary, image_size: int, batch_size: int, batches_per_epoch: int,
                 num_workers: int, seed: int, shuffle_buffer: int = 2000, min_scale: float = 0.35,
                 rank: int | None = None, world_size: int | None = None, max_pixels: int = MAX_PIXELS,
                 draft: bool = True, user_uses: dict[str, float] | None = None, interleave: int = 4,
                 decode: str = "cpu", pin_memory: bool = False) -> wds.WebLoader:
    """Training batches: random-resized crops and flips of images drawn endlessly from this rank's
    shards; ``batches_per_epoch`` batches on every rank (equal counts: no DDP hang). ``user_uses``
    (from ``user_uses``) says how often each uploader's samples are used a pass (uploader balance). Each
    worker reads ``interleave`` shards at once (``interleaved``). ``decode="gpu"``: JPEGs stay encoded
    with their crop box and flip drawn, for ``gpu_decode.finish_batch`` (the batch format is there)."""
    rank, world_size = rank_info(rank, world_size)
    mine = rank_shards(shards, rank, world_size)
    crop = functools.partial(train_view, min_scale=min_scale)
    stages = _samples(decode, dict(train=True, min_scale=min_scale), vocab, crop, image_size, seed, max_pixels,
                      draft, rank, user_uses, max_unusable=shuffle_buffer + MAX_UNUSABLE)
    return stream_loader(stages, mine, rank, batch_size, batches_per_epoch, num_workers, seed, shuffle_buffer,
                         interleave, pin_memory)


def stream_loader(stages: "_Samples", mine: list[str], rank: int, batch_size: int, batches_per_epoch: int,
                  num_workers: int, seed: int, shuffle_buffer: int, interleave: int, pin_memory: bool
                  ) -> wds.WebLoader:
    """The training stream of this rank's shards ``mine`` through ``stages`` (images, or stored features:
    im2vec.train.features): drawn endlessly with replacement, interleaved, shuffled, batched;
    ``batches_per_epoch`` batches an epoch."""
    pipeline = wds.DataPipeline(
        # an endless stream of this rank's shard urls, drawn with replacement (each worker its own)
        functools.partial(resampled_shards, mine, seed, rank, stages),
        # at this point each sample is {"url": ...}: read `interleave` of them at once, a sample from each in turn
        functools.partial(interleaved, interleave, stages.read_error, seed + 7919 * rank),
        stages.seen,
        # at this point each sample is {"__key__", "jpg" (or stages.payloads), "json"}: each as often as its
        # uploader's share says (uploader balance; once each without it), then shuffled
        stages.balanced,
        functools.partial(_worker_shuffle, shuffle_buffer, seed + 7919 * rank),
        stages.decode,
        # at this point each sample is (image tensor or features, tag ids, clean tag ids, key)
        wds.batched(batch_size, collation_fn=stages.collate, partial=False),
    )
    # pin_memory (a GPU trunk): batches land in page-locked memory, copied to the device without blocking
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False,
                           pin_memory=pin_memory,
                           worker_init_fn=functools.partial(worker_init, rank) if num_workers else None)
    loader = loader.with_epoch(batches_per_epoch)  # equal batch counts on every rank
    with warnings.catch_warnings():  # wds warns that a length does not cut the stream: with_epoch does
        warnings.simplefilter("ignore")
        return loader.with_length(batches_per_epoch)  # so the progress bar shows the epoch's end


def eval_loader(shards: list[str], vocab: Vocabulary, image_size: int, batch_size: int, num_workers: int,
                max_images: int | None = None, rank: int | None = None, world_size: int | None = None,
                max_pixels: int = MAX_PIXELS, draft: bool = True, decode: str = "cpu", pin_memory: bool = False
                ) -> wds.WebLoader:
    """Evaluation batches: every image of this rank's shards once, resized and center-cropped
    (``decode="gpu"``: JPEGs left encoded with their box, for ``gpu_decode.finish_batch``).

    With ``max_images`` the images are a subset chosen by a hash of their keys (``key_rank``), the
    same whatever the workers, batch size or shard order: the loader drops, before decoding, the
    keys whose hash is clearly too large (when the shards' sizes are known), and the consumer keeps
    the ``max_images`` smallest hashes of what arrives (``first_by_key``)."""
    rank, world_size = rank_info(rank, world_size)
    check_decode(decode)
    mine = shards[rank::world_size]
    if not mine:  # fewer shards than ranks: no batch for this one, but a loader, so that its validation
        return torch.utils.data.DataLoader(_NoSamples(), batch_size=None)  # hooks run (and meet the others')
    stages = _samples(decode, dict(train=False), vocab, eval_view, image_size, seed=0, max_pixels=max_pixels,
                      draft=draft)
    sizes = shard_sizes(shards) if max_images else None
    # a margin over max_images / total, so that samples skipped later (no tag, bad image) and the hash's
    # chance do not leave fewer than max_images: exact unless more than about half the samples are skipped
    keep = min(1.0, (2 * max_images + 1000) / sum(sizes)) if sizes else 1.0
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(mine),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=stages.read_error),
        # at this point each sample is {"__key__", "jpg", "json"}: keep the keys of the hash subset
        wds.select(functools.partial(_in_subset, keep)),
        stages.decode,
        wds.batched(batch_size, collation_fn=stages.collate, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         worker_init_fn=functools.partial(worker_init, rank) if num_workers else None)


def _samples(decode: str, encoded: dict, *args, **kwargs) -> _Samples:
    """The per-sample stages for ``decode``: cpu decodes every image in the worker; gpu leaves JPEGs
    encoded (``gpu_decode.EncodedSamples``, built with the extra keywords ``encoded``)."""
    if check_decode(decode) == "cpu":
        return _Samples(*args, **kwargs)
    from im2vec.data.gpu_decode import (
        EncodedSamples,  # it builds on this module: imported when used
    )

    return EncodedSamples(*args, **kwargs, **encoded)


def worker_init(rank: int, worker_id: int) -> None:
    """A loader worker leaves SIGUSR1 (SLURM's pre-emption warning, ``--signal=USR1@120``, sent to every
    process of the job) to the trainer, which checkpoints and then stops the workers; SIGTERM kills it as
    usual (torch stops its workers with SIGTERM when the trainer exits), not a handler inherited from the
    trainer. Then Lightning's per-worker seeding, which a worker_init_fn of our own replaces (the loader's
    randomness is all explicitly seeded)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)


class _NoSamples(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def _in_subset(keep: float, sample: dict) -> bool:
    return keep >= 1.0 or key_rank(str(sample.get("__key__", ""))) < keep * 2**64


def key_rank(key: str) -> int:
    """A sample key's place in the held-out subset order: a 64-bit hash, the same on every machine."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "big")


def first_by_key(keys: list[str], n: int | None) -> torch.Tensor:
    """Indices of the ``n`` keys with the smallest ``key_rank`` (all when n is None), in their given order."""
    if not n or n >= len(keys):
        return torch.arange(len(keys))
    ranks = torch.tensor([key_rank(k) >> 1 for k in keys], dtype=torch.long)  # >> 1: fits an int64
    return torch.sort(torch.topk(ranks, n, largest=False).indices).values


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns ('train-{000000..000099}.tar'), globs or lists -> a list of shard paths."""
    if not isinstance(spec, str):
        return [str(s) for s in spec]
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return list(wds.shardlists.expand_urls(spec))
