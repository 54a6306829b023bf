"""The shard loader: batch format, bad samples skipped and counted, a stream fixed by (seed, epoch)."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from im2vec.data import SKIP_IMAGE, SKIP_NO_TAG, eval_loader, train_loader
from im2vec.sampler import PAD
from im2vec.vocab import Vocabulary

VOCAB = Vocabulary(["sea", "red", "canon"], [30, 20, 10])


def _jpeg(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def _sample(i, tags, jpg=None, clean=()):
    return {"__key__": f"{i:05d}", "jpg": jpg if jpg is not None else _jpeg(i),
            "json": json.dumps({"tags": tags, "clean_tags": list(clean)}).encode()}


def test_eval_batches_carry_padded_tag_ids_and_skip_counts(tmp_path):
    shard = _write(tmp_path / "a.tar", [
        _sample(0, ["sea", "red"], clean=["sea"]),
        _sample(1, ["unknown"]),  # no in-vocabulary tag: skipped, counted
        _sample(2, ["canon"], jpg=b"\xff\xd8 not a jpeg"),  # corrupt image: skipped, counted
        _sample(3, ["red", "red", "nope", "canon"]),
        _sample(4, []),  # empty tag list: skipped, counted
    ])
    batches = list(eval_loader([shard], VOCAB, image_size=32, batch_size=8, num_workers=0))
    assert len(batches) == 1
    b = batches[0]
    assert b["image"].shape == (2, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["tags"].tolist() == [[0, 1], [1, 2]]  # duplicates once, unknown tags dropped
    assert b["clean"].tolist() == [[0], [PAD]]
    assert b["skipped"][SKIP_NO_TAG] == 2 and b["skipped"][SKIP_IMAGE] == 1


def test_truncated_shard_does_not_stop_training(tmp_path):
    good = _write(tmp_path / "good.tar", [_sample(i, ["sea"]) for i in range(20)])
    data = open(good, "rb").read()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    loader = train_loader([str(bad)], VOCAB, image_size=24, batch_size=4, batches_per_epoch=6,
                          num_workers=0, seed=0, shuffle_buffer=1)
    batches = list(loader)
    assert len(batches) == 6 and all(b["image"].shape == (4, 3, 24, 24) for b in batches)
    assert sum(int(b["skipped"][0]) for b in batches) >= 1  # the read error was counted


def test_train_stream_is_fixed_by_seed_and_epoch(tmp_path):
    shards = [_write(tmp_path / f"s{j}.tar", [_sample(10 * j + i, ["sea", "red"][: 1 + i % 2]) for i in range(10)])
              for j in range(3)]

    def stream(seed):
        loader = train_loader(shards, VOCAB, image_size=24, batch_size=5, batches_per_epoch=4,
                              num_workers=0, seed=seed, shuffle_buffer=8)
        return [b["image"] for b in loader]

    a, b, c = stream(1), stream(1), stream(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same images, crops and flips
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_data_module_draws_a_new_stream_each_epoch(tmp_path):
    from types import SimpleNamespace

    from im2vec.datamodule import ShardDataModule

    shard = _write(tmp_path / "s.tar", [_sample(i, ["sea"]) for i in range(30)])
    VOCAB.save(tmp_path / "vocab.tsv")
    dm = ShardDataModule(shard, None, str(tmp_path / "vocab.tsv"), image_size=24, batch_size=5,
                         batches_per_epoch=3, num_workers=0, shuffle_buffer=10)

    def first_batch(epoch):  # the epoch as Lightning counts it for samplers
        dm.trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(
            current=SimpleNamespace(processed=epoch))))
        return next(iter(dm.train_dataloader()))["image"]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_missing_or_unmatched_shards_fail_clearly(tmp_path):
    from im2vec.datamodule import ShardDataModule

    VOCAB.save(tmp_path / "vocab.tsv")
    with pytest.raises(FileNotFoundError, match="no shards match"):
        ShardDataModule(str(tmp_path / "nothing-*.tar"), None, str(tmp_path / "vocab.tsv"))
    with pytest.raises(FileNotFoundError, match="shard not found"):
        ShardDataModule(str(tmp_path / "absent.tar"), None, str(tmp_path / "vocab.tsv"))
    ShardDataModule("pipe:cat /dev/null", None, str(tmp_path / "vocab.tsv"))  # urls are not files
