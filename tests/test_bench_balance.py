"""python -m im2vec.bench.balance on two tiny collections laid out as the real ones: it runs, and what it says
about the settings is computed right (no speed is asserted: timings are flaky on a shared machine)."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from im2vec.bench import balance
from im2vec.data.ingest import stats_name
from im2vec.data.shards import user_uses
from im2vec.data.vocab import Vocabulary


def _collection(root, users: list[str]):
    (root / "train").mkdir(parents=True)
    Vocabulary(["sea", "sky"], [len(users), 3]).save(root / "vocab.tsv")
    shard = root / "train" / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, u in enumerate(users):
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 24, 3), i % 250, np.uint8)).save(buf, "JPEG")
            sink.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "json": json.dumps({"tags": ["sea"], "user": u}).encode()})
    stats_name(shard).write_text(json.dumps({"written": len(users), "users": dict(Counter(users))}))


def test_the_balance_benchmark_runs_and_states_the_settings(tmp_path, capsys):
    few = [f"v{i % 4}" for i in range(120)]  # 4 uploaders of 30
    many = [f"u{i}" for i in range(30)] * 2 + ["big"] * 60  # 30 uploaders of 2, one of 60
    _collection(tmp_path / "emoji" / "random", few)
    _collection(tmp_path / "openclipart" / "random", many)
    r = balance.main(["--data-dir", str(tmp_path), "--batches", "2", "--batch", "8", "--rounds", "1", "--workers", "0"])
    few_r, many_r = r["loader"].values()
    assert few_r["uploaders"] == 4 and many_r["uploaders"] == 31 and many_r["images"] == 120
    assert many_r["old_cap_pass"] == {"samples": 60 + 25, "of": 120}  # min(n, 25) summed
    for d in (few_r, many_r):
        assert set(d["images_per_s"]) == {"no balance", "τ = 0.5", f"old cap ({balance.CAP} a pass)"}
        assert all(v > 0 for rates in d["images_per_s"].values() for v in rates.values())
    text = capsys.readouterr().out
    assert text.count("| stream |") == 2 and text.count("| memory |") == 2


def test_the_settings_compared_are_the_recipes_and_the_old_caps():
    counts = Counter({"a": 100, "b": 5})
    s = balance.settings(counts, 0.5)
    assert s["no balance"] == {} and s["τ = 0.5"] == pytest.approx(user_uses(counts, 0.5))
    assert s[f"old cap ({balance.CAP} a pass)"] == {"a": 0.25, "b": 1.0}


def test_batch_mix_is_the_total_variation_from_the_collections_shares():
    shares = {"a": 0.5, "b": 0.25, "c": 0.25}
    assert balance.batch_mix([["a", "a", "b", "c"]], shares) == 0  # exactly the collection's shares
    assert balance.batch_mix([["a", "a", "a", "a"]], shares) == pytest.approx(0.5)
    assert balance.batch_mix([["d", "d"], ["a", "b", "c", "a"]], shares) == pytest.approx(0.5)  # 1 and 0
