"""evaluate.py end to end on a tiny trained checkpoint: every output, figures consistent with training's."""

import json

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from im2vec.use.evaluate import evaluate


def _eval_cfg(cache_dir, out, *overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}",
                                              "num_workers=0", "grid_images=4", "query_pictures=2", *overrides])


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The tiny default run (conftest.tiny_run, shared): its checkpoint, figures, validation shards."""
    val_shards = str(tiny_run.datamodule.val_shards[0]).rsplit("/", 1)[0] + "/val-*.tar"
    return tiny_run.ckpt, tiny_run.metrics, val_shards


def test_evaluate_writes_every_output(trained, cache_dir, tmp_path):
    ckpt, train_metrics, val_shards = trained
    # validation's images (γ was chosen on them), to compare with training's own figures
    m = evaluate(_eval_cfg(cache_dir, tmp_path, f"ckpt_path={ckpt}", f"baseline_ckpt={ckpt}", f"shards='{val_shards}'"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(m, nan_ok=True)
    for prefix in ("", "prior/", "baseline/"):
        for key in ("tagging/precision@5", "tagging/recall@10", "tagging/f1@3", "tagging/map", "tagging/map_all_images",
                    "tagging/tag_precision@5", "tagging/tag_recall@5", "tagging/noise_share@5",
                    "tagging/clean/precision@1", "tagging/clean/map", "retrieval/map", "retrieval/precision@10",
                    "retrieval/clean/map"):
            assert 0.0 <= saved[prefix + key] <= 1.0, prefix + key
    assert saved["gamma_sweep/clean_precision@5/0.2"] >= 0 and saved["info/images"] > 0
    # the baseline is the same checkpoint: the same figures
    assert all(saved[f"baseline/{k}"] == pytest.approx(v) for k, v in saved.items()
               if k.startswith(("tagging/", "retrieval/")))
    # the same images, the γ chosen on them in training, the same top 5 as training's own validation
    assert saved["info/gamma"] == train_metrics["val/gamma"]
    assert saved["tagging/precision@5"] == pytest.approx(train_metrics["val/precision@5"], abs=1e-6)
    assert saved["tagging/clean/precision@5"] == pytest.approx(train_metrics["val/clean_precision@5"], abs=1e-6)
    for name in ("top5_tags", "precision_recall_at_k", "gamma_sweep", "retrieval"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert {"tagging/map", "prior/retrieval/map", "baseline/tagging/precision@5"} <= set(ea.Tags()["scalars"])
    assert {"evaluate/top5_tags", "evaluate/retrieval", "evaluate/gamma_sweep"} <= set(ea.Tags()["images"])


def test_evaluate_gamma_override_and_queries(trained, cache_dir, tmp_path):
    ckpt, _, _ = trained
    m = evaluate(_eval_cfg(cache_dir, tmp_path, f"ckpt_path={ckpt}", "gamma=0.0", "max_images=40"))
    assert m["info/gamma"] == 0.0 and m["info/images"] == 40
    assert m["tagging/precision@5"] == pytest.approx(m["gamma_sweep/precision@5/0"], abs=1e-6)
    from im2vec.data.corpus import content_tags
    from im2vec.train.checkpoint import load_model

    tags = [t for t in load_model(ckpt).tags if t in set(content_tags())][:3]  # every held-out split has some
    q = evaluate(_eval_cfg(cache_dir, tmp_path / "q", f"ckpt_path={ckpt}", f"queries=[{','.join(tags)}]"))
    assert q["retrieval/queries"] + q["retrieval/queries_without_images"] == 3 and q["retrieval/queries"] >= 1
    with pytest.raises(ValueError, match="not in the vocabulary"):
        evaluate(_eval_cfg(cache_dir, tmp_path / "x", f"ckpt_path={ckpt}", "queries=[no_such_tag]"))
    with pytest.raises(ValueError, match="set ckpt_path"):
        evaluate(_eval_cfg(cache_dir, tmp_path / "y"))


def test_a_vocabulary_without_noise_tags_scores():
    import torch

    from im2vec.eval.heldout import noise_ids_for, score_model

    noise = noise_ids_for(["a", "b"], {"a", "b"})  # every tag names content
    assert noise.dtype == torch.long and noise.numel() == 0
    g = torch.Generator().manual_seed(0)
    u, table = torch.randn(6, 3, generator=g), torch.randn(2, 3, generator=g)
    obs = torch.tensor([[0, -1], [1, -1], [0, 1], [1, -1], [0, -1], [-1, -1]])
    m, _ = score_model(u, table, torch.zeros(2), 0.0, obs, None, noise, None, "")
    assert m["tagging/noise_share@5"] == 0.0 and 0 <= m["tagging/map"] <= 1


def test_a_checkpoint_naming_a_module_from_before_the_move_still_gives_its_data(tiny_run, tmp_path):
    """Checkpoints written before the modules moved into subpackages record im2vec.datamodule.…: the tools that
    rebuild a checkpoint's data (evaluate, visualness, the benchmarks) read them as the class's new place."""
    import torch

    from im2vec.errors import make
    from im2vec.train.checkpoint import load_model

    ckpt = torch.load(tiny_run.ckpt, map_location="cpu", weights_only=False)
    data = ckpt["im2vec"]["data"]
    assert data["_target_"].startswith("im2vec.data.datamodule.")
    ckpt["im2vec"]["data"] = {**data, "_target_": data["_target_"].replace("im2vec.data.datamodule.", "im2vec.datamodule.")}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    model = load_model(old)
    assert model.data["_target_"] == data["_target_"]
    dm = make(model.data)
    assert dm.vocab.tags == tiny_run.datamodule.vocab.tags and dm.test_shards == tiny_run.datamodule.test_shards
    # the recorded settings as they are in the file (bench.user_prior reads them without the model): make renames
    assert make(ckpt["im2vec"]["data"]).vocab.tags == dm.vocab.tags
