"""user_prior=auto at the end of training (im2vec/train/training.py, user_prior_after_fit): user_prior.pt beside the
checkpoint, counted as a brute-force pass over the training shards counts, λ and μ those that
``python -m im2vec.bench.user_prior --beside`` chooses for the checkpoint, the closing test figures untouched, and
the cases where it cannot apply skipped with a line."""

import io
import json
import shutil
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_user_prior import brute_counts

from im2vec.eval import user_prior as up
from im2vec.eval.user_prior import UserPrior, why_not_auto
from im2vec.train.training import train, user_prior_after_fit

SHARDS = [o for o in TINY if not o.startswith("data.corpus.")] + ["data.image_size=64", "data.min_scale=0.7"]


def resplit(src: list[str], out: Path, users: bool = True) -> dict[str, str]:
    """The corpus's training images cut at random (a hash of the key) into train / val / test shards, every
    uploader on every side (as README's re-split); ``users=False``: the json without its uploader."""
    out.mkdir(parents=True, exist_ok=True)
    tars = {s: tarfile.open(out / f"{s}.tar", "w") for s in ("train", "val", "test")}
    for url in src:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, data = m.name.split(".", 1)[0], tar.extractfile(m).read()
                if m.name.endswith(".json") and not users:
                    data = json.dumps({k: v for k, v in json.loads(data).items() if k != "user"}).encode()
                h = zlib.crc32(key.encode()) % 10
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tars["train" if h < 6 else "val" if h < 8 else "test"].addfile(info, io.BytesIO(data))
    for t in tars.values():
        t.close()
    return {s: str(out / f"{s}.tar") for s in tars}


def run(tmp: Path, shards: dict[str, str], vocab: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data=shards", *SHARDS, f"data.train_shards={shards['train']}",
                                          f"data.val_shards={shards['val']}", f"data.test_shards={shards['test']}",
                                          f"data.vocab_path={vocab}", f"paths.output_dir={tmp}", *overrides])
    return train(cfg)


@pytest.fixture(scope="module")
def seen(tiny_run, tmp_path_factory):
    """A tiny training on the re-split corpus (validation uploaders seen in training: λ can win there)."""
    tmp = tmp_path_factory.mktemp("seen")
    shards = resplit(tiny_run.datamodule.train_shards, tmp / "shards")
    vocab = str(Path(tiny_run.datamodule.train_shards[0]).parent / "vocab.tsv")
    metrics, objs = run(tmp / "run", shards, vocab)
    return SimpleNamespace(shards=shards, vocab=vocab, out=tmp / "run", metrics=metrics, objs=objs,
                           ckpt=tmp / "run" / "checkpoints" / "last.ckpt")


def test_the_default_run_leaves_the_prior_beside_its_checkpoint(tiny_run):
    prior = UserPrior.load(tiny_run.ckpt.with_name("user_prior.pt"))
    per_user, glob = brute_counts(tiny_run.datamodule.train_shards, list(tiny_run.module.tags))
    assert prior.users == sorted(per_user) and len(prior.users) == 12
    for user in prior.users:
        ids, n, n_u = prior.row(user)
        assert dict(zip(ids.tolist(), n.tolist())) == dict(per_user[user]) and n_u == sum(per_user[user].values())
    assert prior.global_counts.tolist() == [glob[t] for t in range(len(tiny_run.module.tags))]
    assert prior.lam == 0.0  # the corpus holds its validation uploaders out: no gain, λ = 0 recorded
    assert tiny_run.metrics["user_prior/lam"] == 0.0


def test_the_recorded_lambda_is_the_benchmarks_and_the_test_figures_do_not_move(seen, tmp_path):
    from im2vec.bench.user_prior import measure

    prior = UserPrior.load(seen.ckpt.with_name("user_prior.pt"))
    per_user, _ = brute_counts([seen.shards["train"]], list(seen.objs["module"].tags))
    assert prior.users == sorted(per_user) and prior.totals.tolist() == [sum(per_user[u].values()) for u in prior.users]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"  # a copy without the prior: the benchmark builds its own
    ckpt.parent.mkdir()
    shutil.copy(seen.ckpt, ckpt)
    res = measure(str(ckpt), tmp_path / "out", log=lambda *a: 0, beside=True)
    assert res["lam"] > 0 and res["val_known"] == 1.0  # a real choice, not the tie of unseen uploaders
    assert (prior.lam, prior.mu) == (res["auto_lam"], res["mu"])
    assert UserPrior.load(ckpt.with_name("user_prior.pt")).tag_ids.tolist() == prior.tag_ids.tolist()
    assert seen.metrics["user_prior/val_gain"] == pytest.approx(res["val_gain"], abs=1e-9)
    ea = EventAccumulator(str(seen.out / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.value for e in ea.Scalars("user_prior/lam")] == [pytest.approx(prior.lam)]
    assert "user_prior/val_gain" in ea.Tags()["scalars"]
    # the closing test figures are the ones of the plain score (the term needs a named uploader)
    assert res["without"]["precision@5"] == pytest.approx(seen.metrics["test/tagging/precision@5"], abs=1e-9)


@pytest.mark.slow
def test_the_closing_figures_are_the_same_without_the_setting(seen, tmp_path):
    metrics, _ = run(tmp_path, seen.shards, seen.vocab, "user_prior=false")
    assert not (tmp_path / "checkpoints" / "user_prior.pt").exists()
    figures = {k: v for k, v in seen.metrics.items() if k.startswith(("test/", "val/"))}
    assert figures and figures == {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))}


def test_auto_skips_shards_without_uploaders(tiny_run, seen, tmp_path, capsys):
    shards = resplit(tiny_run.datamodule.train_shards, tmp_path / "shards", users=False)
    metrics, _ = run(tmp_path / "run", shards, seen.vocab, "trainer.max_epochs=1")
    assert "im2vec: user_prior: not built: the training shards name no uploader" in capsys.readouterr().out
    assert not (tmp_path / "run" / "checkpoints" / "user_prior.pt").exists()
    assert "test/tagging/precision@5" in metrics and not any(k.startswith("user_prior/") for k in metrics)


def _trainer(ckpt: Path, world: int = 1):
    return SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path=str(ckpt)), fast_dev_run=False,
                           world_size=world, strategy=SimpleNamespace(root_device=torch.device("cpu")), logger=None)


def test_several_ranks_count_on_rank_zero_without_the_choice(tiny_run, tmp_path, monkeypatch, capsys):
    import im2vec.train.checkpoint as checkpoint

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run.ckpt, ckpt)
    monkeypatch.setattr(checkpoint, "load_model", lambda *a: pytest.fail("the whole table loaded on one rank"))
    assert user_prior_after_fit("auto", _trainer(ckpt, 64), tiny_run.datamodule, tiny_run.module.tags) == {}
    prior = UserPrior.load(ckpt.with_name("user_prior.pt"))
    assert prior.lam is None and prior.users == UserPrior.load(tiny_run.ckpt.with_name("user_prior.pt")).users
    assert "λ not chosen with 64 ranks: python -m im2vec.bench.user_prior" in capsys.readouterr().out


def test_auto_skips_without_validation_and_above_the_bounds(tiny_run, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run.ckpt, ckpt)
    dm = SimpleNamespace(**{k: getattr(tiny_run.datamodule, k) for k in ("train_shards", "test_shards",
                                                                         "content_tags", "image_size", "num_workers")},
                         val_shards=[])
    for setting in ("auto", True):
        assert user_prior_after_fit(setting, _trainer(ckpt), dm, tiny_run.module.tags) == {}
        assert "not built: no validation split to choose λ on" in capsys.readouterr().out
    train_shards, val = tiny_run.datamodule.train_shards, tiny_run.datamodule.val_shards
    assert why_not_auto(train_shards, val, 1000) is None
    monkeypatch.setattr(up, "AUTO_MAX_BYTES", 1000)  # the corpus's shards have no .stats.json: their bytes count
    assert "bytes of training shards > 1,000 for a one-process count" in why_not_auto(train_shards, val, 1000)
    assert "python -m im2vec.eval.user_prior build CKPT" in why_not_auto(train_shards, val, 1000)
    assert not ckpt.with_name("user_prior.pt").exists()


def test_the_ingests_stats_decide_before_any_shard_is_read(tmp_path, monkeypatch):
    shards = [str(tmp_path / f"train-{i}.tar") for i in range(2)]
    val = [str(tmp_path / "val-0.tar")]

    def stats(path, written, users):
        Path(path[: -len(".tar")] + ".stats.json").write_text(json.dumps({"written": written, "users": users}))

    for s in shards:
        stats(s, 10, {})
    assert why_not_auto(shards, val, 100) == "the training shards name no uploader (their .stats.json)"
    for s in shards:
        stats(s, 1_500_000, {"ann": 1})
    assert "3,000,000 training images (.stats.json) > 2,000,000" in why_not_auto(shards, val, 100)
    for s in shards + val:
        stats(s, 5000, {"ann": 1})
    assert why_not_auto(shards, val, 100) is None
    assert "5,000 validation images × 600,000 tags" in why_not_auto(shards, val, 600_000)


def test_a_wrong_setting_is_one_line_before_training(make_cfg):
    with pytest.raises(Exception, match="user_prior='sometimes'"):
        train(make_cfg("user_prior=sometimes"))



@pytest.mark.slow
def test_frozen_trunk_features_count_their_shards_json_and_choose_on_their_source_images(tmp_path):
    """+experiment=features: the feature shards keep each sample's json (uploader included): counted as the images'
    shards; λ chosen on the images the val/ features came from, as the benchmark does for that checkpoint."""
    from test_features import _cfg
    from im2vec.bench.user_prior import measure
    from im2vec.train.features import main as extract

    cache = tmp_path / "cache"
    _, e2e = train(_cfg(cache, tmp_path / "e2e", "trainer.max_epochs=1"))
    for split in ("train", "val", "test"):
        shards = f"{Path(e2e['datamodule'].train_shards[0]).parent}/{split}-*.tar"
        assert extract([str(tmp_path / "e2e/checkpoints/last.ckpt"), shards, "--out", str(tmp_path / "feats" / split),
                        "--num-workers", "0"]) == 0
    _, objs = train(_cfg(cache, tmp_path / "fm", "+experiment=features", f"data.features_dir={tmp_path / 'feats'}"))
    ckpt = tmp_path / "fm" / "checkpoints" / "last.ckpt"
    prior = UserPrior.load(ckpt.with_name("user_prior.pt"))
    per_user, _ = brute_counts(e2e["datamodule"].train_shards, list(objs["module"].tags))
    assert prior.users == sorted(per_user) and prior.totals.tolist() == [sum(per_user[u].values()) for u in prior.users]
    copy = tmp_path / "copy" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    shutil.copy(ckpt, copy)
    res = measure(str(copy), tmp_path / "out", log=lambda *a: 0, beside=True)
    assert (prior.lam, prior.mu) == (res["auto_lam"], res["mu"]) and res["val_images"] > 0


def test_joint_gamma_chooses_gamma_with_lambda_and_leaves_the_file(seen, tmp_path):
    from im2vec.bench.user_prior import measure

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(seen.ckpt, ckpt)
    fixed = measure(str(ckpt), tmp_path / "out", log=lambda *a: 0, beside=True)
    before = ckpt.with_name("user_prior.pt").read_bytes()
    joint = measure(str(ckpt), tmp_path / "out", log=lambda *a: 0, beside=True, gammas=(0.0, 4.0))
    assert ckpt.with_name("user_prior.pt").read_bytes() == before  # λ goes with the checkpoint's γ in the file
    g = fixed["gamma"]
    assert fixed["val_gamma"] == g and joint["val_gamma"] in (g, 0.0, 4.0) and joint["joint_gamma"]
    assert {k: v for k, v in joint["val_p5"].items() if k.endswith(f"/{g:g}")} == pytest.approx({
        f"{k}/{g:g}": v for k, v in fixed["val_p5"].items()}, abs=1e-12)  # the checkpoint's γ: the same grid
    assert len(joint["val_p5"]) == 3 * len(fixed["val_p5"])  # every (λ, μ) at each γ
    best = max(joint["val_p5"].values())
    assert joint["val_p5"][f"{joint['lam']:g}/{joint['mu']:g}/{joint['val_gamma']:g}"] == best
    assert joint["val_gain"] >= fixed["val_gain"] - 1e-9 and joint["without"] == fixed["without"]


@pytest.mark.slow
def test_two_ranks_rank_zero_writes_the_counts_and_the_run_ends(tmp_path):
    """train.py on 2 CPU ranks (DDP, the table sharded): the run ends (no rank waits on the other), rank 0 alone
    wrote the counts beside the checkpoint folder, λ unset, and said which command chooses it."""
    from test_ddp_train import DDP, train as train_py

    p = train_py(tmp_path, *DDP, f"paths.cache_dir={tmp_path / 'cache'}", "data.corpus.num_train=256",
                 "data.corpus.num_val=64", "data.corpus.num_test=32", "data.corpus.num_users=12",
                 "data.corpus.shard_size=64", "data.vocab_min_count=1", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("im2vec: user_prior: ") == 1 and "λ not chosen with 2 ranks" in p.stdout
    prior = UserPrior.load(tmp_path / "checkpoints" / "user_prior.pt")
    shards = sorted(str(s) for s in (tmp_path / "cache").glob("corpus-*/train-*.tar"))
    tags = [line.split("\t")[0] for line in next((tmp_path / "cache").glob("corpus-*/vocab.tsv")).read_text().splitlines()]
    per_user, _ = brute_counts(shards, tags)
    assert prior.lam is None and prior.users == sorted(per_user)
