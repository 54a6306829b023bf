"""data.decode=gpu: workers leave JPEGs encoded, gpu_decode.finish_batch decodes them (here on the CPU, as on a GPU)."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from im2vec.bench.loader import photo
from im2vec.data import gpu_decode
from im2vec.data import samples as data
from im2vec.data.datamodule import ShardDataModule
from im2vec.data.gpu_decode import ENCODED_KEYS, finish_batch, is_encoded
from im2vec.data.loader import eval_loader, train_loader
from im2vec.data.samples import SKIP_IMAGE
from im2vec.data.vocab import Vocabulary
from im2vec.errors import BadValue, one_line

VOCAB = Vocabulary(["sea", "red", "canon"], [30, 20, 10])
CPU = torch.device("cpu")
SIZES = [(160, 120), (120, 160), (200, 150), (96, 96), (320, 240), (90, 120)]


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(i: int, size=None) -> Image.Image:
    """A photo-like image (smooth colours, flat shapes, fine texture): the loader benchmark's generator."""
    w, h = size or SIZES[i % len(SIZES)]
    return photo(np.random.default_rng(i), w, h)


def _sample(i: int, image: bytes, ext: str = "jpg") -> dict:
    tags = ["sea", "red", "canon"][: 1 + i % 3]
    return {"__key__": f"{i:05d}", ext: image, "json": json.dumps({"tags": tags}).encode()}


def _shard(path, samples) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def _good_shard(path, n: int = 12) -> str:
    return _shard(path, [_sample(i, _encode(_photo(i), quality=90)) for i in range(n)])


def _corrupt_jpeg() -> bytes:
    """A whole JPEG (header readable, end marker in place) whose scan names a component that does not exist:
    neither libjpeg (torchvision) nor Pillow decodes it."""
    good = bytearray(_encode(_photo(99)))
    sos = good.index(b"\xff\xda")
    good[sos + 5] = 9  # the scan's first component id
    return bytes(good)


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference in grey levels, per image."""
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def test_eval_batches_match_the_cpu_path(tmp_path):
    shard = _good_shard(tmp_path / "a.tar")
    cpu = list(eval_loader([shard], VOCAB, 48, batch_size=5, num_workers=0))
    encoded = list(eval_loader([shard], VOCAB, 48, batch_size=5, num_workers=1, decode="gpu"))  # through a worker
    assert all(is_encoded(b) and "image" not in b for b in encoded)
    assert all(len(b["jpeg_rows"]) == len(b["keys"]) and len(b["decoded"]) == 0 for b in encoded)  # all JPEGs
    gpu = [finish_batch(b, CPU, 48) for b in encoded]
    assert [b["keys"] for b in gpu] == [b["keys"] for b in cpu]
    for c, g in zip(cpu, gpu):
        assert torch.equal(c["tags"], g["tags"]) and torch.equal(c["clean"], g["clean"])
        assert torch.equal(c["skipped"], g["skipped"])
        assert g["image"].shape == c["image"].shape and g["image"].dtype == torch.uint8
        assert not set(ENCODED_KEYS) & set(g)
    diff = _diff(torch.cat([b["image"] for b in cpu]), torch.cat([b["image"] for b in gpu]))
    # measured: mean 1.32 grey levels over the 12 images, the worst image 2.96. Nearly all of it is the CPU
    # path's reduced-size JPEG decoding (Image.draft): against full-size Pillow decoding (draft=False) the
    # same images differ by 0.18 on average, 0.39 at worst
    assert diff.mean() < 3 and diff.max() < 6
    full = torch.cat([b["image"] for b in eval_loader([shard], VOCAB, 48, batch_size=5, num_workers=0, draft=False)])
    assert _diff(full, torch.cat([b["image"] for b in gpu])).max() < 1


def test_training_batches_draw_the_same_boxes_and_flips(tmp_path, monkeypatch):
    shards = [_good_shard(tmp_path / "a.tar"), _shard(tmp_path / "b.tar", [
        _sample(20 + i, _encode(_photo(20 + i), quality=85)) for i in range(8)])]
    drawn = []  # the CPU path's crop boxes, in the order its samples were cropped

    def recording_crop_box(*args, **kwargs):
        drawn.append(box := crop_box(*args, **kwargs))
        return box

    crop_box = data.crop_box
    monkeypatch.setattr(data, "crop_box", recording_crop_box)  # train_view's; gpu_decode keeps its own

    def stream(decode):
        return list(train_loader(shards, VOCAB, 40, batch_size=6, batches_per_epoch=5, num_workers=0, seed=5,
                                 shuffle_buffer=10, rank=0, world_size=1, min_scale=0.3, decode=decode))

    cpu, encoded = stream("cpu"), stream("gpu")
    assert len(cpu) == len(encoded) == 5
    boxes = [tuple(box) for b in encoded for box in b["jpeg_boxes"].tolist()]  # every row is a JPEG here
    # the same crops, sample by sample (the CPU stream had cropped one sample more when the epoch stopped it)
    assert [box[:4] for box in boxes] == drawn[: len(boxes)]
    assert 0 < sum(box[4] for box in boxes) < len(boxes)  # flipped and not
    gpu = [finish_batch(b, CPU, 40) for b in encoded]
    for c, g in zip(cpu, gpu):
        assert c["keys"] == g["keys"] and torch.equal(c["tags"], g["tags"])
    cpu_images, gpu_images = torch.cat([b["image"] for b in cpu]), torch.cat([b["image"] for b in gpu])
    diff = _diff(cpu_images, gpu_images)
    # measured: mean 0.73 grey levels over the 30 crops, the worst 1.49 (0.23 and 0.50 against draft=False)
    assert diff.mean() < 3 and diff.max() < 6
    mirrored = _diff(cpu_images, gpu_images.flip(-1))  # the flips agree: each image is far closer than its mirror
    assert bool((diff * 3 < mirrored).all())  # measured: every mirror ≥ 39.6 away, ≥ 39× its image's diff


def test_a_corrupt_and_a_truncated_jpeg_drop_only_their_rows(tmp_path):
    whole = _encode(_photo(7), quality=90)
    samples = [_sample(i, _encode(_photo(i), quality=90)) for i in range(6)]
    samples.insert(2, _sample(50, _corrupt_jpeg()))  # reaches finish_batch: its header and end marker are fine
    samples.insert(5, _sample(51, whole[: len(whole) // 2]))  # truncated: the worker decodes it, as the CPU path
    shard = _shard(tmp_path / "bad.tar", samples)
    good = [s["__key__"] for s in samples if s["__key__"] not in ("00050", "00051")]

    cpu = list(eval_loader([shard], VOCAB, 32, batch_size=16, num_workers=0))
    [encoded] = list(eval_loader([shard], VOCAB, 32, batch_size=16, num_workers=0, decode="gpu"))
    assert "00051" not in encoded["keys"] and int(encoded["skipped"][SKIP_IMAGE]) == 1  # the truncated one
    assert "00050" in encoded["keys"]
    batch = finish_batch(encoded, CPU, 32)
    assert batch["keys"] == cpu[0]["keys"] == good  # exactly the bad rows are gone, the order kept
    assert torch.equal(batch["tags"], cpu[0]["tags"]) and torch.equal(batch["clean"], cpu[0]["clean"])
    assert torch.equal(batch["skipped"], cpu[0]["skipped"]) and int(batch["skipped"][SKIP_IMAGE]) == 2
    assert int(encoded["skipped"][SKIP_IMAGE]) == 1  # the loader's batch is left as it was

    [clean] = list(eval_loader([_shard(tmp_path / "good.tar", [s for s in samples if s["__key__"] in good])],
                               VOCAB, 32, batch_size=16, num_workers=0, decode="gpu"))
    assert torch.equal(batch["image"], finish_batch(clean, CPU, 32)["image"])  # the others intact

    # a truncated JPEG that does reach finish_batch (the worker's end-marker check passed over): dropped too
    forged = dict(clean)
    offsets = clean["jpeg_offsets"].tolist()
    cut = clean["jpeg"][offsets[1]:offsets[2]][:-200]
    forged["jpeg"] = torch.cat([clean["jpeg"][:offsets[1]], cut, clean["jpeg"][offsets[2]:]])
    forged["jpeg_offsets"] = torch.tensor([0, offsets[1], offsets[1] + len(cut)]
                                          + [o - 200 for o in offsets[3:]])
    out = finish_batch(forged, CPU, 32)
    assert out["keys"] == good[:1] + good[2:] and int(out["skipped"][SKIP_IMAGE]) == 1
    assert torch.equal(out["image"], torch.cat([batch["image"][:1], batch["image"][2:]]))


def test_a_batch_with_no_decodable_image_has_zero_rows(tmp_path):
    shard = _shard(tmp_path / "a.tar", [_sample(i, _corrupt_jpeg()) for i in range(3)])
    [encoded] = list(eval_loader([shard], VOCAB, 32, batch_size=8, num_workers=0, decode="gpu"))
    batch = finish_batch(encoded, CPU, 32)
    assert batch["image"].shape == (0, 3, 32, 32) and batch["tags"].shape[0] == 0 and batch["keys"] == []
    assert int(batch["skipped"][SKIP_IMAGE]) == 3


def test_png_greyscale_and_cmyk_come_out_rgb(tmp_path):
    rgba = _photo(1, (60, 50)).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    shard = _shard(tmp_path / "mixed.tar", [
        _sample(0, _encode(_photo(0, (64, 48)))),
        _sample(1, _encode(rgba, "PNG"), ext="png"),
        _sample(2, _encode(_photo(2, (50, 70)).convert("L"))),
        _sample(3, _encode(_photo(3, (80, 60)).convert("CMYK"))),
        _sample(4, _encode(_photo(4, (40, 40)), "PNG"), ext="png"),
    ])
    [cpu] = list(eval_loader([shard], VOCAB, 32, batch_size=8, num_workers=0))
    [encoded] = list(eval_loader([shard], VOCAB, 32, batch_size=8, num_workers=0, decode="gpu"))
    assert encoded["jpeg_rows"].tolist() == [0, 2]  # RGB and greyscale JPEGs go to the device's decoder
    assert encoded["decoded_rows"].tolist() == [1, 3, 4]  # PNGs and the CMYK JPEG: decoded in the worker
    assert torch.equal(encoded["decoded"], cpu["image"][[1, 3, 4]])  # exactly as with decode=cpu
    batch = finish_batch(encoded, CPU, 32)
    assert batch["image"].shape == (5, 3, 32, 32) and batch["keys"] == cpu["keys"]
    grey = batch["image"][2].int()
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # grey, as three equal RGB planes
    assert _diff(batch["image"], cpu["image"]).max() < 3  # measured: 0.23 (RGB), 0.18 (grey), 0 (worker-decoded)


def test_an_unknown_decode_is_a_one_line_error(tmp_path):
    shard = _good_shard(tmp_path / "a.tar", 2)
    vocab = tmp_path / "vocab.tsv"
    VOCAB.save(vocab)
    for make in (lambda: eval_loader([shard], VOCAB, 32, 4, 0, decode="bogus"),
                 lambda: train_loader([shard], VOCAB, 32, 4, 1, 0, seed=0, rank=0, world_size=1, decode="bogus"),
                 lambda: ShardDataModule(shard, None, str(vocab), decode="bogus")):
        with pytest.raises(BadValue) as e:
            make()
        assert "\n" not in one_line(e.value) and "data.decode='bogus'" in str(e.value)
    dm = ShardDataModule(shard, shard, str(vocab), image_size=32, decode="gpu")
    assert dm.decode == "gpu" and dm.image_size == 32
    assert is_encoded(next(iter(dm.val_dataloader())))


def test_end_marker_check():
    whole = _encode(_photo(3))
    assert gpu_decode.ends_whole(whole) and gpu_decode.ends_whole(whole + b"\0" * 10)
    assert not gpu_decode.ends_whole(whole[:-1]) and not gpu_decode.ends_whole(whole[: len(whole) // 2])


def test_a_jpeg_the_device_decoder_refuses_is_read_with_pillow(tmp_path, monkeypatch):
    shard = _good_shard(tmp_path / "a.tar", 4)
    [encoded] = list(eval_loader([shard], VOCAB, 32, batch_size=8, num_workers=0, decode="gpu"))
    expected = finish_batch(encoded, CPU, 32)
    refused = gpu_decode.jpegs(encoded)[1]
    decode_jpeg = gpu_decode.decode_jpeg

    def picky(data, **kwargs):  # as nvJPEG might be with a JPEG that libjpeg reads
        if any(d.data_ptr() == refused.data_ptr() for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("Error while decoding JPEG images: unsupported")
        return decode_jpeg(data, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", picky)
    batch = finish_batch(encoded, CPU, 32)
    assert batch["keys"] == expected["keys"] and torch.equal(batch["skipped"], expected["skipped"])
    assert _diff(batch["image"], expected["image"]).max() < 1  # Pillow's and libjpeg's decoding: nearly equal
