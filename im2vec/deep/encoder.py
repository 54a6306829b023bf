"""The deep part: a CNN trunk and the projection W that maps its features to the tag space.

This module knows nothing of Lightning, samplers or the tag table: ``ImageEncoder(x) -> u``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from im2vec.errors import BadValue, NotFound


class SmallCNN(nn.Module):
    """A few strided conv blocks and global pooling: trains in minutes on a laptop CPU."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        layers, c_in = [], 3
        for c in widths:
            layers += [
                nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.num_features = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean((2, 3))  # (B, C)


def _strip_classifier(model: nn.Module) -> int:
    """Replace a torchvision classifier's last Linear layer by Identity; return its input width."""
    for name in ("fc", "classifier", "heads", "head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            setattr(model, name, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            for i in reversed(range(len(head))):
                if isinstance(head[i], nn.Linear):
                    width = head[i].in_features
                    head[i] = nn.Identity()
                    return width
    raise ValueError(f"don't know where the classifier of {type(model).__name__} is")


def _load_pretrained(name: str, model: nn.Module, weights: str) -> None:
    """weights: a local file, or a torchvision weights name (e.g. 'DEFAULT', 'IMAGENET1K_V2') looked
    up in torch's hub cache. Nothing is ever downloaded."""
    path = Path(weights).expanduser()
    if not path.is_file():
        enum = torchvision.models.get_model_weights(name)
        try:
            url = enum[weights].url if weights != "DEFAULT" else enum.DEFAULT.url
        except KeyError:
            raise BadValue(f"{name}: no local file {path} and no torchvision weights named {weights!r}",
                           "pass model.weights=/path/to/file.pth or a weights name such as DEFAULT") from None
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not path.is_file():
            raise NotFound(f"pretrained weights for {name} not found at {path} (im2vec never downloads)",
                           "put the file there or pass model.weights=/path/to/file.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = model.state_dict()
    # a file saved with auxiliary heads (googlenet, inception_v3) loads into the model without them
    model.load_state_dict({k: v for k, v in state.items() if k in own or not k.lower().startswith("aux")})


def build_trunk(name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    """A torchvision classification backbone by name with its classifier removed, or 'small_cnn'.
    Returns (trunk, feature width)."""
    if name == "small_cnn":
        if weights:
            raise BadValue("small_cnn has no pretrained weights", "set model.weights=null")
        trunk = SmallCNN()
        return trunk, trunk.num_features
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise BadValue(f"unknown trunk {name!r}", "use small_cnn or a torchvision classification model name (resnet50, …)")
    # googlenet and inception_v3 return (logits, aux) tuples while training unless built without aux heads
    extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    if weights:
        _load_pretrained(name, model, weights)  # before stripping, so the file matches the model
    return model, _strip_classifier(model)


class ImageEncoder(nn.Module):
    """u = W · trunk(x): images (B, 3, H, W) -> image vectors (B, dim). ``project=False``: u = trunk(x), no W
    (dim must be the trunk's feature width)."""

    def __init__(self, trunk: str = "small_cnn", dim: int = 64, weights: str | None = None, project: bool = True):
        super().__init__()
        self.trunk, width = build_trunk(trunk, weights)
        if project:
            self.proj = nn.Linear(width, dim, bias=False)
        elif dim != width:  # u = f: the tag vectors live in the trunk's feature space
            raise BadValue(f"model.project=false needs model.dim={width} (the {trunk} trunk's feature width), "
                           f"not {dim}", f"set model.dim={width}, or model.project=true")
        else:
            self.proj = nn.Identity()
        self.dim, self.width = dim, width
        self.spec = {"trunk": trunk, "dim": dim}  # enough to rebuild the encoder from a checkpoint
        if not project:
            self.spec["project"] = False

    def forward_features(self, x: Tensor) -> Tensor:
        return self.trunk(x)  # (B, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.forward_features(x))  # (B, dim)
