"""The training split decoded once into memory (im2vec.data.memory): what is decoded, the epoch's order, the crops
and flips on tensors, the batches, and when the data module uses it."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from im2vec.data.datamodule import ShardDataModule
from im2vec.data.ingest import stats_name
from im2vec.data.memory import (
    MemoryBatches,
    augment,
    decode_split,
    epoch_order,
    store_side,
)
from im2vec.data.samples import SKIP_REASONS
from im2vec.data.vocab import Vocabulary

VOCAB = Vocabulary(["sea", "red", "sky"], [30, 20, 10])


def _jpeg(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _shard(path, rows, stats=True):
    with wds.TarWriter(str(path)) as sink:
        for key, jpg, meta in rows:
            sink.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()})
    if stats:
        stats_name(path).write_text(json.dumps({"written": len(rows), "users": dict(Counter(
            m.get("user") for _, _, m in rows if m.get("user")))}))
    return str(path)


def _rows(start, n, user="ann"):
    return [(f"k{i:04d}", _jpeg((i * 7 % 256, 100, 50)), {"tags": ["sea", "sky"] if i % 2 else ["red"], "user": user})
            for i in range(start, start + n)]


def test_decode_split_keeps_every_usable_image_once_and_counts_the_rest(tmp_path):
    bad = [("bad1", b"not a jpeg", {"tags": ["sea"]}), ("notag", _jpeg("red"), {"tags": ["unknown"]})]
    a = _shard(tmp_path / "a.tar", _rows(0, 10) + bad)
    b = _shard(tmp_path / "b.tar", _rows(10, 6, user="bob"))
    d = decode_split([a, b], VOCAB, 20, 0, 0, 1)
    assert sorted(d.keys) == [f"k{i:04d}" for i in range(16)] and len(d) == 16
    assert d.images.shape == (16, 3, 20, 20) and d.images.dtype == torch.uint8
    for key, tags, user in zip(d.keys, d.tags, d.users):
        i = int(key[1:])
        assert tags == ([0, 2] if i % 2 else [1]) and user == ("bob" if i >= 10 else "ann")
    skipped = dict(zip(SKIP_REASONS, d.skipped.tolist()))
    assert skipped["bad_image"] == 1 and skipped["no_tag"] == 1
    # rank 1 of 2 decodes only its own shards (every second one)
    assert sorted(decode_split([a, b], VOCAB, 20, 0, 1, 2).keys) == [f"k{i:04d}" for i in range(10, 16)]


def test_epoch_order_uses_each_sample_its_share_of_the_epoch():
    gen = torch.Generator().manual_seed(0)
    order = epoch_order(torch.ones(50), 50, gen)
    assert sorted(order.tolist()) == list(range(50))  # uniform weights, one pass: a permutation
    w = torch.tensor([1.0] * 40 + [9.0] * 10)  # shares of 200 uses: 200/130 = 1.54 and 13.8 each
    for seed in range(20):
        order = epoch_order(w, 200, torch.Generator().manual_seed(seed))
        n = Counter(order.tolist())
        assert len(order) == 200 and all(n[i] in (1, 2) for i in range(40)), n
        assert all(n[i] in (13, 14) for i in range(40, 50)), n
    a = epoch_order(w, 200, torch.Generator().manual_seed(5))
    b = epoch_order(w, 200, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_augment_crops_inside_the_image_resizes_and_flips():
    # left half red, right half blue: a flip swaps them; a crop keeps the colours it covers
    img = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    img[0, 0, :, :20] = 250
    img[0, 2, :, 20:] = 250
    flips = 0
    for seed in range(40):
        out = augment(img.repeat(2, 1, 1, 1), 16, 0.7, random.Random(seed))
        assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8
        for o in out:
            left, right = o[:, :, :3].float().mean((1, 2)), o[:, :, -3:].float().mean((1, 2))
            if left[2] > left[0]:  # blue on the left: flipped
                flips += 1
                assert right[0] > right[2]
            else:
                assert left[0] > left[2] and right[2] > right[0]
    assert 25 < flips < 55  # half of 80, about
    # a whole-image box (min_scale 1 and square: no other box fits) is a plain resize of a smooth image
    grad = torch.linspace(0, 255, 40).round().to(torch.uint8).view(1, 1, 1, 40).expand(1, 3, 40, 40).contiguous()
    out = augment(grad, 20, 1.0, random.Random(3)).float()
    want = torch.nn.functional.interpolate(grad.float(), size=(20, 20), mode="bilinear", antialias=True)
    assert (out - want).abs().max() <= 3 or (out.flip(-1) - want).abs().max() <= 3


def test_memory_batches_are_seeded_complete_and_carry_the_decode_skips_once(tmp_path):
    d = decode_split([_shard(tmp_path / "a.tar", _rows(0, 30))], VOCAB, store_side(16, 0.7), 0, 0, 1)
    skipped = torch.tensor([0, 2, 1, 0, 0])
    first = list(MemoryBatches(d, 10, 6, 16, 0.7, seed=4, skipped=skipped))
    again = list(MemoryBatches(d, 10, 6, 16, 0.7, seed=4, skipped=skipped))
    other = list(MemoryBatches(d, 10, 6, 16, 0.7, seed=5))
    assert len(first) == 6 and all(b["image"].shape == (10, 3, 16, 16) for b in first)
    assert all(torch.equal(x["image"], y["image"]) and x["keys"] == y["keys"] for x, y in zip(first, again))
    assert [b["keys"] for b in first] != [b["keys"] for b in other]
    assert Counter(k for b in first for k in b["keys"]) == {f"k{i:04d}": 2 for i in range(30)}  # two passes
    assert torch.equal(first[0]["skipped"], skipped) and all(int(b["skipped"].sum()) == 0 for b in first[1:])
    b = first[0]
    for i, k in enumerate(b["keys"]):
        want = [0, 2] if int(k[1:]) % 2 else [1]
        assert [t for t in b["tags"][i].tolist() if t >= 0] == want and b["users"][i] == "ann"


def test_the_data_module_decodes_in_memory_when_it_fits_and_streams_otherwise(tmp_path):
    shard = _shard(tmp_path / "a.tar", _rows(0, 30))
    nostats = _shard(tmp_path / "b.tar", _rows(30, 5), stats=False)
    VOCAB.save(tmp_path / "vocab.tsv")

    def dm(shards, **kw):
        return ShardDataModule(shards, None, str(tmp_path / "vocab.tsv"), image_size=16, batch_size=8,
                               min_scale=0.7, **kw)

    assert dm(shard).uses_memory() and dm(shard).resolve_epoch() == 100  # the default batches_per_epoch
    assert dm(shard, batches_per_epoch=None).resolve_epoch() == 4  # one pass: ceil(30 / 8)
    assert dm(shard, batches_per_epoch=None).resolve_epoch(world_size=2) == 2
    assert not dm(shard, memory_mb=0).uses_memory()  # 30 images of 19 px do not fit in 0 MB
    assert not dm(shard, in_memory=False).uses_memory()
    assert not dm([shard, nostats]).uses_memory()  # a shard of unknown size: auto streams
    assert dm([shard, nostats], in_memory=True).uses_memory()
    with pytest.raises(ValueError, match="batches_per_epoch=null"):
        dm([shard, nostats], batches_per_epoch=None).resolve_epoch()
    with pytest.raises(ValueError, match="in_memory"):
        dm(shard, in_memory="sometimes")
    m = dm(shard, batches_per_epoch=None)
    loader = m.train_dataloader()
    assert isinstance(loader.dataset, MemoryBatches) and len(loader) == 4
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == 32 and {k for b in batches for k in b["keys"]} <= {
        f"k{i:04d}" for i in range(30)}
    s = dm(shard, in_memory=False).train_dataloader()
    assert not isinstance(getattr(s, "dataset", None), MemoryBatches)
