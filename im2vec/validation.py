"""Held-out figures during training: precision@5 against observed and clean tags beside the
frequency prior, the noise share of the top 5, a sweep of the tagging score's γ, and pictures
(tag vectors for TensorBoard's projector, a grid of images with their top-5 tags)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from im2vec.data import MEAN, STD
from im2vec.metrics import noise_share, precision_at_k
from im2vec.sampler import PAD
from im2vec.scoring import prior_topk, topk_tags

K = 5


def _cat_padded(rows: list[Tensor]) -> Tensor:
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=PAD) for r in rows])


class ValidationReport:
    def __init__(self, tags: list[str], counts: Tensor, noise_ids: Tensor | None, gamma: float,
                 gammas: list[float], projector_tags: int, grid_images: int):
        self.tags, self.counts, self.noise_ids = tags, counts, noise_ids
        self.gamma, self.gammas = gamma, sorted(set(gammas) | {gamma})
        self.projector_tags, self.grid_images = min(projector_tags, 100_000, len(tags)), grid_images
        self.metrics: dict[str, float] = {}
        self.step = -1  # global step of the last computed figures
        self.reset()

    def reset(self) -> None:
        self.u, self.obs, self.clean, self.images = [], [], [], None

    @property
    def size(self) -> int:
        return sum(len(u) for u in self.u)

    def add(self, u: Tensor, tags: Tensor, clean: Tensor, images: Tensor | None) -> None:
        self.u.append(u)
        self.obs.append(tags)
        self.clean.append(clean)
        if images is not None and self.images is None:
            self.images = images[: self.grid_images].float().cpu()

    def compute(self, table: Tensor, log_counts: Tensor, step: int) -> dict[str, float]:
        u, obs, clean = torch.cat(self.u), _cat_padded(self.obs), _cat_padded(self.clean)
        top = topk_tags(u, table, log_counts, self.gammas, K)
        prior = prior_topk(self.counts, len(u), K)
        has_clean = bool((clean >= 0).any())
        m = {"val/precision@5": precision_at_k(top[self.gamma][1], obs, K),
             "val/precision@5_prior": precision_at_k(prior, obs, K)}
        if has_clean:
            m["val/clean_precision@5"] = precision_at_k(top[self.gamma][1], clean, K)
            m["val/clean_precision@5_prior"] = precision_at_k(prior, clean, K)
        if self.noise_ids is not None:
            m["val/noise_share@5"] = noise_share(top[self.gamma][1], self.noise_ids, K)
            m["val/noise_share@5_prior"] = noise_share(prior, self.noise_ids, K)
        for g in self.gammas:  # the γ sweep: choose the tagging score's γ from these
            m[f"val_gamma/precision@5/{g:g}"] = precision_at_k(top[g][1], obs, K)
            if has_clean:
                m[f"val_gamma/clean_precision@5/{g:g}"] = precision_at_k(top[g][1], clean, K)
            if self.noise_ids is not None:
                m[f"val_gamma/noise_share@5/{g:g}"] = noise_share(top[g][1], self.noise_ids, K)
        self.metrics, self.step = m, step
        self._top = top[self.gamma][1]
        self._obs = obs
        return m

    def log_pictures(self, tb, table: Tensor, log_counts: Tensor, step: int) -> None:
        """Tag vectors of the most frequent tags to the projector; a grid of images with their top 5."""
        n = self.projector_tags
        tb.add_embedding(table[:n].clone(), metadata=self.tags[:n], tag="tag_vectors", global_step=step)
        if self.images is not None:
            tiles = [self._tile(img, self._top[i].tolist(), set(self._obs[i].tolist())) for i, img in enumerate(self.images)]
            tb.add_image("val/top5_tags", make_grid(torch.stack(tiles), nrow=8, padding=2), step)

    def _tile(self, image: Tensor, top: list[int], observed: set[int], side: int = 128) -> Tensor:
        """One image over its top-5 tags (tags the uploader also wrote are marked '*')."""
        rgb = (image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1)
        lines = [("* " if t in observed else "  ") + self.tags[t][:18] for t in top]
        return labelled_tile((rgb * 255).to(torch.uint8), lines, side)


def labelled_tile(image: Tensor, lines: list[str], side: int = 128) -> Tensor:
    """An image (3, H, W) uint8 resized to side×side over lines of text -> (3, h, w) float in [0, 1]."""
    pic = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((side, side))
    canvas = Image.new("RGB", (side, side + 12 * len(lines) + 4), "white")
    canvas.paste(pic, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(lines):
        draw.text((3, side + 2 + 12 * j), line, fill="black")
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255
