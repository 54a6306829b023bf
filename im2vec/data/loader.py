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
import os
import random
import signal
import warnings
from collections.abc import Iterator

import torch
import webdataset as wds

from im2vec.data.gpu_decode import EncodedSamples
from im2vec.data.images import MAX_PIXELS
from im2vec.data.samples import (
    MAX_UNUSABLE,
    _Samples,
    _worker_id,
    check_decode,
    eval_view,
    train_view,
)
from im2vec.data.shards import (
    _in_subset,
    rank_info,
    rank_shards,
    shard_sizes,
)
from im2vec.data.vocab import Vocabulary


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
