"""Where the shards and the vocabulary come from: one LightningDataModule for any shard set,
and a factory that points it at the embedded default corpus (generated on first use)."""

from __future__ import annotations

import re
from pathlib import Path

import pytorch_lightning as pl
import torch

from im2vec.data.corpus import CorpusSpec, ensure_corpus
from im2vec.data.images import MAX_PIXELS
from im2vec.data.loader import eval_loader, train_loader
from im2vec.data.memory import (
    MemoryBatches,
    decode_split,
    decoded_bytes,
    memory_loader,
    store_side,
    uploader_weights,
)
from im2vec.data.samples import SKIP_REASONS, check_decode
from im2vec.data.shards import (
    expand_shards,
    rank_info,
    shard_sizes,
    user_counts,
    user_uses,
)
from im2vec.data.visual_file import read_nonvisual
from im2vec.data.vocab import Vocabulary
from im2vec.data.yfcc import normalize_tag
from im2vec.errors import BadValue, NotFound


class ShardDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None,
        vocab_path: str,
        test_shards: str | list[str] | None = None,  # held out from both: what evaluate.py scores by default
        content_tags_path: str | None = None,  # tags that name real content; the rest count as noise
        vocab_max_size: int | None = None,  # keep the most frequent tags only (600k for YFCC)
        vocab_min_count: int = 1,
        image_size: int = 64,
        batch_size: int = 64,
        batches_per_epoch: int | None = 100,  # None: one pass over the training split (its size from the ingest)
        val_batch_size: int = 256,
        val_max_images: int | None = 5000,
        num_workers: int = 0,
        shuffle_buffer: int = 2000,
        min_scale: float = 0.35,  # RandomResizedCrop's smallest area fraction
        max_pixels: int = MAX_PIXELS,  # larger images (decompression bombs) are skipped and counted
        user_temperature: float | None = None,  # uploader balance: uploader u's share of a pass ∝ n_u^τ (1/None: off)
        in_memory: str | bool = "auto",  # decode the training split once and keep it (im2vec/data/memory.py); auto: if it fits
        memory_mb: int = 2048,  # auto: the decoded training images of one rank must fit in this
        interleave: int = 4,  # shards each loader worker reads at once (data.interleaved)
        decode: str = "cpu",  # gpu: workers leave JPEGs encoded; gpu_decode.finish_batch decodes them on the device
        pin_memory: bool = False,  # batches in page-locked memory (train() sets it when the trunk is on a GPU)
        holdout_tags: list[str] | str | None = None,  # kept out of the vocabulary (zero-shot): a list or a file
        visual_tags: str | None = None,  # python -m im2vec.visualness's TSV: its tags marked 0 (non-visual) ...
        visual_use: str = "only",  # ... only: out of the vocabulary; negatives: never an image's positive
        seed: int = 0,
    ):
        super().__init__()
        self.decode = check_decode(decode)  # read by the module: a "gpu" batch needs gpu_decode.finish_batch
        self.pin_memory = pin_memory
        missing = [name for name, v in (("train_shards", train_shards), ("vocab_path", vocab_path)) if not v]
        if missing:
            raise BadValue(f"data: {' and '.join(missing)} not set",
                           f"set {' and '.join('data.' + m for m in missing)} (e.g. data.train_shards='/data/yfcc/train-{{000000..000999}}.tar')")
        self.train_shards = expand_shards(train_shards)
        self.val_shards = expand_shards(val_shards) if val_shards else []
        self.test_shards = expand_shards(test_shards) if test_shards else []  # may match nothing: evaluate says so
        if not self.train_shards:
            raise NotFound(f"data: no shards match {train_shards!r}", "ingest them first (python -m im2vec.data.ingest), or set "
                           "paths.data_dir=… / data.train_shards=… to where they are")
        if val_shards and not self.val_shards:
            raise NotFound(f"data: no shards match {val_shards!r} (an empty validation split?)",
                           "ingest with a larger --val-fraction, or train without validation: data.val_shards=null")
        for s in self.train_shards[:1] + self.val_shards[:1]:
            if not re.match(r"^[a-z][a-z0-9+.-]+:", s) and not Path(s).exists():  # pipe:, s3:, http:// pass
                raise NotFound(f"data: shard not found: {s}", "check data.train_shards / data.val_shards")
        self.holdout_tags = read_holdout(holdout_tags)
        self.nonvisual, self.visual_use = read_nonvisual(visual_tags, visual_use), visual_use
        self.vocab = Vocabulary.load(vocab_path, max_size=vocab_max_size, min_count=vocab_min_count,
                                     exclude=self.holdout_tags + (self.nonvisual if visual_use == "only" else []))
        # what training batches see: without the non-visual tags when they are to be negatives only
        self.train_vocab = self.vocab.without_positives(self.nonvisual) if visual_use == "negatives" else self.vocab
        if self.nonvisual:
            n = sum(1 for t in self.nonvisual if t in self.vocab.index) if visual_use == "negatives" else \
                sum(1 for t in self.nonvisual if t in self.vocab.held_out)
            print(f"data: {len(self.nonvisual):,} tags marked non-visual in {visual_tags}; {n:,} of them in the "
                  + ("vocabulary, never an image's positive: drawn only as negatives" if visual_use == "negatives"
                     else "training tags, kept out of the vocabulary") + f" (data.visual_use={visual_use})")
        self.corpus_dir: Path | None = None  # the generated corpus's folder (default_corpus), else None
        self.noise_ids, self.content_tags = None, None
        if content_tags_path:
            if not Path(content_tags_path).is_file():
                raise NotFound(f"data: content tags file not found: {content_tags_path}",
                               "check data.content_tags_path, or set it to null")
            self.content_tags = set(Path(content_tags_path).read_text(encoding="utf-8").split())
            self.noise_ids = torch.tensor([i for i, t in enumerate(self.vocab.tags) if t not in self.content_tags],
                                          dtype=torch.long)
        self.image_size, self.batch_size, self.batches_per_epoch = image_size, batch_size, batches_per_epoch
        self.val_batch_size, self.val_max_images = val_batch_size, val_max_images
        self.num_workers, self.shuffle_buffer, self.min_scale, self.seed = num_workers, shuffle_buffer, min_scale, seed
        self.max_pixels, self.interleave = max_pixels, interleave
        self.user_uses = user_uses(user_counts(self.train_shards), user_temperature) if user_temperature not in (
            None, 1) else {}
        if self.user_uses:
            uses = sorted(self.user_uses.values())
            print(f"data: uploader balance τ={user_temperature:g} over {len(uses):,} uploaders: each sample used "
                  f"{uses[0]:.2g} to {uses[-1]:.2g} times a pass (data.user_temperature)")
        if in_memory not in ("auto", True, False):
            raise BadValue(f"data.in_memory={in_memory!r}", "use auto, true or false")
        self.in_memory, self.memory_mb, self._decoded = in_memory, memory_mb, None

    def _rank(self) -> dict:
        if self.trainer is None:
            return {}  # torch.distributed or RANK/WORLD_SIZE decide
        return {"rank": getattr(self.trainer, "global_rank", 0), "world_size": getattr(self.trainer, "world_size", 1)}

    def train_size(self) -> int | None:
        """Samples in the training split, from the ingest's ``.stats.json`` files (None where a shard has none)."""
        sizes = shard_sizes(self.train_shards)
        return sum(sizes) if sizes else None

    def resolve_epoch(self, world_size: int = 1) -> int:
        """``batches_per_epoch``, and with None one pass of this rank's share of the training split."""
        if self.batches_per_epoch is None:
            n = self.train_size()
            if n is None:
                raise BadValue("data.batches_per_epoch=null (one pass) needs the training shards' sizes: a shard "
                               "has no .stats.json beside it", "write the shards with python -m im2vec.data.ingest, or "
                               "set data.batches_per_epoch=N")
            self.batches_per_epoch = max(1, -(-n // (self.batch_size * world_size)))
        return self.batches_per_epoch

    def memory_side(self) -> int:
        return store_side(self.image_size, self.min_scale)

    def uses_memory(self, world_size: int = 1) -> bool:
        """Whether training batches come from the split decoded once (in_memory: true, or auto and this rank's
        decoded images fit in memory_mb) rather than from the stream."""
        if self.in_memory is not True and self.in_memory != "auto":
            return False
        n = self.train_size()
        if self.in_memory == "auto" and n is None:
            return False  # its size is unknown until it is read: stream
        return self.in_memory is True or decoded_bytes(-(-n // world_size), self.memory_side()) <= self.memory_mb << 20

    def train_dataloader(self):
        # A fresh, deterministic stream every epoch (the trainer reloads dataloaders each epoch).
        # Epochs counted as Lightning's samplers count them: a checkpoint written at an epoch's end
        # has already counted that epoch, so a resumed run draws the next epoch's stream.
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        seed = self.seed * 100003 + epoch
        rank = self._rank() or dict(zip(("rank", "world_size"), rank_info()))
        self.resolve_epoch(rank["world_size"])
        done = self.resumed_at()
        if done:  # resumed mid-epoch: the rest of the epoch is a new stream, determined by (seed, epoch, done)
            seed += 7919 * done
        if self.uses_memory(rank["world_size"]):
            return self._memory_loader(seed, **rank)
        return train_loader(self.train_shards, self.train_vocab, self.image_size, self.batch_size, self.batches_per_epoch,
                            self.num_workers, seed=seed, shuffle_buffer=self.shuffle_buffer,
                            min_scale=self.min_scale, max_pixels=self.max_pixels, user_uses=self.user_uses,
                            interleave=self.interleave, decode=self.decode, pin_memory=self.pin_memory, **rank)

    def _memory_loader(self, seed: int, rank: int, world_size: int):
        """This epoch's batches from the training split decoded once (decoded at the first epoch)."""
        skipped = None
        if self._decoded is None:
            self._decoded = decode_split(self.train_shards, self.train_vocab, self.memory_side(), self.num_workers, rank,
                                         world_size, self.max_pixels)
            skipped = self._decoded.skipped  # counted once, with the first batch
            if rank == 0:
                print(f"data: {len(self._decoded):,} training images decoded once into memory at "
                      f"{self.memory_side()} px ({self._decoded.nbytes / 2**20:,.0f} MB on this rank; data.in_memory)")
        if not len(self._decoded):
            raise BadValue(f"data: not one usable training image in {len(self.train_shards)} shard(s) (rank {rank}); "
                           f"skipped: {dict(zip(SKIP_REASONS, self._decoded.skipped.tolist()))}",
                           "does data.vocab_path belong to these shards, and are their images readable?")
        batches = MemoryBatches(self._decoded, self.batch_size, self.batches_per_epoch, self.image_size,
                                self.min_scale, seed, uploader_weights(self._decoded, self.user_uses), skipped)
        return memory_loader(batches, self.pin_memory)

    def resumed_at(self) -> int:
        """Batches of the current epoch a mid-epoch checkpoint had trained (0 when not resuming mid-epoch).

        The stream (shards drawn with replacement, shuffled, cropped) is not rewound to that batch: the
        epoch's remaining batches come from a fresh stream seeded by (seed, epoch, batches done) — the
        same on every resume from that checkpoint, statistically equivalent to the uninterrupted one.
        The model, optimizers, schedules and the samplers' generators continue exactly."""
        loop = self.trainer.fit_loop if self.trainer is not None else None
        if loop is None or not getattr(loop, "restarting", False):
            return 0
        done = loop.epoch_loop.batch_progress.current.processed
        return done if 0 < done < self.batches_per_epoch else 0

    def val_dataloader(self):
        if not self.val_shards:
            return []
        return eval_loader(self.val_shards, self.vocab, self.image_size, self.val_batch_size,
                           self.num_workers, self.val_max_images, max_pixels=self.max_pixels, decode=self.decode,
                           pin_memory=self.pin_memory, **self._rank())


def read_holdout(spec: list[str] | str | None) -> list[str]:
    """data.holdout_tags: a list of tags, or a file of them (one per line); normalized as ingest does."""
    if not spec:
        return []
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise NotFound(f"data.holdout_tags: no file {path}", "give a list of tags or a file with one tag a line")
        spec = path.read_text(encoding="utf-8").splitlines()
    return list(dict.fromkeys(t for t in (normalize_tag(str(x)) for x in spec) if t))


def default_corpus(cache_dir: str, corpus: dict | None = None, **kwargs) -> ShardDataModule:
    """The embedded, generated YFCC-like corpus (written once into ``cache_dir``)."""
    check_decode(kwargs.get("decode", "cpu"))  # before a first corpus is generated
    root = ensure_corpus(cache_dir, CorpusSpec(**(corpus or {})))
    dm = ShardDataModule(
        train_shards=sorted(str(p) for p in root.glob("train-*.tar")),
        val_shards=sorted(str(p) for p in root.glob("val-*.tar")),
        test_shards=sorted(str(p) for p in root.glob("test-*.tar")),
        vocab_path=str(root / "vocab.tsv"),
        content_tags_path=str(root / "content_tags.txt"),
        **kwargs,
    )
    dm.corpus_dir = root  # model.tag_vectors=corpus: the corpus's generated word vectors (corpus.ensure_word_vectors)
    return dm
