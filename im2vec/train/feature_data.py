"""Feature shards read back for training in the frozen-trunk fast mode (im2vec.train.features writes them): an
extraction's manifest, the per-sample stages over stored feature vectors, the training and evaluation loaders
(batches with "features" (B, F) where image batches have "image"), and the datamodules of ``data=features``
(the generated corpus) and ``data=features_shards`` (any shards)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
import webdataset as wds
from torch import Tensor

from im2vec.data.corpus import CorpusSpec, ensure_corpus
from im2vec.data.datamodule import ShardDataModule
from im2vec.data.loader import _NoSamples, stream_loader, worker_init
from im2vec.data.samples import MAX_UNUSABLE, _Samples
from im2vec.data.shards import rank_info, rank_shards
from im2vec.errors import BadValue, NotFound

FORMAT, MANIFEST = "im2vec-features-1", "features.json"
EXT = "f16"  # a sample's features: F float16 values, little-endian, nothing else (the width is the manifest's)


def read_manifest(folder: str | os.PathLike) -> dict:
    """An extraction's features.json, with "dir" (the folder) added."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        raise NotFound(f"features: no {MANIFEST} in {folder}",
                       f"extract them first: python -m im2vec.train.features (CKPT | --trunk NAME) 'SHARDS' --out {folder}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BadValue(f"features: {path} is not readable json ({e})", "extract the features again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadValue(f"features: {path} is not a manifest written by python -m im2vec.train.features",
                       "extract the features again")
    return {**manifest, "dir": str(path.parent)}


def feature_shards(manifest: dict) -> list[str]:
    return [str(Path(manifest["dir"]) / s["name"]) for s in manifest["shards"]]


class FeatureSamples(_Samples):
    """Training's per-sample stages (json -> tag ids, skips counted, uploader balance) over feature shards:
    what ``image`` reads is the stored feature vector, (F,) fp16; batches carry it as "features"."""

    payloads = (EXT,)

    def image(self, data: bytes, rng) -> Tensor:
        if len(data) != 2 * self.size:  # self.size: the manifest's width
            raise ValueError(f"{len(data)} bytes of features, not {self.size} fp16 values")
        return torch.frombuffer(bytearray(data), dtype=torch.float16)  # (F,)

    def collate(self, items: list[tuple]) -> dict:
        batch = super().collate(items)
        batch["features"] = batch.pop("image")  # (B, F) fp16
        return batch


def feature_train_loader(shards: list[str], vocab, width: int, batch_size: int, batches_per_epoch: int,
                         num_workers: int, seed: int, shuffle_buffer: int = 2000, rank: int | None = None,
                         world_size: int | None = None, user_uses: dict[str, float] | None = None,
                         interleave: int = 4, pin_memory: bool = False) -> wds.WebLoader:
    """data.train_loader's stream over feature shards: drawn endlessly with replacement, interleaved,
    shuffled; ``batches_per_epoch`` batches of "features" (B, F), "tags", "clean", "skipped", "keys"."""
    rank, world_size = rank_info(rank, world_size)
    mine = rank_shards(shards, rank, world_size)
    stages = FeatureSamples(vocab, None, width, seed, rank=rank, user_uses=user_uses,
                            max_unusable=shuffle_buffer + MAX_UNUSABLE)
    return stream_loader(stages, mine, rank, batch_size, batches_per_epoch, num_workers, seed, shuffle_buffer,
                         interleave, pin_memory)


def feature_eval_loader(shards: list[str], vocab, width: int, batch_size: int, num_workers: int,
                        rank: int | None = None, world_size: int | None = None,
                        pin_memory: bool = False) -> wds.WebLoader | torch.utils.data.DataLoader:
    """Every sample of this rank's feature shards once (the module keeps the val_max_images smallest key hashes)."""
    rank, world_size = rank_info(rank, world_size)
    mine = shards[rank::world_size]
    if not mine:
        return torch.utils.data.DataLoader(_NoSamples(), batch_size=None)
    stages = FeatureSamples(vocab, None, width, seed=0)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(mine),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=stages.read_error),
        stages.decode,
        wds.batched(batch_size, collation_fn=stages.collate, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         worker_init_fn=functools.partial(worker_init, rank) if num_workers else None)


class FeatureDataModule(ShardDataModule):
    """ShardDataModule over the feature shards of ``features_dir``/train and /val (one extraction each, one
    trunk: their digests must agree). ``test_shards`` are IMAGE shards: training's closing figures run the
    whole encoder (stored trunk + trained W) over them, so they are the figures of the Tagger the checkpoint
    makes; by default the images ``features_dir``/test was extracted from. ``image_size`` is the features'."""

    def __init__(self, features_dir: str, vocab_path: str, val: bool = True,
                 test_shards: str | list[str] | None = None, content_tags_path: str | None = None, **kwargs):
        root = Path(features_dir).expanduser()
        train = read_manifest(root / "train")
        val_m = read_manifest(root / "val") if val else None
        test_m = read_manifest(root / "test") if (root / "test" / MANIFEST).is_file() else None
        for split, m in (("val", val_m), ("test", test_m)):
            if m is not None and m["trunk_digest"] != train["trunk_digest"]:
                raise BadValue(f"features: {root / split} was extracted with another trunk than {root / 'train'}",
                               "extract every split with the same checkpoint, --weights or --seed")
        if test_shards is None and test_m is not None:
            test_shards = test_m["source_shards"]
        super().__init__(train_shards=feature_shards(train), val_shards=feature_shards(val_m) if val_m else None,
                         vocab_path=vocab_path, test_shards=test_shards, content_tags_path=content_tags_path,
                         image_size=train["image_size"], **kwargs)
        if self.decode != "cpu":
            raise BadValue("data.decode=gpu: feature shards hold no JPEGs", "use data.decode=cpu")
        self.in_memory = False  # feature vectors stream (their own train_dataloader): nothing to decode once
        self.manifest, self.width = train, int(train["width"])

    def train_dataloader(self):
        # the stream per epoch and on resume as ShardDataModule's (a deterministic function of seed, epoch, done)
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        seed = self.seed * 100003 + epoch + 7919 * self.resumed_at()
        return feature_train_loader(self.train_shards, self.train_vocab, self.width, self.batch_size, self.batches_per_epoch,
                                    self.num_workers, seed, self.shuffle_buffer, user_uses=self.user_uses,
                                    interleave=self.interleave, pin_memory=self.pin_memory, **self._rank())

    def val_dataloader(self):
        if not self.val_shards:
            return []
        return feature_eval_loader(self.val_shards, self.vocab, self.width, self.val_batch_size, self.num_workers,
                                   pin_memory=self.pin_memory, **self._rank())


def corpus_features(cache_dir: str, features_dir: str, corpus: dict | None = None, image_size: int | None = None,
                    min_scale: float | None = None, **kwargs) -> FeatureDataModule:
    """FeatureDataModule for the generated corpus (``data=features``): its vocabulary and content tags, and its
    test images for the closing figures. ``image_size``: null, or the features' own (set when they were
    extracted); ``min_scale`` is unused (the features are of the eval view)."""
    root = ensure_corpus(cache_dir, CorpusSpec(**(corpus or {})))
    if not (Path(features_dir).expanduser() / "train" / MANIFEST).is_file():
        raise NotFound(f"features: no features in {features_dir}/train",
                       f"extract the corpus's splits first: for s in train val test; do python -m im2vec.train.features "
                       f"--trunk small_cnn --image-size 64 \"{root}/$s-*.tar\" --out {features_dir}/$s; done "
                       "(or a checkpoint in place of --trunk …)")
    dm = FeatureDataModule(features_dir, vocab_path=str(root / "vocab.tsv"),
                           test_shards=sorted(str(p) for p in root.glob("test-*.tar")),
                           content_tags_path=str(root / "content_tags.txt"), **kwargs)
    if image_size is not None and image_size != dm.image_size:
        raise BadValue(f"data.image_size={image_size}: the features were extracted at {dm.image_size} px",
                       "extract them again at that size, or leave data.image_size=null")
    outside = [s for s in dm.manifest["source_shards"] if Path(s).parent != root.resolve()]
    if outside:
        print(f"features: warning: {features_dir}/train was extracted from shards outside this corpus "
              f"({outside[0]}, …; the corpus is {root})", file=sys.stderr)
    dm.corpus_dir = root  # model.tag_vectors=corpus reads the corpus's word vectors
    return dm

