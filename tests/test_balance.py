"""Uploader balance (data.max_per_user): counts per uploader, the chances, and the stream they give."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from im2vec.data import balance_users, train_loader, user_counts
from im2vec.ingest import Settings, collection_samples, run, stats_name
from im2vec.vocab import Vocabulary

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


def test_balance_users_gives_each_prolific_uploader_max_over_n():
    counts = Counter({"a": 1000, "b": 100, "c": 101, "d": 3})
    assert balance_users(counts, 100) == {"a": 0.1, "c": 100 / 101}  # at or under the cap: always used
    assert balance_users(counts, None) == {} and balance_users(counts, 0) == {}
    with pytest.raises(ValueError, match="max_per_user"):
        balance_users(counts, -5)


def test_each_sample_of_a_prolific_uploader_is_used_with_chance_max_over_n():
    """The decode stage against its binomial expectation: 1,000 samples read of an uploader with a chance
    of 0.1 each give 100 ± 5σ (σ ≈ 9.5); an uploader under the cap keeps every sample."""
    from im2vec.data import _Samples, eval_view

    stages = _Samples(VOCAB, eval_view, 8, seed=5, user_keep={"big": 0.1})
    samples = [{"__key__": f"{i:05d}", "jpg": _jpeg(i % 7),
                "json": json.dumps({"tags": ["sea"], "user": "big" if i < 1000 else "small"}).encode()}
               for i in range(1100)]
    kept = Counter("big" if int(key) < 1000 else "small" for *_, key in stages.decode(iter(samples)))
    assert kept["small"] == 100 and abs(kept["big"] - 100) < 5 * (1000 * 0.1 * 0.9) ** 0.5
    assert sum(stages.skipped) == 0  # passed over, not counted as bad data


def test_the_stream_gives_each_uploader_about_max_per_user_samples(tmp_path):
    """One uploader with 200 samples (ten shards of 20), another with 20 (one shard): shards are drawn
    uniformly, so without balance about 10 of 11 samples are the first's; with max_per_user=20 the two
    give about as many (expected 200·(20/200) : 20·1 = 1)."""
    shards = [_shard(tmp_path / f"big{j}.tar", "big", 20, start=20 * j) for j in range(10)]
    shards.append(_shard(tmp_path / "small.tar", "small", 20, start=200))
    keep = balance_users(user_counts(shards), 20)
    assert keep == {"big": 0.1}

    def users(user_keep):
        loader = train_loader(shards, VOCAB, image_size=8, batch_size=50, batches_per_epoch=60, num_workers=0,
                              seed=3, shuffle_buffer=50, rank=0, world_size=1, user_keep=user_keep)
        return Counter("big" if int(k) < 200 else "small" for b in loader for k in b["keys"])

    plain, balanced = users({}), users(keep)
    assert sum(plain.values()) == sum(balanced.values()) == 3000
    assert 6 < plain["big"] / plain["small"] < 16
    assert 0.6 < balanced["big"] / balanced["small"] < 1.6
    assert users(keep) == balanced  # the same stream again: the chances come from the stream's own seed
