"""Trunks and the image encoder of im2vec/deep/encoder.py (never downloads anything)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from im2vec.deep.encoder import ImageEncoder, build_trunk

# feature widths of the stripped torchvision classifiers (their last Linear's in_features)
WIDTHS = {
    "small_cnn": 128,
    "resnet18": 512,
    "efficientnet_b0": 1280,
    "convnext_tiny": 768,
    "mobilenet_v3_small": 1024,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch's hub cache pointed at an empty folder; cwd moved there too."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.chdir(tmp_path)
    hub = Path(torch.hub.get_dir())
    assert hub == tmp_path / "torch_home" / "hub"
    return hub


@pytest.mark.parametrize("name", list(WIDTHS))
def test_trunks_and_encoder_shapes(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    if name == "small_cnn":
        trunk, width = build_trunk(name)
        assert width == WIDTHS[name]
    enc = ImageEncoder(name, dim=8).eval()
    width = WIDTHS[name]
    with torch.no_grad():
        feats = enc.forward_features(x)
        u = enc(x)
    assert feats.shape == (2, width)
    assert u.shape == (2, 8)
    assert torch.isfinite(u).all()
    assert enc.dim == 8 and enc.spec == {"trunk": name, "dim": 8}
    assert enc.proj.in_features == width and enc.proj.out_features == 8


def test_unknown_trunk_raises():
    with pytest.raises(ValueError):
        build_trunk("no_such_net")
    with pytest.raises(ValueError):
        ImageEncoder("resnet_9000", dim=8)
    with pytest.raises(ValueError):
        build_trunk("small_cnn", weights="DEFAULT")


@pytest.mark.parametrize("weights,enum_name", [("IMAGENET1K_V1", "IMAGENET1K_V1"), ("DEFAULT", "DEFAULT")])
def test_missing_cached_weights_raise_with_path(empty_hub, weights, enum_name):
    url = getattr(torchvision.models.ResNet18_Weights, enum_name).url
    expected = empty_hub / "checkpoints" / Path(url).name
    with pytest.raises(FileNotFoundError) as err:
        ImageEncoder("resnet18", 8, weights=weights)
    assert str(expected) in str(err.value)
    assert not expected.exists()  # nothing was downloaded


def test_unknown_weights_name_raises_value_error(empty_hub):
    with pytest.raises(ValueError):
        ImageEncoder("resnet18", 8, weights="NO_SUCH_WEIGHTS")


def _marked_resnet18_state():
    state = torchvision.models.resnet18(weights=None).state_dict()
    marker = torch.arange(state["conv1.weight"].numel(), dtype=torch.float32).view_as(state["conv1.weight"]) / 1000
    state["conv1.weight"] = marker
    state["layer4.1.bn2.running_mean"] = torch.full_like(state["layer4.1.bn2.running_mean"], 3.25)
    return state, marker


@pytest.mark.parametrize("wrap", [False, True])
def test_weights_from_local_file(tmp_path, wrap):
    state, marker = _marked_resnet18_state()
    path = tmp_path / "my_resnet18.pth"
    torch.save({"state_dict": state} if wrap else state, path)
    enc = ImageEncoder("resnet18", 8, weights=str(path))
    assert torch.equal(enc.trunk.conv1.weight.detach(), marker)
    assert (enc.trunk.layer4[1].bn2.running_mean == 3.25).all()
    with torch.no_grad():
        assert enc.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_weights_by_name_from_hub_cache(empty_hub):
    state, marker = _marked_resnet18_state()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = empty_hub / "checkpoints" / Path(url).name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    enc = ImageEncoder("resnet18", 8, weights="IMAGENET1K_V1")
    assert torch.equal(enc.trunk.conv1.weight.detach(), marker)


def test_encoder_without_projection_is_the_trunk_and_survives_its_checkpoint(cache_dir, tmp_path):
    """model.project=false: u = f (no W), dim must be the trunk's width (one line otherwise); a checkpoint of
    such a run rebuilds the same encoder (load_model reads the flag from the recorded spec)."""
    from conftest import TINY
    from hydra import compose, initialize_config_dir

    from im2vec.errors import BadValue
    from im2vec.train.checkpoint import load_model
    from im2vec.train.training import train

    torch.manual_seed(0)
    enc = ImageEncoder("small_cnn", 128, project=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), enc.trunk(x)) and enc.spec == {"trunk": "small_cnn", "dim": 128, "project": False}
    assert not [p for n, p in enc.named_parameters() if n.startswith("proj")]
    assert "project" not in ImageEncoder("small_cnn", 64).spec  # the default's spec as before: old checkpoints load
    with pytest.raises(BadValue, match=r"model.project=false needs model.dim=128"):
        ImageEncoder("small_cnn", 64, project=False)
    root = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(str(root), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path}",
                                          "trainer.max_epochs=1", "model.dim=128", "model.project=false"])
    _, objs = train(cfg)
    model = load_model(tmp_path / "checkpoints" / "last.ckpt")
    trained = objs["module"].encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), trained(x))
        torch.testing.assert_close(model.encoder(x), model.encoder.trunk(x))
