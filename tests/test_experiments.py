"""The documented way in, end to end: raw files -> ingest -> vocabulary -> train.py's train(cfg)."""

import io
import json

import numpy as np
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from im2vec.data.ingest import main as ingest
from im2vec.data.vocab import main as vocab
from im2vec.train.training import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SMALL = ["model=small_cnn", "model.dim=16", "data.image_size=32", "data.batch_size=8", "data.batches_per_epoch=3",
         "data.num_workers=0", "data.val_batch_size=16", "data.shuffle_buffer=20", "data.vocab_min_count=1",
         "trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "optim.warmup_batches=2", "validation.projector_tags=10", "validation.grid_images=2",
         "train_samples=null"]  # the collection recipes' 300,000 samples would be thousands of epochs here


def _photo(colour: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    px = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, (60, 80, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG")
    return buf.getvalue()


def _cfg(experiment: str, data_dir, out, *overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={experiment}", *SMALL, f"paths.data_dir={data_dir}",
                                           f"paths.output_dir={out}", *overrides])


def _scalars(out) -> dict:
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: ea.Scalars(t)[-1].value for t in ea.Tags()["scalars"]}


def test_collection_experiment_trains_from_ingested_shards_with_bad_ones_among_them(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for i in range(90):
        colour = list(COLOURS)[i % 3]
        (photos / f"{i}.jpg").write_bytes(_photo(colour, i))
        rows.append({"image": f"{i}.jpg", "tags": [colour, "Canon", f"img{i}"]})
    (photos / "manifest.jsonl").write_text("\n".join(map(json.dumps, rows)))
    data = tmp_path / "data"
    ingest(["collection", str(photos / "manifest.jsonl"), "--out", str(data / "collection"), "--shard-size", "20",
            "--val-fraction", "0.2", "--test-fraction", "0", "--workers", "2", "--quiet"])
    vocab([str(data / "collection" / "vocab.tsv"), "--shards", str(data / "collection" / "train" / "*.tar"),
           "--min-count", "2", "--quiet"])
    # a truncated shard and a shard of corrupt images among the training shards
    train_dir = data / "collection" / "train"
    good = sorted(train_dir.glob("*.tar"))[0].read_bytes()
    (train_dir / "shard-900000.tar").write_bytes(good[: len(good) // 2])
    import webdataset as wds
    with wds.TarWriter(str(train_dir / "shard-900001.tar")) as sink:
        for i in range(20):
            sink.write({"__key__": f"bad{i}", "jpg": _photo("red", i)[:100], "json": b'{"tags": ["red"]}'})
    out = tmp_path / "run"
    cfg = _cfg("collection", data, out, "data.batches_per_epoch=12")
    assert cfg.data.train_shards == f"{data}/collection/train/shard-*.tar"
    metrics, objs = train(cfg)
    assert objs["trainer"].current_epoch == 2 and (out / "checkpoints" / "last.ckpt").is_file()
    logged = _scalars(out)
    assert logged["data/skipped_read_error"] >= 1 and logged["data/skipped_bad_image"] >= 1  # counted, not fatal
    assert 0 <= metrics["val/precision@5"] <= 1 and "val/precision@5_prior" in metrics
    assert objs["datamodule"].vocab.tags[0] == "canon"  # on every photo: the most frequent tag


def test_yfcc_experiment_trains_from_the_yfcc_ingest(tmp_path):
    from test_ingest import _line

    mirror, lines = tmp_path / "mirror", []
    for i in range(60):
        colour = list(COLOURS)[i % 3]
        h = f"{i:06x}{'ab' * 13}"
        p = mirror / "images" / h[:3] / h[3:6] / f"{h}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_photo(colour, i))
        lines.append(_line(i, str(5000 + i), h, f"{colour},nikon,2015", user=f"u{i % 10}@N00"))
    (tmp_path / "yfcc100m_dataset").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    ingest(["yfcc", str(tmp_path / "yfcc100m_dataset"), "--images", str(mirror), "--out", str(data / "yfcc"),
            "--split-by", "user", "--val-fraction", "0.2", "--test-fraction", "0", "--shard-size", "10",
            "--workers", "0", "--quiet"])
    vocab([str(data / "yfcc" / "vocab.tsv"), "--yfcc", str(tmp_path / "yfcc100m_dataset"), "--like",
           str(data / "yfcc"), "--split", "train", "--quiet"])
    out = tmp_path / "run"
    cfg = _cfg("yfcc", data, out, "trainer=default", "trainer.precision=32-true")
    assert cfg.data.vocab_max_size == 600000
    metrics, objs = train(cfg)
    assert (out / "checkpoints" / "last.ckpt").is_file() and "val/precision@5" in metrics
    assert set(objs["datamodule"].vocab.tags) == {"red", "green", "blue", "nikon", "2015"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A tiny collection of 9 uploaders, ingested with --split-by user (test and val uploaders held out)."""
    tmp_path = tmp_path_factory.mktemp("collection")
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = [{"image": f"{i}.jpg", "tags": [list(COLOURS)[i % 3], f"shade{i % 4}"], "user": f"u{i % 9}"} for i in range(90)]
    for i, r in enumerate(rows):
        (photos / r["image"]).write_bytes(_photo(r["tags"][0], i))
    (photos / "manifest.jsonl").write_text("\n".join(map(json.dumps, rows)))
    data = tmp_path / "data"
    ingest(["collection", str(photos / "manifest.jsonl"), "--out", str(data / "collection"), "--shard-size", "20",
            "--split-by", "user", "--val-fraction", "0.25", "--test-fraction", "0.25", "--workers", "0", "--quiet"])
    vocab([str(data / "collection" / "vocab.tsv"), "--shards", str(data / "collection" / "train" / "*.tar"),
           "--min-count", "2", "--quiet"])
    return data


def test_evaluate_scores_a_collection_checkpoint_on_its_own_data_and_refuses_another(collection, tmp_path, cache_dir,
                                                                                       capsys):
    """evaluate.py ckpt_path=… alone: the data settings the checkpoint recorded, so the same test figures as the run
    that wrote it (not the built-in corpus, as before); images of other data (no tag in common) refused in one line."""
    from im2vec.errors import BadValue
    from im2vec.use.evaluate import evaluate

    data = collection
    out = tmp_path / "run"
    metrics, _ = train(_cfg("collection_cpu", data, out, "data.batches_per_epoch=4", "data.user_temperature=null"))
    assert metrics["test/images"] > 0
    ckpt = out / "checkpoints" / "last.ckpt"

    def ev(*overrides):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            return evaluate(compose("evaluate", overrides=[f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'ev'}",
                                                           "num_workers=0", "grid_images=2", "query_pictures=1",
                                                           f"paths.cache_dir={cache_dir}", *overrides]))

    m = ev()  # run from anywhere: the recorded paths are absolute
    assert "the checkpoint's own data" in capsys.readouterr().err
    assert m["info/images"] == metrics["test/images"]
    for k in ("precision@1", "precision@5", "recall@10", "map"):
        assert m[f"tagging/{k}"] == pytest.approx(metrics[f"test/tagging/{k}"], abs=1e-6), k
        assert m[f"prior/tagging/{k}"] == pytest.approx(metrics[f"test/prior/tagging/{k}"], abs=1e-6), k
    small = ["data.corpus.num_train=64", "data.corpus.num_val=32", "data.corpus.num_test=32",
             "data.corpus.num_users=6", "data.corpus.tail_size=100", "data.corpus.shard_size=32"]
    with pytest.raises(BadValue, match=r"held-out images in 1 shard\(s\) share no tag with the checkpoint's"):
        ev("data=default", *small)  # the built-in corpus: not one of its tags is a colour name here


def test_the_dense_baseline_trains_at_the_recipes_budget_and_scores_like_training(collection, tmp_path):
    """im2vec.bench.dense on the recipe's config: its logits are what the scorers rank ([f, 1] · [w, b]), its prior
    figures are training's on the same test images, and its own figures are computed by the same code."""
    import torch

    from im2vec.bench.dense import DenseTagger, WithOne, train_dense

    cfg = _cfg("collection_cpu", collection, tmp_path / "run", "data.batches_per_epoch=4", "data.user_temperature=0.5",
               "train_samples=96")  # sized by samples as the recipe is: 3 epochs of 4 batches of 8
    m = train_dense(cfg)
    trained, _ = train(cfg)
    for k in ("precision@1", "precision@5", "recall@10", "map"):
        assert m[f"test/prior/tagging/{k}"] == pytest.approx(trained[f"test/prior/tagging/{k}"], abs=1e-6), k
        assert 0 <= m[f"test/tagging/{k}"] <= 1
    assert m["test/images"] == trained["test/images"] and m["test/gamma"] == 0.0
    assert m["test/tagging/precision@5"] == pytest.approx(m["test/gamma_sweep/precision@5/0"], abs=1e-6)
    x = torch.randn(3, 3, 32, 32)
    for kw in ({}, {"bias": False}, {"rank": 4}, {"rank": 4, "bias": False}):  # the diagnostics' forms fold too
        model = DenseTagger("small_cnn", 5, **kw).eval()
        with torch.no_grad():
            if model.head.bias is not None:
                model.head.bias.normal_()  # a bias that matters
            assert torch.allclose(WithOne(model.trunk)(x) @ model.as_table().t(), model(x), atol=1e-5), kw


def test_the_gamma_benchmark_redraws_validation_and_agrees_with_training_on_the_whole_split(collection, tmp_path):
    """im2vec.bench.gamma on a finished run: on the whole validation split its 'best' rule picks the γ training
    picked (same images, same criterion); on smaller draws it gives a test P@5 of the run's own test sweep."""
    from im2vec.bench import gamma

    out = tmp_path / "run"
    metrics, _ = train(_cfg("collection_cpu", collection, out, "data.batches_per_epoch=4", "data.user_temperature=null"))
    v, m = gamma.run_values(out)
    assert m["val/gamma"] == metrics["val/gamma"] and len(set(v["users"])) == int(metrics["val/uploaders"])
    all_rows = list(range(len(v["keys"])))
    gammas = sorted(float(k.rsplit("/", 1)[1]) for k in m if k.startswith("test/gamma_sweep/precision@5/"))
    assert gamma.choose_on(v, all_rows, gammas, "best") == metrics["val/gamma"]
    res = gamma.measure([out], [1], draws=3)
    rec = res[str(out)]
    sweep = {metrics[f"test/gamma_sweep/precision@5/{g:g}"] for g in gammas}
    assert rec["oracle"] == max(sweep)
    for size in ("1", str(len(set(v["users"])))):
        for rule in ("best", "within"):
            assert min(sweep) <= rec[size][rule] <= max(sweep)


def test_the_collection_recipe_takes_the_full_head_for_a_small_vocabulary_and_the_sampled_one_above(collection, tmp_path):
    from im2vec.errors import make
    from im2vec.train.training import build_module
    from im2vec.wide.head import SamplerConfig, resolve_head

    cfg = _cfg("collection_cpu", collection, tmp_path / "run")
    assert cfg.sampler.head == "auto"
    dm = make(cfg.data)
    dm.resolve_epoch()
    assert build_module(cfg, dm).sampler_cfg.head == "full"  # 7 tags
    cfg.sampler.full_max_tags = 5
    assert build_module(cfg, dm).sampler_cfg.head == "sampled"
    s = SamplerConfig(head="auto", full_max_tags=10)
    assert resolve_head(s, 10, False) == "full" and resolve_head(s, 11, False) == "sampled"
    assert resolve_head(s, 3, True) == "sampled"  # a sharded table has no full head
    assert resolve_head(SamplerConfig(head="full"), 10**6, False) == "full"  # asked for: as asked
