"""Every mistake a user can fix ends in one line `im2vec: error: <what> — <what to do>`, exit status 2,
no traceback (unless HYDRA_FULL_ERROR=1 / --debug); a checkpoint cut short is refused, never loaded half."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from im2vec.errors import BadValue, NotFound, UserError, one_line, run_cli
from im2vec.train.checkpoint import check_checkpoint_file, load_model
from im2vec.train.training import check_config, train

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "", **(env or {})})


def _one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The process ended with status 2 and its stderr with one `im2vec: error:` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("im2vec: error: ") and " — " in last, proc.stderr[-3000:]
    assert sum(line.startswith("im2vec: error:") for line in proc.stderr.splitlines()) == 1
    assert "Error executing job" not in proc.stderr  # Hydra's own report of a failed job is not added
    for f in fragments:
        assert f in last, (f, last)
    return last


def _checkpoint_file(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.randn(64, 8)}, "im2vec": {"tags": ["a"]}}, path)
    return path


@pytest.mark.slow  # two train.py processes (torch and Lightning loaded in each); in-process: test_train.py's yfcc test
def test_the_yfcc_experiment_without_data(tmp_path):
    proc = _run("train.py", "+experiment=yfcc", f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}")
    _one_error_line(proc, "data: no shards match", "yfcc/train/shard-", "python -m im2vec.data.ingest")
    full = _run("train.py", "+experiment=yfcc", f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run2'}",
                env={"HYDRA_FULL_ERROR": "1"})  # the traceback, on request
    assert full.returncode == 1 and "Traceback" in full.stderr and "NotFound: data: no shards match" in full.stderr


@pytest.mark.slow  # two evaluate.py processes; in-process: test_evaluate.py (set ckpt_path), load_model's NotFound below
def test_evaluate_without_a_checkpoint_or_with_a_missing_one(tmp_path):
    _one_error_line(_run("evaluate.py", f"hydra.run.dir={tmp_path / 'a'}"), "no checkpoint given", "ckpt_path=")
    _one_error_line(_run("evaluate.py", "ckpt_path=missing.ckpt", f"hydra.run.dir={tmp_path / 'b'}"),
                    "no checkpoint at missing.ckpt")


@pytest.mark.slow  # a train.py process that loads torch and Lightning; in-process: the cut-anywhere test below
def test_train_refuses_a_checkpoint_cut_short(tmp_path):
    ckpt = _checkpoint_file(tmp_path / "last.ckpt")
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    _one_error_line(_run("train.py", f"ckpt_path={tmp_path / 'cut.ckpt'}", f"hydra.run.dir={tmp_path / 'r1'}"),
                    "is cut short or not a checkpoint", "copy it again")


def test_train_and_evaluate_refuse_bad_overrides(tmp_path):
    """The scripts' one-line errors, in their own processes (an override mistake is reported before torch loads;
    the sweep's job loads it)."""
    _one_error_line(_run("evaluate.py", "no_such_key=1", f"hydra.run.dir={tmp_path / 'e'}"),
                    "Could not override 'no_such_key'", "python evaluate.py")
    _one_error_line(_run("train.py", "no_such_key=1", f"hydra.run.dir={tmp_path / 'r2'}"),
                    "Could not override 'no_such_key'", "--cfg job")
    _one_error_line(_run("train.py", "model=no_such_model", f"hydra.run.dir={tmp_path / 'r3'}"),
                    "Could not find 'model/no_such_model'", "resnet18")
    sweep = _run("train.py", "-m", "data.batch_size=abc,16", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _one_error_line(sweep, "data.batch_size='abc' is not an integer", "sweep job 0: data.batch_size=abc")


@pytest.mark.slow  # train.py and a DataLoader worker process; in-process: the dataloader-worker test below
def test_training_with_another_collections_vocabulary_stops_and_says_why(make_cfg, tmp_path):
    shards = instantiate(make_cfg().data).train_shards  # the tiny corpus, written once per session
    other = tmp_path / "other_vocab.tsv"
    other.write_text("".join(f"elsewhere{i}\t{100 - i}\n" for i in range(50)))
    proc = _run("train.py", "data=shards", f"data.train_shards={Path(shards[0]).parent}/train-*.tar",
                f"data.vocab_path={other}", "data.num_workers=1", "data.image_size=32", "data.batch_size=8",
                "data.shuffle_buffer=100", "trainer.max_epochs=1", "trainer.accelerator=cpu", "model.dim=8",
                f"hydra.run.dir={tmp_path / 'run'}")
    # read in a DataLoader worker: the worker's traceback is not shown, only its message
    _one_error_line(proc, "none usable: no_tag", "does data.vocab_path belong to these shards")


def test_a_checkpoint_cut_anywhere_is_refused_never_loaded_half(tmp_path):
    data = _checkpoint_file(tmp_path / "whole.ckpt").read_bytes()
    for cut in (0, 1, 21, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1):
        part = tmp_path / f"cut{cut}.ckpt"
        part.write_bytes(data[:cut])
        with pytest.raises(BadValue, match="cut short or not a checkpoint"):
            check_checkpoint_file(part)
        with pytest.raises(BadValue, match="cut short or not a checkpoint"):
            load_model(part)
    # a whole zip with a damaged record: torch cannot read it; one line, not torch's error
    damaged = bytearray(data)
    with zipfile.ZipFile(tmp_path / "whole.ckpt") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    damaged[start : start + 64] = b"\xff" * 64
    (tmp_path / "damaged.ckpt").write_bytes(bytes(damaged))
    with pytest.raises(BadValue) as e:
        load_model(tmp_path / "damaged.ckpt")
    assert "\n" not in str(e.value)
    with pytest.raises(BadValue, match="not an im2vec training checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
        load_model(tmp_path / "other.ckpt")
    with pytest.raises(NotFound, match="no checkpoint at"):
        load_model(tmp_path / "missing.ckpt")


def test_resuming_with_a_checkpoint_of_another_vocabulary_is_one_user_error(tiny_run, make_cfg, tmp_path):
    ckpt = Path(tiny_run.trainer.checkpoint_callback.best_model_path)  # the shared tiny default run's
    assert ckpt.is_file()
    smaller = make_cfg("data.vocab_min_count=3", f"ckpt_path={ckpt}", out=tmp_path / "resumed")
    with pytest.raises(BadValue, match="tag table, this run") as e:
        train(smaller)
    assert "resume with the vocabulary and model.dim it was trained with" in str(e.value)


@pytest.mark.parametrize("override,fragment", [
    ("data.batch_size=0", "data.batch_size=0 is not an integer ≥ 1"),
    ("data.batch_size=abc", "data.batch_size='abc' is not an integer"),
    ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5 is not an integer"),
    ("optim.lr=-1", "optim.lr=-1 is not a finite number ≥ 0"),
    ("sampler.alpha=nan", "sampler.alpha=nan is not a finite number"),
    ("data.num_workers=true", "data.num_workers=True is not an integer"),
])
def test_bad_config_values_are_refused_before_anything_is_built(make_cfg, override, fragment):
    with pytest.raises(BadValue, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        check_config(make_cfg(override))


def test_bad_values_inside_a_group_name_the_target(make_cfg):
    with pytest.raises(BadValue, match="pytorch_lightning.Trainer: .*Precision 17 is invalid"):
        train(make_cfg("trainer.precision=17"))


def _worker_raises(_):
    raise UserError("data: the worker's own message", "do this")


def test_a_user_error_from_a_dataloader_worker_is_its_own_message():
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1, collate_fn=_worker_raises)
    with pytest.raises(UserError) as e:
        next(iter(loader))
    assert "Traceback" in str(e.value)  # torch puts the worker's traceback into the message ...
    assert one_line(e.value) == "data: the worker's own message — do this"  # ... one_line takes it out


def test_module_commands_follow_the_convention(tmp_path, capsys):
    from im2vec.data import ingest, vocab
    from im2vec.use import predict

    assert run_cli(vocab.main, [str(tmp_path / "v.tsv"), "--shards", str(tmp_path / "none-*.tar")], exit=False) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("im2vec: error: vocab: no shards match") and " — " in err
    assert run_cli(ingest.main, ["collection", "--out", str(tmp_path)], exit=False) == 2  # argparse's own error
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the following arguments are required: manifest" in err
    assert predict.main(["tag", str(tmp_path / "x.ckpt"), str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.startswith("im2vec: error: checkpoint: no checkpoint at")
    with pytest.raises(NotFound):  # --debug: the traceback instead
        run_cli(vocab.main, [str(tmp_path / "v.tsv"), "--shards", str(tmp_path / "none-*.tar"), "--debug"],
                exit=False)
    assert run_cli(vocab.main, ["--help"], exit=False) == 0 and "--debug" in capsys.readouterr().out
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda argv: 1 / 0, [], exit=False)


def test_python_m_prints_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "im2vec.data.ingest", "collection", str(tmp_path / "none.jsonl"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    _one_error_line(proc, "ingest: input not found", "check the path")


def test_unusable_held_out_shards_are_said_not_silently_empty(make_cfg, tmp_path, capsys):
    import json as _json

    import webdataset as wds
    from hydra import compose, initialize_config_dir

    dm = instantiate(make_cfg().data)  # the tiny corpus: good training shards and vocabulary
    bad = tmp_path / "bad.tar"
    with wds.TarWriter(str(bad)) as w:
        for i in range(20):
            w.write({"__key__": f"{i:05d}", "jpg": b"not a jpeg", "json": _json.dumps({"tags": [dm.vocab.tags[0]]}).encode()})
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=shards", f"data.train_shards={dm.train_shards}", f"data.val_shards=[{bad}]",
            f"data.test_shards=[{bad}]", f"data.vocab_path={Path(dm.train_shards[0]).parent / 'vocab.tsv'}",
            "data.num_workers=0", "data.image_size=32", "data.batch_size=8", "data.batches_per_epoch=2",
            "data.shuffle_buffer=20", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "model.dim=8",
            f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.warns(UserWarning, match="validation: not one usable image in data.val_shards"):
        metrics, _ = train(cfg)
    assert "im2vec: warning: no test figures: evaluate: no usable held-out image" in capsys.readouterr().err
    assert not any(k.startswith(("val/", "test/")) for k in metrics) and (tmp_path / "run" / "metrics.json").is_file()


def test_the_error_line_starts_on_a_line_of_its_own_under_a_progress_bar(capsys):
    """A bar still drawn (tqdm's, as Lightning's and the ingest's) ends without a newline: the message would land on
    the bar's line. With a bar open the line starts with a newline; without one it does not."""
    import io

    from tqdm import tqdm

    from im2vec.errors import UserError, error_line, run_cli

    def boom(argv):
        raise UserError("no shards", "ingest them first")

    assert error_line(UserError("x", "y")) == "im2vec: error: x — y"
    bar = tqdm(total=10, file=io.StringIO())
    bar.update(3)
    try:
        assert error_line(UserError("x", "y")) == "\nim2vec: error: x — y"
        assert run_cli(boom, [], exit=False) == 2
        assert capsys.readouterr().err == "\nim2vec: error: no shards — ingest them first\n"
    finally:
        bar.close()
    assert run_cli(boom, [], exit=False) == 2
    assert capsys.readouterr().err == "im2vec: error: no shards — ingest them first\n"
