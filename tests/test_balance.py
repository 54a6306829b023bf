"""Uploader balance (data.user_temperature): counts per uploader, each sample's uses a pass, and the streams
(webdataset, and the split decoded once into memory) they give."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from im2vec.data.ingest import Settings, collection_samples, run, stats_name
from im2vec.data.loader import train_loader
from im2vec.data.shards import user_counts, user_uses
from im2vec.data.vocab import Vocabulary

VOCAB = Vocabulary(["sea", "red"], [30, 20])


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _shard(path, user, n, start=0, stats=None):
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + n):
            meta = {"tags": ["sea"]} if user is None else {"tags": ["sea"], "user": user}
            sink.write({"__key__": f"{i:05d}", "jpg": _jpeg(i), "json": json.dumps(meta).encode()})
    if stats is not None:
        stats_name(path).write_text(json.dumps(stats))
    return str(path)


def test_user_counts_from_stats_and_from_the_shards_agree(tmp_path):
    a = _shard(tmp_path / "a.tar", "ann", 7)
    b = _shard(tmp_path / "b.tar", "bob", 3, start=7)
    c = _shard(tmp_path / "c.tar", None, 4, start=10)  # no uploader: not counted
    assert user_counts([a, b, c]) == Counter({"ann": 7, "bob": 3})  # read from the json members
    for p, users in ((a, {"ann": 7}), (b, {"bob": 3}), (c, {})):
        stats_name(tmp_path / p.rsplit("/", 1)[1]).write_text(json.dumps({"written": 1, "users": users}))
    # from the stats files now: they say so even where the tars would say otherwise
    stats_name(tmp_path / "a.tar").write_text(json.dumps({"written": 7, "users": {"ann": 70}}))
    assert user_counts([a, b, c]) == Counter({"ann": 70, "bob": 3})
    stats_name(tmp_path / "c.tar").write_text(json.dumps({"written": 4}))  # one stats file without users: read all
    assert user_counts([a, b, c]) == Counter({"ann": 7, "bob": 3})


def test_the_ingest_records_samples_per_uploader(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i, user in enumerate(["ann"] * 5 + ["bob"] * 2 + [None]):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "tags": ["sea"], **({"user": user} if user else {})})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = Settings(source="collection", inputs=[str(manifest)], root=str(tmp_path), val_fraction=0, test_fraction=0)
    run(s, collection_samples(s), tmp_path / "out", verbose=False)
    stats = json.loads((tmp_path / "out" / "train" / "shard-000000.stats.json").read_text())
    assert stats["users"] == {"ann": 5, "bob": 2} and stats["written"] == 8
    assert user_counts([str(tmp_path / "out" / "train" / "shard-000000.tar")]) == Counter({"ann": 5, "bob": 2})


def test_user_uses_give_each_uploader_a_share_of_n_to_the_tau_and_sum_to_the_samples():
    counts = Counter({"a": 1000, "b": 100, "c": 10, "d": 1})
    n = sum(counts.values())
    for tau in (0.0, 0.25, 0.5, 0.9):
        uses = user_uses(counts, tau)
        shares = {u: counts[u] * uses[u] for u in counts}  # samples of u used in a pass
        assert sum(shares.values()) == pytest.approx(n)  # as many uses as samples: a pass reads what it uses
        brute = {u: n * c ** tau / sum(x ** tau for x in counts.values()) for u, c in counts.items()}
        assert shares == pytest.approx(brute)
    assert len(set(round(counts[u] * m, 6) for u, m in user_uses(counts, 0.0).items())) == 1  # τ = 0: equal shares
    assert user_uses(counts, 1.0) == {} and user_uses(counts, None) == {}  # no balance
    for bad in (-0.5, 1.5):
        with pytest.raises(ValueError, match="user_temperature"):
            user_uses(counts, bad)


def test_each_sample_is_used_its_uploaders_number_of_times_on_average():
    """The balance stage against its expectation: an uploader's samples with 0.25 uses each pass 1 in 4 on
    average (binomial: 250 ± 5σ of 1,000), with 2.5 uses twice or three times (2,500 ± 5σ of 1,000); a sample of
    nobody once. Nothing is counted as skipped."""
    from im2vec.data.samples import _Samples, eval_view

    stages = _Samples(VOCAB, eval_view, 8, seed=5, user_uses={"big": 0.25, "small": 2.5})
    users = ["big"] * 1000 + ["small"] * 1000 + [None] * 10
    samples = [{"__key__": f"{i:05d}", "jpg": b"", "json": json.dumps({"tags": ["sea"], "user": u}).encode()}
               for i, u in enumerate(users)]
    used = Counter(users[int(s["__key__"])] for s in stages.balanced(iter(samples)))
    sd = (1000 * 0.25 * 0.75) ** 0.5
    assert abs(used["big"] - 250) < 5 * sd and abs(used["small"] - 2500) < 5 * sd and used[None] == 10
    assert sum(stages.skipped) == 0


def _mixed_shards(tmp_path):
    """One uploader with 200 samples (ten shards of 20), another with 20 (one shard)."""
    shards = [_shard(tmp_path / f"big{j}.tar", "big", 20, start=20 * j) for j in range(10)]
    shards.append(_shard(tmp_path / "small.tar", "small", 20, start=200))
    return shards


def test_the_stream_balances_uploaders_and_reads_what_it_uses(tmp_path):
    """Without balance about 10 of 11 samples are the big uploader's; with τ = 0 the two give about as many; and
    the stream reads about as many samples as it uses (the old cap read ten of the big uploader's for each one it
    used: the reads are counted here by the stage that sees every sample read)."""
    from im2vec.data.samples import _Samples

    shards = _mixed_shards(tmp_path)
    uses = user_uses(user_counts(shards), 0.0)
    assert uses == pytest.approx({"big": 220 / 2 / 200, "small": 220 / 2 / 20})
    reads = []
    seen = _Samples.seen

    def counting(self, samples):
        for s in seen(self, samples):
            reads.append(1)
            yield s

    def users(user_uses):
        reads.clear()
        loader = train_loader(shards, VOCAB, image_size=8, batch_size=50, batches_per_epoch=60, num_workers=0,
                              seed=3, shuffle_buffer=50, rank=0, world_size=1, user_uses=user_uses)
        got = Counter("big" if int(k) < 200 else "small" for b in loader for k in b["keys"])
        return got, len(reads)

    import unittest.mock

    with unittest.mock.patch.object(_Samples, "seen", counting):
        (plain, plain_reads), (balanced, balanced_reads) = users({}), users(uses)
    assert sum(plain.values()) == sum(balanced.values()) == 3000
    assert 6 < plain["big"] / plain["small"] < 16
    assert 0.6 < balanced["big"] / balanced["small"] < 1.6
    assert 0.8 < balanced_reads / plain_reads < 1.25  # reading is not the price of balance
    with unittest.mock.patch.object(_Samples, "seen", counting):
        assert users(uses)[0] == balanced  # the same stream again: the draws come from the stream's own seed


def test_the_split_in_memory_balances_uploaders_by_index(tmp_path):
    """The same two uploaders decoded once (im2vec.data.memory): τ = 0 gives them equal shares of an epoch; each of the
    small uploader's samples is used about 5.5 times, none is read again."""
    from im2vec.data.memory import MemoryBatches, decode_split

    shards = _mixed_shards(tmp_path)
    data = decode_split(shards, VOCAB, 8, 0, 0, 1)
    assert len(data) == 220 and Counter(data.users) == {"big": 200, "small": 20}
    uses = user_uses(user_counts(shards), 0.0)
    weights = torch.tensor([uses[u] for u in data.users])
    batches = list(MemoryBatches(data, 55, 40, 8, 0.7, seed=1, weights=weights))  # an epoch of 10 passes
    got = Counter(u for b in batches for u in b["users"])
    per_sample = Counter(k for b in batches for k in b["keys"])
    # the big uploader's samples 5.5 times each expected: 5 or 6 (the whole part and a coin); the small one's 55
    big = {k: n for k, n in per_sample.items() if int(k) < 200}
    assert sum(got.values()) == 2200 and len(per_sample) == 220 and set(big.values()) <= {5, 6}
    assert set(per_sample.values()) - {5, 6} <= {54, 55, 56}
    assert abs(got["big"] - 1100) < 5 * (200 * 0.25) ** 0.5
    plain = Counter(u for b in MemoryBatches(data, 55, 40, 8, 0.7, seed=1) for u in b["users"])
    assert plain == {"big": 2000, "small": 200}  # no balance: every sample 10 times
