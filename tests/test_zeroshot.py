"""Tag vectors from word vectors (model.tag_vectors) and zero-shot tags: the map against brute force, both
step paths, checkpoints, Tagger's open vocabulary and evaluate's unseen-tag figures."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from im2vec.data.corpus import SCENES, ensure_word_vectors, word_vectors
from im2vec.data.datamodule import read_holdout
from im2vec.data.vocab import Vocabulary
from im2vec.deep.encoder import ImageEncoder
from im2vec.errors import BadValue
from im2vec.eval.ranking import KS, rank_tags, tagging_metrics
from im2vec.eval.zeroshot import split_truths
from im2vec.train.checkpoint import load_model
from im2vec.train.module import Im2VecModule
from im2vec.train.training import train
from im2vec.use.evaluate import evaluate
from im2vec.use.predict import Tagger, UnknownTag
from im2vec.wide.head import SamplerConfig
from im2vec.wide.tag_head import Prepared
from im2vec.wide.tag_vectors import TagVectorMap, mapped_vectors, random_like

V, D, DW = 300, 16, 12


def _map(freeze: bool, seed: int = 0) -> tuple[TagVectorMap, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(V, generator=g)[:120].sort().values  # 120 of the 300 tags have a word vector
    vecs = torch.randn(120, DW, generator=g) * 3
    m = TagVectorMap(V, D, rows, vecs, freeze=freeze, init_std=0.3)
    return m, rows, F.normalize(vecs, dim=1).half().float()  # stored unit norm, fp16


@pytest.mark.parametrize("freeze", [False, True])
def test_map_equals_brute_force_and_routes_gradients(freeze):
    m, rows, w = _map(freeze)
    table = torch.randn(V, D, requires_grad=True)
    ids = torch.tensor([0, 5, 7, 7, 299, int(rows[0]), int(rows[3]), int(rows[3])])
    got = m(ids, table[ids])
    a = m.proj.weight
    want = []
    for i in ids.tolist():
        hit = (rows == i).nonzero()
        if len(hit):  # v = r + A·w, or A·w when frozen
            v = a @ w[int(hit)]
            want.append(v if freeze else table[i] + v)
        else:
            want.append(table[i])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    in_file = torch.isin(torch.arange(V), rows)
    touched = torch.zeros(V, dtype=torch.bool)
    touched[ids] = True
    assert a.grad is not None and a.grad.abs().sum() > 0  # A learns from every tag with a vector
    frozen_rows = touched & in_file
    assert (table.grad[frozen_rows].abs().sum(1) == 0).all() == freeze  # frozen: those rows get no gradient
    assert (table.grad[touched & ~in_file].abs().sum(1) > 0).all()  # tags without a vector: their rows, as ever
    torch.testing.assert_close(m.full(table.detach()), m(torch.arange(V), table.detach()).detach(),
                               rtol=1e-5, atol=1e-6)


def test_map_rebuilt_from_its_state_is_the_same():
    m, _, _ = _map(False, seed=3)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    back = TagVectorMap.from_state(state, V, freeze=False)
    table = torch.randn(V, D)
    torch.testing.assert_close(back.full(table), m.full(table), rtol=0, atol=0)


def _module(tag_map=None, seed=0):
    counts = (1000.0 / torch.arange(1, V + 1)).round().clamp_min(1)
    torch.manual_seed(seed)
    return Im2VecModule(ImageEncoder("small_cnn", D), [f"t{i}" for i in range(V)], counts, 10,
                        SamplerConfig(num_negatives=8), tag_map=tag_map, seed=1)


def test_pipelined_step_equals_the_serial_head_with_tag_vectors():
    """The one-device step (rows through the TableWorker, mapped once per distinct row) and the serial head
    (sampled_loss's row_map on every drawn row) give the same loss and the same gradients."""
    a, b = _module(_map(False)[0]), None
    b = copy.deepcopy(a)
    tags = torch.randint(0, V, (6, 3))
    u = torch.randn(6, D)
    la = a.head.loss(u, a.head.prepare(tags, u.device))[0]  # pipelined
    lb = b.head.loss(u, Prepared(tags, ids=b.head.draw(tags)))[0]  # serial: sampled_loss
    assert a.head.variant == "pipelined"
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.tag_map.proj.weight.grad, b.tag_map.proj.weight.grad, rtol=1e-5, atol=1e-7)
    ga = a.table.weight.grad
    ga = ga.to_dense() if ga is not None else None
    assert ga is not None and b.table.weight.grad is not None
    torch.testing.assert_close(ga, b.table.weight.grad.to_dense(), rtol=1e-5, atol=1e-7)
    assert any(p is a.tag_map.proj.weight for p in a.dense_parameters())  # trained by AdamW beside the trunk


def test_adamw_does_not_decay_the_word_vector_map():
    """A is not decayed, as the rows r are not: decay would move what A·w carries into r, and a tag never seen
    with an image has only A·w. The trunk's weights still are."""
    m = _module(_map(False)[0])
    m._trainer = SimpleNamespace(is_global_zero=False)  # configure_optimizers asks only whether to print
    opt_dense = m.configure_optimizers()[0][0]
    decay = {id(p): g["weight_decay"] for g in opt_dense.param_groups for p in g["params"]}
    assert decay[id(m.tag_map.proj.weight)] == 0.0
    assert decay[id(next(p for p in m.encoder.parameters() if p.ndim >= 2))] == m.optim_cfg.weight_decay > 0


def test_vocabulary_exclude_keeps_the_held_out_counts(tmp_path):
    (tmp_path / "v.tsv").write_text("a\t9\nb\t7\nc\t5\nd\t3\n")
    v = Vocabulary.load(tmp_path / "v.tsv", exclude={"b", "zz"})
    assert v.tags == ["a", "c", "d"] and v.held_out == {"b": 7}
    (tmp_path / "h.txt").write_text("Rojo\n\n  agua \nrojo\n")
    assert read_holdout(str(tmp_path / "h.txt")) == ["rojo", "agua"]
    assert read_holdout(["X", "y"]) == ["x", "y"] and read_holdout(None) == []


def test_corpus_word_vectors_cover_the_vocabulary(cache_dir, make_cfg):
    cfg = make_cfg()
    from im2vec.errors import make

    dm = make(cfg.data)
    path = ensure_word_vectors(dm.corpus_dir)
    lines = path.read_text().splitlines()
    words = {ln.split(" ", 1)[0] for ln in lines[1:]}
    assert set(dm.vocab.tags) <= words and set(SCENES["water"]) <= words
    vec = word_vectors(["agua"])
    assert float(vec["agua"] @ vec["water"]) > 0.6


# ---- end to end: train with held-out tags and word vectors, tag with an open vocabulary, evaluate
@pytest.fixture(scope="module")
def zs(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs-run")
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}",
                                          "+experiment=zeroshot", "validation.val_gammas=[0.0,1.0]"])
    metrics, objs = train(cfg)
    return SimpleNamespace(cfg=cfg, out=out, ckpt=out / "checkpoints" / "last.ckpt", module=objs["module"],
                           dm=objs["datamodule"], metrics=metrics)


def test_held_out_tags_are_out_of_training_and_recorded(zs):
    held = list(zs.cfg.data.holdout_tags)
    assert not set(held) & set(zs.module.tags)  # never a row: no image was trained with them
    assert set(zs.dm.vocab.held_out) <= set(held) and zs.dm.vocab.held_out  # counted in the file, kept aside
    model = load_model(zs.ckpt)
    assert model.holdout_tags == held and model.tag_map is not None
    torch.testing.assert_close(model.table, zs.module.full_table(), rtol=0, atol=0)  # r + A·w, as validated
    assert "test/tagging/precision@5" in zs.metrics


def test_tagger_open_vocabulary_scores_equal_brute_force(zs):
    tagger = Tagger.from_checkpoint(zs.ckpt)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    u = tagger.embed(images)
    vocab = ["rojo", "Agua", "red", "canon", "cielo"]
    got = tagger.tag(images, k=5, gamma=0.5, vocabulary=vocab)
    wv = {w: torch.from_numpy(v) for w, v in word_vectors(["rojo", "agua", "cielo"]).items()}
    a, floor = tagger.tag_map.proj.weight, tagger.log_counts.min()
    ref = {}
    for t in ["rojo", "agua", "red", "canon", "cielo"]:
        if t in tagger.rows:
            ref[t] = (tagger.table[tagger.rows[t]], tagger.log_counts[tagger.rows[t]])
        else:  # never trained with an image: A·w at the smallest count
            ref[t] = (mapped_vectors(a, wv[t][None])[0], floor)
    for i, row in enumerate(got):
        want = sorted(((t, float(u[i] @ v + 0.5 * lc)) for t, (v, lc) in ref.items()), key=lambda x: -x[1])
        assert [t for t, _ in row] == [t for t, _ in want]
        torch.testing.assert_close(torch.tensor([s for _, s in row]), torch.tensor([s for _, s in want]),
                                   rtol=1e-3, atol=1e-3)  # the file's vectors are written with 6 decimals
    assert tagger.tag(images, k=2) == tagger.tag(images, k=2, vocabulary=tagger.tags)  # the same, through the API
    with pytest.raises(UnknownTag, match="nosuchword"):
        tagger.tag(images, vocabulary=["red", "nosuchword"])


def test_open_vocabulary_needs_word_vectors(tiny_run, tmp_path, make_cfg):
    tagger = Tagger.from_checkpoint(tiny_run.ckpt)  # trained without word vectors
    with pytest.raises(UnknownTag, match="no word vectors"):
        tagger.tag(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), vocabulary=["red", "not a tag here"])
    with pytest.raises(BadValue, match="freeze_tag_vectors"):
        train(make_cfg("model.freeze_tag_vectors=true", out=tmp_path / "x"))


def test_evaluate_unseen_figures_equal_brute_force(zs, cache_dir, tmp_path):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        ecfg = compose("evaluate", overrides=[f"paths.cache_dir={cache_dir}", f"ckpt_path={zs.ckpt}",
                                              f"paths.output_dir={tmp_path}", "num_workers=0"])
    m = evaluate(ecfg)
    held = list(zs.cfg.data.holdout_tags)
    assert m["zeroshot/info/unseen_tags"] == len(held)
    # brute force: the images' vectors, the held-out tags' ids among themselves, their A·w vectors
    from im2vec.eval.heldout import embed_shards

    model = load_model(zs.ckpt)
    data = embed_shards([model], zs.dm.test_shards, 64, 32, 0, None, extra_tags=held)
    seen, unseen = split_truths(data["clean"], len(model.tags))
    assert (seen < len(model.tags)).all() and (unseen < len(held)).all()
    wv = word_vectors(held)
    w = torch.stack([torch.from_numpy(wv[t]) for t in held])
    table = mapped_vectors(model.tag_map.proj.weight, w)
    scores = data["u"][0] @ table.t()  # (N, U)
    top5 = scores.topk(5, dim=1).indices
    has = (unseen >= 0).any(1)
    hits = [(len(set(top5[i].tolist()) & set(unseen[i][unseen[i] >= 0].tolist())) / 5) for i in range(len(has))
            if has[i]]
    assert m["zeroshot/clean/precision@5"] == pytest.approx(sum(hits) / len(hits), abs=1e-3)
    # the random control goes through the same A with random unit vectors
    r = rank_tags(data["u"][0], mapped_vectors(model.tag_map.proj.weight, random_like(w, 0)), torch.zeros(len(held)),
                  0.0, [unseen], kmax=max(KS))
    assert m["zeroshot/random/clean/precision@5"] == pytest.approx(tagging_metrics(r, 0, KS)["precision@5"], abs=1e-6)
    # the seen tags' figures see only the vocabulary's tags (as without held-out tags)
    assert 0 <= m["tagging/clean/precision@5"] <= 1 and "zeroshot/prior/clean/map" in m


def test_resume_with_tag_vectors(zs, tmp_path):
    """A resumes where the checkpoint left it: at the resumed run's first batch it equals the checkpoint's A
    (tests/run_callbacks.py records it), then it trains on."""
    cfg = copy.deepcopy(zs.cfg)
    cfg.ckpt_path, cfg.trainer.max_epochs, cfg.paths.output_dir = str(zs.ckpt), 3, str(tmp_path)
    with open_dict(cfg):
        cfg.callbacks["a_at_start"] = {"_target_": "run_callbacks.TagMapAtStart", "path": str(tmp_path / "a0.pt")}
    saved = torch.load(zs.ckpt, map_location="cpu", weights_only=False)["state_dict"]["tag_map.proj.weight"]
    train(cfg)
    at_start = torch.load(tmp_path / "a0.pt")
    assert at_start.shape == saved.shape and torch.equal(at_start, saved)  # restored, not started afresh
    after = load_model(Path(tmp_path) / "checkpoints" / "last.ckpt")
    assert not torch.equal(after.tag_map.proj.weight, saved)  # and A kept training from where it was


def test_tag_command_with_an_open_vocabulary(zs, tmp_path, capsys):
    from PIL import Image

    from im2vec.use.predict import main

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "vocab.txt").write_text("rojo\nagua\nred\n")
    out = tmp_path / "tags.jsonl"
    assert main(["tag", str(zs.ckpt), str(tmp_path / "imgs"), "--out", str(out), "--k", "3",
                 "--vocabulary", str(tmp_path / "vocab.txt")]) == 0
    import json

    row = json.loads(out.read_text())
    assert sorted(t for t, _ in row["tags"]) == ["agua", "red", "rojo"]
    want = Tagger.from_checkpoint(zs.ckpt).tag([tmp_path / "imgs" / "a.png"], k=3, vocabulary=["rojo", "agua", "red"])
    assert [t for t, _ in row["tags"]] == [t for t, _ in want[0]]
    (tmp_path / "bad.txt").write_text("red\nnosuchword\n")
    assert main(["tag", str(zs.ckpt), str(tmp_path / "imgs"), "--out", str(out), "--vocabulary",
                 str(tmp_path / "bad.txt")]) == 2
    assert "nosuchword" in capsys.readouterr().err
