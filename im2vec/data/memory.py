"""A small training split decoded once and held in memory: batches drawn by index, augmented on tensors.

Streaming reads and decodes every JPEG again at every pass. On a CPU with a small trunk that costs
more than the trunk itself: decoding once is what lets a CPU minute go to learning. A collection of
8k images kept at 77 px is 140 MB decoded, so each rank decodes its own shards once (the same
evaluation decode as validation: shorter side to S, central square), and every batch is then B
indices from the epoch's schedule, cropped (a random-resized crop of at least ``min_scale`` of the
area, as the streaming loader draws it) and flipped, on the whole batch at once (``roi_align``).

Drawing by index also makes uploader balance exact and free: each sample's expected uses a pass are
its weight (``data.user_uses``), so an epoch reads nothing it does not use.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import roi_align

from im2vec.data.images import MAX_PIXELS
from im2vec.data.loader import eval_loader
from im2vec.data.samples import SKIP_REASONS, _pad, crop_box
from im2vec.data.vocab import Vocabulary


@dataclass
class Decoded:
    """A rank's training images, decoded once."""

    images: Tensor  # (N, 3, S, S) uint8
    tags: list[list[int]]  # in-vocabulary tag ids per image
    clean: list[list[int]]
    keys: list[str]
    users: list[str]  # "" where the json names none
    skipped: Tensor  # (len(SKIP_REASONS),) long: what decoding left out, by reason

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.images.numel()


def uploader_weights(data: Decoded, user_uses: dict[str, float]) -> Tensor | None:
    """Each decoded sample's expected uses a pass (``data.user_uses``: uploader balance); None without balance."""
    return torch.tensor([user_uses.get(u, 1.0) for u in data.users]) if user_uses else None


def store_side(image_size: int, min_scale: float) -> int:
    """The side images are kept at: the smallest crop (``min_scale`` of the area) still has ``image_size`` px."""
    return int(math.ceil(image_size / math.sqrt(max(min_scale, 0.25))))


def decoded_bytes(images: int, side: int) -> int:
    return images * 3 * side * side


def decode_split(shards: list[str], vocab: Vocabulary, side: int, num_workers: int, rank: int, world_size: int,
                 max_pixels: int = MAX_PIXELS) -> Decoded:
    """Every image of this rank's shards (every ``world_size``-th, from ``rank``) once, at side × side."""
    images, tags, clean, keys, users = [], [], [], [], []
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for batch in eval_loader(shards, vocab, side, 256, num_workers, rank=rank, world_size=world_size,
                             max_pixels=max_pixels):
        images.append(batch["image"])
        for name, out in (("tags", tags), ("clean", clean)):
            out += [[int(t) for t in row if t >= 0] for row in batch[name].tolist()]
        keys += batch["keys"]
        users += batch["users"]
        skipped += batch["skipped"]
    empty = torch.empty((0, 3, side, side), dtype=torch.uint8)
    return Decoded(torch.cat(images) if images else empty, tags, clean, keys, users, skipped)


def epoch_order(weights: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """``count`` indices in random order, sample i used ``count · w_i / Σw`` times rounded down or up (uniform
    weights and ``count = N``: a permutation). Systematic sampling over the samples in a random order: one
    uniform offset, then every unit step of the cumulated shares, so the uses sum to ``count`` exactly."""
    perm = torch.randperm(len(weights), generator=gen)
    share = weights.double()[perm] * (count / float(weights.sum()))  # (N,) expected uses this epoch
    points = torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(count, dtype=torch.float64)
    picked = torch.searchsorted(share.cumsum(0), points, right=True).clamp_max(len(share) - 1)  # rounding at the end
    idx = perm[picked]
    return idx[torch.randperm(count, generator=gen)]


def augment(images: Tensor, size: int, min_scale: float, rng: random.Random) -> Tensor:
    """(B, 3, S, S) uint8 -> (B, 3, size, size) uint8: a random-resized crop (``data.crop_box``, the
    streaming loader's) resized bilinearly, flipped half the time, for the whole batch in one call."""
    b, _, h, w = images.shape
    boxes = torch.zeros(b, 5)
    for i in range(b):
        x, y, cw, ch = crop_box(w, h, rng, min_scale)
        boxes[i] = torch.tensor([i, x, y, x + cw, y + ch], dtype=torch.float32)
    flip = torch.tensor([rng.random() < 0.5 for _ in range(b)])
    out = roi_align(images.float(), boxes, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    out[flip] = out[flip].flip(-1)
    return out.round_().clamp_(0, 255).to(torch.uint8)  # (B, 3, size, size)


class MemoryBatches(torch.utils.data.IterableDataset):
    """One epoch of training batches from a ``Decoded`` split: ``batches`` batches of ``batch_size``,
    the indices by ``epoch_order`` of the samples' weights, seeded by ``seed`` (the datamodule's
    per-epoch seed: a resumed run draws the same epoch). ``skipped`` (what decoding left out) rides on
    the first batch, so the module counts it once."""

    def __init__(self, data: Decoded, batch_size: int, batches: int, image_size: int, min_scale: float, seed: int,
                 weights: Tensor | None = None, skipped: Tensor | None = None):
        super().__init__()
        self.data, self.batch_size, self.batches = data, batch_size, batches
        self.image_size, self.min_scale, self.seed = image_size, min_scale, seed
        self.weights = weights if weights is not None else torch.ones(len(data))
        self.skipped = skipped

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        gen, rng = torch.Generator().manual_seed(self.seed), random.Random(self.seed)
        order = epoch_order(self.weights, self.batches * self.batch_size, gen)
        d = self.data
        for b in range(self.batches):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            rows = idx.tolist()
            skipped = self.skipped if b == 0 and self.skipped is not None else torch.zeros(len(SKIP_REASONS),
                                                                                          dtype=torch.long)
            yield {"image": augment(d.images[idx], self.image_size, self.min_scale, rng),
                   "tags": _pad([d.tags[i] for i in rows]), "clean": _pad([d.clean[i] for i in rows]),
                   "skipped": skipped, "keys": [d.keys[i] for i in rows], "users": [d.users[i] for i in rows]}


def memory_loader(batches: MemoryBatches, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The batches in the training process: cropping a batch of tensors takes a millisecond or two, less
    than a worker's hand-over would."""
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0, pin_memory=pin_memory)
