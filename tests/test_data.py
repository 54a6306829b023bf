"""The shard loader: batch format, bad samples skipped and counted, a stream fixed by (seed, epoch)."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import png_bomb
from PIL import Image

from im2vec.data.loader import eval_loader, train_loader
from im2vec.data.samples import SKIP_IMAGE, SKIP_NO_TAG
from im2vec.data.vocab import Vocabulary
from im2vec.errors import UserError
from im2vec.wide.sampler import PAD

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
    assert b["image"].shape == (2, 3, 32, 32) and b["image"].dtype == torch.uint8  # normalized on the device
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

    from im2vec.data.datamodule import ShardDataModule

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
    from im2vec.data.datamodule import ShardDataModule

    VOCAB.save(tmp_path / "vocab.tsv")
    with pytest.raises(FileNotFoundError, match="no shards match"):
        ShardDataModule(str(tmp_path / "nothing-*.tar"), None, str(tmp_path / "vocab.tsv"))
    with pytest.raises(FileNotFoundError, match="shard not found"):
        ShardDataModule(str(tmp_path / "absent.tar"), None, str(tmp_path / "vocab.tsv"))
    ShardDataModule("pipe:cat /dev/null", None, str(tmp_path / "vocab.tsv"))  # urls are not files


def _truncated(path, samples):
    data = open(_write(path, samples), "rb").read()
    path.write_bytes(data[: len(data) * 2 // 3])  # cut inside a member
    return str(path)


def _complete_samples(path) -> int:
    """Brute force: how many (jpg, json) pairs a truncated tar still holds whole."""
    import tarfile

    names = []
    try:
        with tarfile.open(path, "r|") as tar:
            for m in tar:
                tar.extractfile(m).read()
                names.append(m.name)
    except tarfile.TarError:
        pass
    keys = Counter(n.rsplit(".", 1)[0] for n in names)
    return sum(1 for c in keys.values() if c == 2)


def test_bad_shards_are_skipped_and_counted_exactly(tmp_path):
    good = _write(tmp_path / "good.tar", [_sample(i, ["sea"]) for i in range(7)])
    cut = _truncated(tmp_path / "cut.tar", [_sample(100 + i, ["red"]) for i in range(20)])
    corrupt = _write(tmp_path / "corrupt.tar", [_sample(200 + i, ["sea"], jpg=_jpeg(i)[: 200 + i]) for i in range(9)])
    bombs = _write(tmp_path / "bombs.tar", [
        {"__key__": "b1", "png": png_bomb(30000, 30000), "json": b'{"tags": ["sea"]}'},  # 900M pixels claimed
        {"__key__": "b2", "png": png_bomb(9000, 9000), "json": b'{"tags": ["sea"]}'},  # 81M: under PIL's own limit
    ])
    metas = _write(tmp_path / "metas.tar", [
        {"__key__": f"m{i}", "jpg": _jpeg(i), "json": j}
        for i, j in enumerate([b"[1, 2]", b"null", b'"x"', b"{not json", b'{"tags": "sea"}', b'{"tags": [["a"]]}',
                               b"[" * 100000 + b"]" * 100000])  # not objects, no list of tags, too deep
    ] + [{"__key__": "m9", "jpg": _jpeg(9)}])  # no json at all
    whole = _complete_samples(cut)
    assert 0 < whole < 20
    batches = list(eval_loader([good, cut, corrupt, bombs, metas], VOCAB, image_size=16, batch_size=5,
                               num_workers=0, max_pixels=50_000_000))
    skipped = sum(b["skipped"] for b in batches).tolist()
    assert skipped == [1, 9, 0, 2, 8]  # [read_error, bad_image, no_tag, too_large, bad_meta]
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 7 + whole and len(set(keys)) == len(keys)


def test_training_on_a_truncated_and_a_corrupt_shard_does_not_stop(tmp_path):
    cut = _truncated(tmp_path / "cut.tar", [_sample(100 + i, ["red"]) for i in range(20)])
    corrupt = _write(tmp_path / "corrupt.tar", [_sample(200 + i, ["sea"], jpg=_jpeg(i)[:150]) for i in range(10)])
    good = _write(tmp_path / "good.tar", [_sample(i, ["sea", "canon"]) for i in range(10)])
    loader = train_loader([cut, corrupt, good], VOCAB, image_size=16, batch_size=4, batches_per_epoch=12,
                          num_workers=0, seed=3, shuffle_buffer=4)
    batches = list(loader)
    assert len(batches) == 12 and all(b["image"].shape == (4, 3, 16, 16) for b in batches)
    skipped = sum(b["skipped"] for b in batches)
    # exact counts are checked on the evaluation stream above (the same stages); the training stream
    # is endless and the counts after its last batch are not reported, so here: all there, never fatal
    assert skipped[0] >= 1 and skipped[1] >= 10


def _ranked_keys(rank: int, shards: list[str], vocab_path: str, rdv: str, out: str) -> None:
    """One process of a world of two: keys its training and evaluation loaders deliver."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    vocab = Vocabulary.load(vocab_path)
    train = train_loader(shards, vocab, image_size=16, batch_size=4, batches_per_epoch=15, num_workers=2,
                         seed=0, shuffle_buffer=8)  # rank and world size from torch.distributed
    evals = eval_loader(shards, vocab, image_size=16, batch_size=4, num_workers=2)
    result = {"train": [k for b in train for k in b["keys"]], "eval": [k for b in evals for k in b["keys"]],
              "train_batches": len(list(train))}
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f)


def _check_two_ranks(r0: dict, r1: dict) -> None:
    assert len(r0["train"]) == len(r1["train"]) == 60 and r0["train_batches"] == r1["train_batches"] == 15
    assert not set(r0["train"]) & set(r1["train"])  # disjoint across ranks
    assert set(r0["train"]) == {f"{10 * j + i:05d}" for j in (0, 2) for i in range(10)}  # both workers' shards read
    assert not set(r0["eval"]) & set(r1["eval"])
    assert sorted(r0["eval"] + r1["eval"]) == [f"{i:05d}" for i in range(40)]  # every image once


def test_two_ranks_given_explicitly_see_disjoint_samples(tmp_path):
    """Each rank's loaders (rank and world size given, 2 workers each) in this one process: what the spawned
    gloo test below checks with the rank taken from torch.distributed."""
    shards = [_write(tmp_path / f"s{j}.tar", [_sample(10 * j + i, ["sea"]) for i in range(10)]) for j in range(4)]
    got = []
    for rank in range(2):
        train = train_loader(shards, VOCAB, image_size=16, batch_size=4, batches_per_epoch=15, num_workers=2,
                             seed=0, shuffle_buffer=8, rank=rank, world_size=2)
        evals = eval_loader(shards, VOCAB, image_size=16, batch_size=4, num_workers=2, rank=rank, world_size=2)
        got.append({"train": [k for b in train for k in b["keys"]], "eval": [k for b in evals for k in b["keys"]],
                    "train_batches": len(list(train))})
    _check_two_ranks(*got)


@pytest.mark.slow  # two spawned processes (torch loaded in each); the same figures: the test above
def test_two_ranks_see_disjoint_samples(tmp_path):
    import torch.multiprocessing as mp

    shards = [_write(tmp_path / f"s{j}.tar", [_sample(10 * j + i, ["sea"]) for i in range(10)]) for j in range(4)]
    VOCAB.save(tmp_path / "vocab.tsv")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ranked_keys, args=(r, shards, str(tmp_path / "vocab.tsv"), str(tmp_path / "rdv"),
                                                    str(tmp_path / f"rank{r}.json"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    _check_two_ranks(*(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)))


def _smooth_photo(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("seed", range(6))
def test_reduced_decoding_keeps_the_crop_at_full_resolution(seed):
    import random

    from im2vec.data.images import open_image
    from im2vec.data.samples import train_view

    data = _smooth_photo(1600, 1200)
    fast = open_image(data)
    a = np.asarray(train_view(fast, 224, random.Random(seed), min_scale=0.1), dtype=np.float32)
    b = np.asarray(train_view(open_image(data), 224, random.Random(seed), min_scale=0.1, draft=False), dtype=np.float32)
    assert fast.size[0] < 1600  # the decoder did skip work ...
    assert np.abs(a - b).mean() < 2.0  # ... and the crop (same box, same flip) looks the same as from a full decode


def test_normalize_on_the_batch_device():
    from im2vec.data.samples import MEAN, STD, normalize

    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = normalize(x)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert y.dtype == torch.float32 and torch.allclose(y, ref, atol=1e-5)


def test_a_rank_whose_shards_are_all_unreadable_stops_with_a_clear_error(tmp_path):
    import signal

    from im2vec.data.samples import MAX_BAD_DRAWS

    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\0" * 300)  # not a tar
    empty = _write(tmp_path / "empty.tar", [])
    loader = train_loader([str(bad), empty], VOCAB, image_size=16, batch_size=4, batches_per_epoch=3,
                          num_workers=0, seed=0)
    signal.alarm(120)  # a hang fails the test instead of the whole run
    try:
        with pytest.raises(UserError, match=f"{MAX_BAD_DRAWS} shards drawn in a row without one readable sample"):
            list(loader)
    finally:
        signal.alarm(0)


def test_every_sample_is_used_equally_often_whatever_the_shard_sizes(tmp_path):
    """A drawn shard is read whole: shards must be drawn uniformly (not in proportion to their size, which
    would use a 30-sample shard's samples 5 times as often as a 6-sample shard's)."""
    import json as _json

    from im2vec.data.loader import resampled_shards
    from im2vec.data.shards import shard_sizes

    big = _write(tmp_path / "shard-000000.tar", [_sample(i, ["sea"]) for i in range(30)])
    small = _write(tmp_path / "shard-000001.tar", [_sample(100 + i, ["sea"]) for i in range(6)])
    assert shard_sizes([big, small]) is None  # no ingest stats
    for j, n in enumerate((30, 6)):
        (tmp_path / f"shard-{j:06d}.stats.json").write_text(_json.dumps({"written": n}))
    assert shard_sizes([big, small]) == [30, 6]
    stream = resampled_shards([big, small], seed=0)
    draws = Counter(next(stream)["url"] for _ in range(20000))
    assert abs(draws[big] - 10000) < 5 * 20000**0.5 / 2  # uniform: binomial(20000, 1/2) ± 5σ
    loader = train_loader([big, small], VOCAB, image_size=8, batch_size=36, batches_per_epoch=100, num_workers=0,
                          seed=1, shuffle_buffer=40, rank=0, world_size=1)
    used = Counter("big" if int(k) < 100 else "small" for b in loader for k in b["keys"])
    assert used["big"] / 30 == pytest.approx(used["small"] / 6, rel=0.15)  # per sample, equally often


def test_one_validation_shard_for_two_ranks():
    # nothing for rank 1, no crash; a loader of no batches (not []), so its validation hooks still run and meet
    # rank 0's collectives (Lightning skips the whole validation loop of a rank whose loader list is empty)
    loader = eval_loader(["only.tar"], VOCAB, 16, 4, 0, rank=1, world_size=2)
    assert loader != [] and list(loader) == []


def test_training_skip_counts_match_a_replay_of_the_stream(tmp_path):
    """With a pass-through shuffle the training stream's order is known: replay the shard draws and
    count, batch by batch, the corrupt images met since the previous batch was emitted."""
    from im2vec.data.loader import resampled_shards

    corrupt = _write(tmp_path / "corrupt.tar", [_sample(100 + i, ["sea"], jpg=_jpeg(i)[:120]) for i in range(7)])
    good = _write(tmp_path / "good.tar", [_sample(i, ["sea"]) for i in range(5)])
    mixed = _write(tmp_path / "mixed.tar", [_sample(200 + i, ["red"], jpg=_jpeg(i)[: 120 if i % 2 else None])
                                            for i in range(6)])
    shards, batch, n_batches = [corrupt, good, mixed], 4, 15
    loader = train_loader(shards, VOCAB, image_size=16, batch_size=batch, batches_per_epoch=n_batches,
                          num_workers=0, seed=11, shuffle_buffer=1, interleave=1)  # one shard at a time: replayable
    got = [int(b["skipped"][SKIP_IMAGE]) for b in loader]
    bad = {corrupt: [True] * 7, good: [False] * 5, mixed: [i % 2 == 1 for i in range(6)]}
    want, since, filled, draws = [], 0, 0, resampled_shards(shards, seed=11)
    while len(want) < n_batches:
        for is_bad in bad[next(draws)["url"]]:
            if is_bad:
                since += 1
                continue
            if filled == batch:  # webdataset's batched() emits a full batch when the next sample arrives
                want.append(since)
                since, filled = 0, 0
                if len(want) == n_batches:
                    break
            filled += 1
    assert got == want and sum(got) > 7


def test_interleaved_shards_mix_in_every_batch(tmp_path):
    """Shards cut from a sorted list hold one category each: read one at a time (and a shuffle buffer of 1)
    a batch is one shard's; read four at a time, batches mix them. A truncated shard is counted, not fatal."""
    shards = [_write(tmp_path / f"cat{c}.tar", [_sample(100 * c + i, ["sea"]) for i in range(40)]) for c in range(6)]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(shards[0], "rb").read()[:3000])
    shards.append(str(cut))

    def categories(interleave):
        loader = train_loader(shards, VOCAB, image_size=8, batch_size=16, batches_per_epoch=12, num_workers=0,
                              seed=2, shuffle_buffer=1, rank=0, world_size=1, interleave=interleave)
        batches = list(loader)
        read_errors = sum(int(b["skipped"][0]) for b in batches)
        return [len({int(k) // 100 for k in b["keys"]}) for b in batches], read_errors

    one, _ = categories(1)
    four, errors = categories(4)
    assert sum(one) / len(one) < 1.5  # mostly one category a batch (two where a shard ends)
    assert min(four) >= 2 and sum(four) / len(four) > 3
    assert errors >= 1  # the cut shard was drawn, counted, and the stream went on


@pytest.mark.parametrize("case", ["vocabulary of other shards", "every image corrupt", "every json bad"])
def test_a_stream_without_one_usable_sample_stops_and_says_why(tmp_path, monkeypatch, case):
    """Readable shards whose every sample is skipped (tags outside the vocabulary, corrupt images, bad JSON)
    used to loop forever: the loader now stops after the shuffle buffer + MAX_UNUSABLE samples, naming the
    skip reasons it counted."""
    import signal

    import im2vec.data.loader as data

    monkeypatch.setattr(data, "MAX_UNUSABLE", 300)
    if case == "vocabulary of other shards":
        samples, reason = [_sample(i, ["elsewhere"]) for i in range(20)], "no_tag"
    elif case == "every image corrupt":
        samples, reason = [_sample(i, ["sea"], jpg=b"\xff\xd8 not a jpeg") for i in range(20)], "bad_image"
    else:
        samples = [{"__key__": f"{i:05d}", "jpg": _jpeg(i), "json": b"{not json"} for i in range(20)]
        reason = "bad_meta"
    shard = _write(tmp_path / "a.tar", samples)
    loader = train_loader([shard], VOCAB, image_size=16, batch_size=4, batches_per_epoch=3, num_workers=0, seed=0,
                          shuffle_buffer=10)
    signal.alarm(120)  # a hang fails the test instead of the whole run
    try:
        with pytest.raises(UserError, match=rf"data: 311 samples read \(rank 0\), none usable: {reason} 3\d\d "
                                               r".*does data.vocab_path belong to these shards"):
            list(loader)
    finally:
        signal.alarm(0)


def test_a_healthy_but_noisy_stream_does_not_trip_the_guard(tmp_path, monkeypatch):
    """One usable sample among many skipped ones resets the count: training goes on."""
    import im2vec.data.loader as data

    monkeypatch.setattr(data, "MAX_UNUSABLE", 200)  # 4 interleaved streams: gaps of up to ~80 skipped samples
    samples = [_sample(i, ["sea"] if i % 20 == 0 else ["elsewhere"]) for i in range(200)]  # 1 in 20 usable
    shard = _write(tmp_path / "a.tar", samples)
    loader = train_loader([shard], VOCAB, image_size=16, batch_size=4, batches_per_epoch=5, num_workers=0, seed=0,
                          shuffle_buffer=10)
    assert len(list(loader)) == 5


def test_malformed_clean_tags_are_a_skipped_sample_not_a_crash(tmp_path):
    shard = _write(tmp_path / "a.tar", [
        {"__key__": "00000", "jpg": _jpeg(0), "json": json.dumps({"tags": ["sea"], "clean_tags": [["x"]]}).encode()},
        {"__key__": "00001", "jpg": _jpeg(1), "json": json.dumps({"tags": [["sea"]]}).encode()},
        _sample(2, ["sea"], clean=["sea"]),
    ])
    from im2vec.data.samples import SKIP_BAD_META

    batches = list(eval_loader([shard], VOCAB, image_size=16, batch_size=8, num_workers=0))
    assert [b["keys"] for b in batches] == [["00002"]]
    assert int(sum(b["skipped"][SKIP_BAD_META] for b in batches)) == 2


def test_an_oversized_or_odd_json_is_one_bad_meta_skip(tmp_path):
    from im2vec.data.samples import MAX_META_BYTES, SKIP_BAD_META

    huge = json.dumps({"tags": ["sea"], "description": "x" * MAX_META_BYTES}).encode()  # parses, but is not metadata
    shard = _write(tmp_path / "a.tar", [
        {"__key__": "00000", "jpg": _jpeg(0), "json": huge},
        {"__key__": "00001", "jpg": _jpeg(1), "json": b'{"tags": ["sea"], "user": "\xff\xfe"}'},  # not UTF-8
        {"__key__": "00002", "jpg": _jpeg(2), "json": b"[" * 100_000},  # deeper than the parser recurses
        {"__key__": "00003", "jpg": _jpeg(3), "json": json.dumps({"tags": ["sea\x00", "sea"], "user": [[{}]]}).encode()},
        _sample(4, ["sea"]),
    ])
    batches = list(eval_loader([shard], VOCAB, image_size=16, batch_size=8, num_workers=0))
    assert sorted(k for b in batches for k in b["keys"]) == ["00003", "00004"]  # an odd user or NUL tag is no harm
    assert int(sum(b["skipped"][SKIP_BAD_META] for b in batches)) == 3


def test_a_loader_worker_signalled_by_the_scheduler_keeps_working(tmp_path):
    """SLURM's pre-emption warning (--signal=USR1@120) reaches every process of the job: the loader's workers
    leave it to the trainer (which checkpoints and stops them) instead of dying mid-epoch."""
    import os
    import signal
    import time

    shard = _write(tmp_path / "val.tar", [_sample(i, ["sea"]) for i in range(12)])
    loader = eval_loader([str(shard)], VOCAB, 16, 4, 1, rank=0, world_size=1)
    it = iter(loader)
    first = next(it)
    import multiprocessing

    (worker,) = multiprocessing.active_children()  # the loader's one worker
    os.kill(worker.pid, signal.SIGUSR1)  # its default action would end the worker
    time.sleep(0.5)
    assert worker.is_alive()
    rest = list(it)
    assert sum(len(b["keys"]) for b in [first, *rest]) == 12
