"""Atomic checkpoint writes and the every-N-batches trigger (the signal and kill paths: test_ddp_train.py)."""

from __future__ import annotations

import pytest
import torch

from im2vec.train.resilience import AtomicCheckpointIO, Checkpoints


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(10.0)}, path)
    good = path.read_bytes()

    def dies_half_way(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(good[: len(good) // 2])  # a partial file, then the crash
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2, "w": torch.zeros(10)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(10.0))


def test_a_save_replaces_the_file_in_one_rename(tmp_path, monkeypatch):
    import os

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((str(a), str(b))), real(a, b)))
    io.save_checkpoint({"step": 2}, path)
    assert len(renames) == 1 and renames[0][1] == str(path) and ".tmp-" in renames[0][0]
    assert io.load_checkpoint(path)["step"] == 2


def test_every_n_batches_counts_batches_and_keeps_the_epoch_end_save(tmp_path):
    c = Checkpoints(every_n_batches=50, dirpath=str(tmp_path), filename="last")
    assert c._every_n_train_steps == 100  # Lightning's global step: two optimizer steps a batch
    assert c._every_n_epochs == 1
    assert Checkpoints(dirpath=str(tmp_path))._every_n_train_steps == 0
    with pytest.raises(ValueError):
        Checkpoints(every_n_batches=-1)
