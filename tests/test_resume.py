"""N batches + resume + N batches gives the same model as 2N batches straight (CPU, deterministic)."""

import pytest
import torch

from im2vec.train.training import train

DET = ["trainer.deterministic=true", "trainer.check_val_every_n_epoch=2"]


@pytest.mark.parametrize("trunk", [
    "small_cnn",
    pytest.param("mobilenet_v3_small", marks=pytest.mark.slow),  # keeps a dropout layer; the same check, 3× the time
])
def test_resume_is_exact(make_cfg, tmp_path, trunk):
    det = [*DET, f"model.trunk={trunk}"]
    _, straight = train(make_cfg(*det, out=tmp_path / "straight"))
    # the same schedule (max_epochs=2), stopped after the first epoch: 3 batches = 6 optimizer steps
    train(make_cfg(*det, "trainer.max_steps=6", out=tmp_path / "first"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _, resumed = train(make_cfg(*det, f"ckpt_path={ckpt}", out=tmp_path / "resumed"))

    a, b = straight["module"], resumed["module"]
    assert resumed["trainer"].global_step == straight["trainer"].global_step == 12
    assert torch.equal(a.table.weight, b.table.weight)
    for (name, p), q in zip(a.encoder.state_dict().items(), b.encoder.state_dict().values()):
        assert torch.equal(p, q), name
    state_a = a.optimizers()[1].optimizer.state[a.table.weight]
    state_b = b.optimizers()[1].optimizer.state[b.table.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state_b[key].device.type == "cpu"
        assert torch.equal(state_a[key], state_b[key])
    assert torch.equal(a.head.gen.get_state(), b.head.gen.get_state())


def test_resume_with_other_dim_or_vocabulary_fails(tiny_run, make_cfg, tmp_path):
    ckpt = tiny_run.ckpt  # the shared tiny default run's
    with pytest.raises(ValueError, match="tag table"):
        train(make_cfg("model.dim=8", f"ckpt_path={ckpt}", out=tmp_path / "dim"))
    with pytest.raises(ValueError, match="tag table|vocabulary"):
        train(make_cfg("data.vocab_min_count=2", f"ckpt_path={ckpt}", out=tmp_path / "vocab"))


def test_resume_from_missing_checkpoint_fails(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(make_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}"))
