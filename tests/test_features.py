"""Frozen-trunk fast mode: extraction (python -m im2vec.train.features) against a brute-force pass of the trunk,
corrupt samples skipped and counted, one-line errors; training from the features through the real Hydra
config (+experiment=features): the trunk bit-identical, W and the table trained, the checkpoint a Tagger of
images, resume."""

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from PIL import Image

from im2vec.data.corpus import CorpusSpec, ensure_corpus
from im2vec.data.images import open_image
from im2vec.data.samples import eval_view, normalize, to_uint8_tensor
from im2vec.train.checkpoint import load_model
from im2vec.train.features import (
    MANIFEST,
    TRUNK_FILE,
    main,
    trunk_digest,
)
from im2vec.train.frozen_trunk import read_trunk_file
from im2vec.train.training import train
from im2vec.use.predict import Tagger

SPEC = {o.split("=")[0].split(".")[-1]: int(o.split("=")[1]) for o in TINY if o.startswith("data.corpus.")}


def _cfg(cache_dir, out, *overrides, tiny=TINY):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[*tiny, f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}",
                                           "validation.val_gammas=[0.0,0.2]", *overrides])


def _members(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a tar shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def run(cache_dir, tmp_path_factory):
    """A tiny end-to-end checkpoint, its trunk's features of the corpus's three splits, a features-mode
    training run from them (2 epochs of 8 batches) and its resumption for a third epoch."""
    root = ensure_corpus(cache_dir, CorpusSpec(**SPEC))
    base = tmp_path_factory.mktemp("features")
    _, e2e = train(_cfg(cache_dir, base / "e2e", "trainer.max_epochs=1"))
    ckpt = base / "e2e" / "checkpoints" / "last.ckpt"
    feats = base / "feats"
    for split in ("train", "val", "test"):
        assert main([str(ckpt), f"{root}/{split}-*.tar", "--out", str(feats / split), "--num-workers", "0"]) == 0
    over = ["+experiment=features", f"data.features_dir={feats}", "data.batches_per_epoch=8"]
    metrics, objs = train(_cfg(cache_dir, base / "fm", *over))
    last = base / "fm" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)  # before the resumed run replaces it
    resumed, robjs = train(_cfg(cache_dir, base / "fm", *over, "trainer.max_epochs=3", f"ckpt_path={last}"))
    return SimpleNamespace(root=root, ckpt=ckpt, feats=feats, metrics=metrics, objs=objs, first=first, last=last,
                           resumed=resumed, robjs=robjs, out=base / "fm")


def test_features_equal_the_trunk_on_eval_views_and_carry_the_json(run):
    trunk = load_model(run.ckpt).encoder.trunk
    manifest = json.loads((run.feats / "val" / MANIFEST).read_text())
    size = manifest["image_size"]
    assert (manifest["trunk"], manifest["width"], size) == ("small_cnn", 128, 64)
    assert manifest["trunk_digest"] == trunk_digest(trunk) == read_trunk_file(run.feats / "val" / TRUNK_FILE)["digest"]
    sources = sorted(run.root.glob("val-*.tar"))
    assert manifest["source_shards"] == [str(p.resolve()) for p in sources]
    for source in sources:
        want, got = _members(source), _members(run.feats / "val" / source.name)
        assert set(got) == set(want) and all("." not in k for k in got)
        keys = sorted(want)
        pixels = torch.stack([to_uint8_tensor(eval_view(open_image(want[k]["jpg"]), size)) for k in keys])
        with torch.no_grad():
            ref = trunk(normalize(pixels))  # (N, 128): the brute-force reference, fp32
        stored = torch.stack([torch.frombuffer(bytearray(got[k]["f16"]), dtype=torch.float16) for k in keys])
        torch.testing.assert_close(stored.float(), ref, rtol=2e-3, atol=2e-3)  # fp16 rounding
        assert all(got[k]["json"] == want[k]["json"] for k in keys)  # tags, clean tags, user: byte for byte
    assert manifest["samples"] == sum(s["samples"] for s in manifest["shards"]) == 64
    assert sum(manifest["skipped"].values()) == 0


def test_features_training_keeps_the_trunk_and_trains_w_and_the_table(run):
    m, saved = run.metrics, read_trunk_file(run.feats / "train" / TRUNK_FILE)
    assert {"val/precision@5", "val/precision@5_prior", "test/tagging/precision@5", "test/images"} <= set(m)
    assert m["test/images"] == 48  # the closing figures: the corpus's test IMAGES through the whole encoder
    state = run.first["state_dict"]
    trunk = {k[len("encoder.trunk."):]: v for k, v in state.items() if k.startswith("encoder.trunk.")}
    assert trunk.keys() == saved["state_dict"].keys()
    assert all(torch.equal(trunk[k], v) for k, v in saved["state_dict"].items())  # bit-identical, BN stats too
    dense, table = run.first["optimizer_states"]
    assert [len(g["params"]) for g in dense["param_groups"]] == [1, 0]  # AdamW holds W alone
    (w_state,) = dense["state"].values()
    assert w_state["exp_avg"].shape == state["encoder.proj.weight"].shape == (16, 128)
    assert w_state["exp_avg"].abs().sum() > 0 and any(v["exp_avg"].abs().sum() > 0 for v in table["state"].values())
    losses = _logged(run.out, "train/loss")
    assert len(losses) >= 10 and sum(losses[-4:]) < sum(losses[:4])  # the head learns from the stored features


def _logged(out: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((out / "tensorboard").rglob("events.out.tfevents.*")):
        ea = EventAccumulator(str(events), size_guidance={"scalars": 0})
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            values += [(s.step, s.value) for s in ea.Scalars(tag)]
    return [v for _, v in sorted(dict(values).items())]


def test_the_checkpoint_tags_images_as_the_stored_features_do(run):
    tagger = Tagger.from_checkpoint(run.last)
    saved = read_trunk_file(run.feats / "train" / TRUNK_FILE)
    model = load_model(run.last)
    assert tagger.image_size == 64 and model.encoder.spec == {"trunk": "small_cnn", "dim": 16}
    source = sorted(run.root.glob("test-*.tar"))[0]
    want, stored = _members(source), _members(run.feats / "test" / source.name)
    keys = sorted(want)[:12]
    images = [Image.open(io.BytesIO(want[k]["jpg"])) for k in keys]
    pixels = torch.stack([to_uint8_tensor(eval_view(open_image(want[k]["jpg"]), 64)) for k in keys])
    trunk = load_model(run.ckpt).encoder.trunk  # the e2e trunk, with trunk.pt's weights: the same
    trunk.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        ref = trunk(normalize(pixels)) @ model.encoder.proj.weight.t()  # proj(trunk(image)), (N, 16)
    u = tagger.embed(images)
    torch.testing.assert_close(u, ref, rtol=1e-5, atol=1e-5)
    f = torch.stack([torch.frombuffer(bytearray(stored[k]["f16"]), dtype=torch.float16) for k in keys]).float()
    u_stored = f @ model.encoder.proj.weight.t()  # what training saw for these images
    torch.testing.assert_close(u_stored, u, rtol=1e-2, atol=1e-2)
    s_img = u @ tagger.table.t() + tagger.gamma * tagger.log_counts  # (N, V): every tag's score
    s_feat = u_stored @ tagger.table.t() + tagger.gamma * tagger.log_counts
    tol = 1e-2 * float(s_img.abs().max())
    for row, tags in enumerate(tagger.tag(images, k=5)):
        # the Tagger's top 5 on the image are the top 5 from the stored features, up to fp16 rounding's ties
        kth = s_feat[row].topk(5).values[-1]
        assert all(s_feat[row, tagger.row(t)] >= kth - 2 * tol for t, _ in tags)
        assert [s for _, s in tags] == pytest.approx(s_img[row].topk(5).values.tolist(), abs=1e-5)
    assert torch.allclose(s_img, s_feat, atol=tol)


def test_resume_from_a_features_checkpoint(run):
    trainer = run.robjs["trainer"]
    assert trainer.current_epoch == 3 and run.robjs["module"].report.step == trainer.global_step
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 24  # 16 before, 8 resumed
    state = torch.load(run.last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in run.first["state_dict"].items() if k.startswith("encoder.trunk."))
    assert not torch.equal(state["encoder.proj.weight"], run.first["state_dict"]["encoder.proj.weight"])
    assert "val/precision@5" in run.resumed


def _shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def test_corrupt_samples_are_skipped_and_counted_and_shards_kept_apart(run, tmp_path, capsys):
    good = [{"__key__": k, **v} for k, v in sorted(_members(sorted(run.root.glob("val-*.tar"))[0]).items())]
    shards = [_shard(tmp_path / "a.tar", good[:5] + [{"__key__": "cut", "jpg": good[5]["jpg"][:200],
                                                      "json": good[5]["json"]}]),
              _shard(tmp_path / "b.tar", good[6:9] + [{"__key__": "nometa", "jpg": good[9]["jpg"], "json": b"{"}]),
              _shard(tmp_path / "c.tar", good[10:14])]
    out, digests = tmp_path / "out", []
    for workers in ("0", "2"):  # in the process, and two workers reading every other shard
        assert main(["--trunk", "small_cnn", "--image-size", "32", f"{tmp_path}/{{a,b,c}}.tar", "--out", str(out),
                     "--num-workers", workers]) == 0
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "12 samples of 3 shard(s)" in line and "2 skipped (bad_image: 1, bad_meta: 1)" in line
        m = json.loads((out / MANIFEST).read_text())
        assert m["samples"] == 12 and m["skipped"]["bad_image"] == 1 and m["skipped"]["bad_meta"] == 1
        for shard in shards:  # every source shard's features in the feature shard of its name, none elsewhere
            assert set(_members(out / shard.name)) == set(_members(shard)) - {"cut", "nometa"}
        assert m["source"] == {"checkpoint": None, "weights": None, "seed": 0}
        digests.append(m["trunk_digest"])
    assert digests[0] == digests[1]  # the same random trunk at every call (--seed 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar", "c.tar", "out"]  # no temporary left
    assert main(["--trunk", "small_cnn", "--image-size", "32", str(shards[0]), "--out", str(tmp_path)]) == 2
    assert "exists and is not a features folder" in capsys.readouterr().err  # a folder of other files: untouched
    # the same random trunk at every call, and --weights trunk.pt gives it to another split
    again = tmp_path / "again"
    assert main(["--trunk", "small_cnn", "--weights", str(out / TRUNK_FILE), "--image-size", "32",
                 str(shards[2]), "--out", str(again), "--num-workers", "0"]) == 0
    assert json.loads((again / MANIFEST).read_text())["trunk_digest"] == m["trunk_digest"]
    assert _members(again / "c.tar") == _members(out / "c.tar")


@pytest.mark.parametrize("args, message", [
    (["{tmp}/none.ckpt", "{shards}"], "checkpoint: no checkpoint at"),
    (["--trunk", "small_cnn", "--image-size", "32", "{tmp}/none-*.tar"], "no shards match"),
    (["--trunk", "small_cnn", "--image-size", "32", "{tmp}/missing.tar"], "shard not found"),
    (["--trunk", "small_cnn", "{shards}"], "no image size"),
    (["--trunk", "nonet", "--image-size", "32", "{shards}"], "unknown trunk"),
    (["{tmp}/none.ckpt", "{shards}", "--trunk", "small_cnn"], "a checkpoint or --trunk"),
])
def test_mistakes_are_one_line(run, tmp_path, capsys, args, message):
    shards = str(sorted(run.root.glob("val-*.tar"))[0])
    argv = [a.format(tmp=tmp_path, shards=shards) for a in args] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("im2vec: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_training_without_features_says_how_to_extract_them(cache_dir, tmp_path):
    from im2vec.errors import NotFound

    with pytest.raises(NotFound, match=r"no features in .*/nowhere/train — extract the corpus's splits first"):
        train(_cfg(cache_dir, tmp_path, "+experiment=features", f"data.features_dir={tmp_path}/nowhere"))


def test_any_shards_with_data_features_shards_and_one_trunk_per_run(run, cache_dir, tmp_path):
    from im2vec.errors import BadValue, make

    over = ["+experiment=features", "data=features_shards", f"data.features_dir={run.feats}",
            f"data.vocab_path={run.root / 'vocab.tsv'}"]
    tiny = [o for o in TINY if not o.startswith("data.corpus.")]  # no corpus in data=features_shards
    dm = make(_cfg(cache_dir, tmp_path, *over, tiny=tiny).data)
    assert dm.image_size == 64 and dm.width == 128 and len(dm.train_shards) == 3 and len(dm.val_shards) == 1
    assert dm.test_shards == [str(p.resolve()) for p in sorted(run.root.glob("test-*.tar"))]  # features_dir/test's
    batch = next(iter(dm.val_dataloader()))
    assert batch["features"].shape == (32, 128) and batch["features"].dtype == torch.float16 and "image" not in batch
    assert batch["tags"].shape[0] == 32 and len(batch["keys"]) == 32 and batch["skipped"].shape == (5,)
    # a validation split extracted with another trunk is refused
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for split in ("train", "test"):
        (mixed / split).symlink_to(run.feats / split, target_is_directory=True)
    assert main(["--trunk", "small_cnn", "--seed", "1", "--image-size", "64", f"{run.root}/val-*.tar", "--out",
                 str(mixed / "val"), "--num-workers", "0"]) == 0
    with pytest.raises(BadValue, match="extracted with another trunk"):
        make(_cfg(cache_dir, tmp_path, *over[:2], f"data.features_dir={mixed}", over[3], tiny=tiny).data)
