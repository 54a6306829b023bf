"""The frozen trunk of the frozen-trunk fast mode (im2vec.train.features): the trunk an extraction runs (from a
training checkpoint, a trunk.pt, torchvision weights or a seeded random init), the trunk.pt file it writes
beside its features with the digest of its weights, and the encoder a features-mode run trains
(``frozen_encoder``: that trunk frozen, a fresh projection W)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from im2vec.deep.encoder import ImageEncoder, build_trunk
from im2vec.errors import BadValue, NotFound
from im2vec.train.feature_data import read_manifest

# the frozen trunk stays in eval mode through fit (FrozenTrunkEncoder.train) on purpose: Lightning's warning is noise
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")

TRUNK_FORMAT, TRUNK_FILE = "im2vec-trunk-1", "trunk.pt"


def trunk_digest(trunk: nn.Module) -> str:
    """A hash of the trunk's weights and buffers (BatchNorm statistics included): features from two
    extractions belong together only when their digests are equal."""
    h = hashlib.sha256()
    for name, t in sorted(trunk.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def read_trunk_file(path: str | os.PathLike) -> dict:
    """A trunk.pt written by an extraction (python -m im2vec.train.features): {"format", "trunk", "width", "digest", "state_dict"}."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"features: no trunk file {path}", "give the trunk.pt an extraction wrote beside its features")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unpickling refused, truncated, not a torch file: all one answer
        raise BadValue(f"features: {path} cannot be read as a trunk file ({str(e).strip()[:120]})",
                       "give the trunk.pt an extraction wrote (python -m im2vec.train.features)") from None
    if not isinstance(saved, dict) or saved.get("format") != TRUNK_FORMAT:
        raise BadValue(f"features: {path} is not a trunk file written by python -m im2vec.train.features",
                       "give the trunk.pt an extraction wrote")
    return saved


def load_trunk(checkpoint: str | None = None, name: str | None = None, weights: str | None = None,
               seed: int = 0) -> tuple[nn.Module, str, int, int | None]:
    """(trunk, its name, feature width, the image size its checkpoint was trained at or None), from a training
    checkpoint or by name: with ``weights`` a trunk.pt of an earlier extraction, a local torchvision .pth or a
    weights name in torch's hub cache (nothing downloaded); without, a random init drawn from ``seed``."""
    if checkpoint:
        from im2vec.train.checkpoint import load_model

        model = load_model(checkpoint)
        return model.encoder.trunk, model.encoder.spec["trunk"], model.encoder.width, model.image_size
    if weights and Path(weights).is_file() and _is_trunk_file(weights):
        saved = read_trunk_file(weights)
        if saved["trunk"] != name:
            raise BadValue(f"features: {weights} holds a {saved['trunk']} trunk, not {name}",
                           f"use --trunk {saved['trunk']}")
        trunk, width = build_trunk(name)
        trunk.load_state_dict(saved["state_dict"])
        return trunk, name, width, None
    with torch.random.fork_rng():  # the same random trunk at every call: train, val and test extracted alike
        torch.manual_seed(seed)
        trunk, width = build_trunk(name, weights)
    return trunk, name, width, None


def _is_trunk_file(path: str) -> bool:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- not ours (a torchvision .pth may hold more than weights-only allows)
        return False
    return isinstance(saved, dict) and saved.get("format") == TRUNK_FORMAT


class FrozenTrunkEncoder(ImageEncoder):
    """ImageEncoder whose trunk never trains: parameters frozen (AdamW gets W alone) and always in eval mode
    (were images ever run through it in training, BatchNorm's statistics would still not move). Its
    checkpoint is an ordinary ImageEncoder's: ``load_model`` and ``Tagger`` rebuild it from ``spec``."""

    def train(self, mode: bool = True) -> FrozenTrunkEncoder:
        super().train(mode)
        self.trunk.eval()
        return self


def frozen_encoder(features_dir: str, dim: int = 64) -> FrozenTrunkEncoder:
    """The encoder of a features-mode run (``model=frozen``): trunk.pt of the training features, frozen, and a
    fresh projection W (dim × F)."""
    manifest = read_manifest(features_dir)
    saved = read_trunk_file(Path(features_dir) / TRUNK_FILE)
    if saved["digest"] != manifest["trunk_digest"]:
        raise BadValue(f"features: {features_dir}/{TRUNK_FILE} is not the trunk its features were extracted with",
                       "extract the features again")
    encoder = FrozenTrunkEncoder(saved["trunk"], dim)
    encoder.trunk.load_state_dict(saved["state_dict"])
    encoder.trunk.requires_grad_(False)
    return encoder.train()
