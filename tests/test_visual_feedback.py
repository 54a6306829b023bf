"""Tag visualness fed back into training (data.visual_tags, data.visual_use) and its benchmark."""

import json
import tarfile
from collections import Counter

import pytest
import torch

from im2vec.data.visual_file import read_nonvisual
from im2vec.data.vocab import Vocabulary
from im2vec.errors import BadValue, NotFound, make
from im2vec.use.visualness import TagRow, write_tsv


def _file(tmp_path, zero=(), one=(), na=(), name="visual_tags.tsv"):
    rows = [TagRow(t, 9, 9, 0.5, 0.1, 0.2, True) for t in one] + [TagRow(t, 9, 9, 0.1, 0.1, -0.1, False) for t in zero]
    rows += [TagRow(t, 1, 9) for t in na]
    return write_tsv(rows, tmp_path / name, ["a test file"])


def test_the_file_gives_the_tags_marked_0(tmp_path):
    path = _file(tmp_path, zero=["canon", "2015"], one=["cat"], na=["dog"])
    assert read_nonvisual(str(path)) == ["canon", "2015"]
    assert read_nonvisual(None) == []
    with pytest.raises(NotFound, match="data.visual_tags: no file"):
        read_nonvisual(str(tmp_path / "none.tsv"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("tag\tcount\ncat\t3\n", encoding="utf-8")  # a vocabulary, not the tool's file
    with pytest.raises(BadValue, match="data.visual_tags: .* is not a tag visualness file"):
        read_nonvisual(str(bad))
    bad.write_text("tag\tvisual\ncat\tyes\n", encoding="utf-8")
    with pytest.raises(BadValue, match="whose visual is not 1, 0 or NA"):
        read_nonvisual(str(bad))
    with pytest.raises(BadValue, match="data.visual_use='both'"):
        read_nonvisual(str(path), "both")


def test_a_vocabulary_without_positives_keeps_rows_counts_and_fingerprint():
    v = Vocabulary(["cat", "canon", "dog", "2015"], [9, 8, 7, 6])
    w = v.without_positives(["canon", "2015", "absent"])
    assert w.tags == v.tags and torch.equal(w.counts, v.counts) and w.fingerprint() == v.fingerprint()
    assert w.ids(["canon", "cat", "2015", "dog"]) == [0, 2] and v.ids(["canon", "cat"]) == [1, 0]
    assert len(v.index) == 4  # the original is untouched


def _tags_of_split(shards):
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [json.load(tar.extractfile(m))["tags"] for m in tar.getmembers() if m.name.endswith(".json")]
    return out


@pytest.mark.parametrize("in_memory", [True, False])
def test_negatives_never_reach_a_training_batch_but_stay_in_the_vocabulary(make_cfg, tmp_path, in_memory):
    base = make(make_cfg("data.num_workers=0").data)
    train_tags = _tags_of_split(base.train_shards)
    # the two most frequent tags of the training split, and every tag of one image: that image has no positive left
    top = [t for t, _ in Counter(t for tags in train_tags for t in set(tags) if t in base.vocab.index).most_common(2)]
    alone = next(tags for tags in train_tags if any(t in base.vocab.index for t in tags))
    zero = list(dict.fromkeys(top + [t for t in alone if t in base.vocab.index]))
    path = _file(tmp_path, zero=zero, one=[t for t in base.vocab.tags if t not in zero][:3])
    dm = make(make_cfg(f"data.visual_tags={path}", "data.visual_use=negatives", f"data.in_memory={in_memory}").data)
    assert dm.vocab.tags == base.vocab.tags and dm.holdout_tags == []
    zero_ids = torch.tensor([dm.vocab.index[t] for t in zero])
    seen, n = set(), 0
    for batch in dm.train_dataloader():
        t = batch["tags"]
        assert not torch.isin(t, zero_ids).any(), "a non-visual tag reached a training batch"
        assert ((t >= 0).sum(1) > 0).all()  # every image still has a positive
        seen |= set(t[t >= 0].tolist())
        n += 1
    assert n == dm.batches_per_epoch and seen  # the batches were real
    # the images whose tags are all non-visual are left out (the skip counts count them)
    keep = [tags for tags in train_tags if any(x in dm.train_vocab.index for x in tags)]
    assert len(keep) < len([tags for tags in train_tags if any(x in dm.vocab.index for x in tags)])
    if in_memory:
        assert len(dm._decoded) == len(keep)
    # validation keeps every tag: the figures are of the observed tags
    val = torch.cat([b["tags"].flatten() for b in dm.val_dataloader()])
    assert torch.isin(val, zero_ids).any()


def test_only_keeps_them_out_of_the_vocabulary(make_cfg, tmp_path, capsys):
    base = make(make_cfg().data)
    zero = base.vocab.tags[:3]
    path = _file(tmp_path, zero=zero + ["never_seen_tag"], na=base.vocab.tags[3:5])
    dm = make(make_cfg(f"data.visual_tags={path}").data)
    assert dm.vocab.tags == [t for t in base.vocab.tags if t not in zero] and dm.train_vocab is dm.vocab
    assert dm.holdout_tags == []  # not a zero-shot hold-out: evaluate.py does not call them unseen tags
    printed = capsys.readouterr().out
    assert "4 tags marked non-visual" in printed and "3 of them in the training tags" in printed


def test_the_tool_writes_its_figures_to_tensorboard(tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from im2vec.use.visualness import from_checkpoint, read_tsv, tensorboard_dir

    assert tensorboard_dir(tiny_run.ckpt) == tiny_run.out / "tensorboard" / "visualness"  # auto: the run's own
    assert tensorboard_dir(tmp_path / "a" / "last.ckpt") is None
    board = tmp_path / "tb"
    out = from_checkpoint(str(tiny_run.ckpt), out=tmp_path / "v.tsv", min_images=3, resamples=20, num_workers=0,
                          tensorboard=board, log=lambda m: None)
    rows = read_tsv(tmp_path / "v.tsv")
    tested = [r for r in rows if r["visual"] != "NA"]
    ea = EventAccumulator(str(board), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    scalar = {k: ea.Scalars(k)[0].value for k in ea.Tags()["scalars"]}
    assert scalar["visualness/tested"] == len(tested) > 0
    assert scalar["visualness/visual"] == sum(r["visual"] == "1" for r in tested)
    assert scalar["visualness/precision"] == pytest.approx(out["truth"]["precision"], nan_ok=True) or \
        out["truth"]["visual"] == 0
    assert {"visualness/lower", "visualness/lift"} <= set(ea.Tags()["histograms"])
    text = {k: ea.Tensors(k)[0].tensor_proto.string_val[0].decode() for k in ea.Tags()["tensors"]}
    top = text["visualness/top/text_summary"]
    assert f"| {tested[0]['tag']} |" in top and f"| {tested[-1]['tag']} |" in text["visualness/bottom/text_summary"]
    assert out["summary"] in text["visualness/summary/text_summary"]


@pytest.mark.slow
def test_the_benchmark_scores_every_arm_on_the_baselines_photos(cache_dir, make_cfg, tmp_path):
    """Three tiny trainings; the baseline's figures equal its own closing test pass's, the arms' vocabularies
    follow the file, and the table has every arm."""
    from conftest import TINY

    from im2vec.bench.visual_feedback import main

    over = [*TINY, f"paths.cache_dir={cache_dir}"]
    assert main([*over, "--seeds", "0", "--out", str(tmp_path / "own")])  # the baseline's own file, from validation
    assert (tmp_path / "own" / "corpus" / "seed0" / "visual_tags_val.tsv").is_file()
    # a file marking the 8 most frequent tags 0 (the tiny run's own marks few): they move the arms' figures
    vocab = make(make_cfg().data).vocab.tags
    path = _file(tmp_path, zero=vocab[:8], one=vocab[8:20])
    records = main([*over, "--seeds", "0", "--out", str(tmp_path), "--visual-tags", str(path)])
    by = {r["arm"]: r for r in records}
    assert set(by) == {"all tags", "visual only", "non-visual as negatives"}
    base = json.loads((tmp_path / "corpus" / "seed0" / "all" / "metrics.json").read_text())
    assert by["all tags"]["p5"] == pytest.approx(base["test/tagging/precision@5"], abs=1e-6)
    assert by["all tags"]["clean_p5"] == pytest.approx(base["test/tagging/clean/precision@5"], abs=1e-6)
    n0 = by["all tags"]["nonvisual"]
    assert n0 == 8 and by["all tags"]["nonvisual5"] > 0  # the baseline predicts the frequent tags
    assert by["visual only"]["tags"] == by["all tags"]["tags"] - n0 and by["non-visual as negatives"]["tags"] == \
        by["all tags"]["tags"]
    assert len({r["images"] for r in records}) == 1
    assert by["visual only"]["nonvisual5"] == 0  # its predictions are read by name: none is a tag it never had
