"""Held-out figures during training: precision@5 against observed and clean tags beside the
frequency prior, the noise share of the top 5, a sweep of the tagging score's γ, and pictures
(tag vectors for TensorBoard's projector, a grid of images with their top-5 tags)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from im2vec.data.samples import MEAN, STD
from im2vec.data.shards import first_by_key, key_rank
from im2vec.errors import BadValue
from im2vec.eval.intervals import GAMMA_RULES, bootstrap_means, choose, interval
from im2vec.eval.metrics import (
    image_mean,
    noise_share,
    precision_at_k,
    precision_per_image,
    recall_at_k,
    recall_per_image,
)
from im2vec.eval.scoring import prior_topk, topk_tags
from im2vec.eval.shard_scoring import merge_to_rank0, shard_topk
from im2vec.tags import PAD

K = 5  # the headline cut-off (precision@5, the noise share of the top 5)
K_MAX = 10  # top lists are this long: precision@1, precision@5 and recall@10 all come from them


def _observed(top: Tensor, obs: Tensor) -> dict[str, float]:
    """precision@1, precision@5 and recall@10 of top-10 lists (N, 10) against the observed tags."""
    return {"precision@1": precision_at_k(top, obs, 1), "precision@5": precision_at_k(top, obs, K),
            "recall@10": recall_at_k(top, obs, K_MAX)}


def _cat_padded(rows: list[Tensor]) -> Tensor:
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=PAD) for r in rows])


def per_image(crit: str, top: Tensor, obs: Tensor, clean: Tensor, noise_ids: Tensor | None) -> Tensor:
    """(N,) float64: one image's value of a γ criterion (NaN where the image has no true tag of that kind)."""
    name, _, k = crit.rpartition("@")
    k = int(k)
    if name in ("precision", "recall"):
        return (precision_per_image if name == "precision" else recall_per_image)(top, obs, k)
    if name == "clean_precision":
        return precision_per_image(top, clean, k)
    if name == "clean_minus_noise":
        if noise_ids is None:
            return precision_per_image(top, clean, k)
        return precision_per_image(top, clean, k) - torch.isin(top[:, :k], noise_ids).double().mean(1)
    raise BadValue(f"validation.gamma_by={crit!r}", f"use one of {', '.join(GAMMA_CRITERIA)}")


# what the γ on validation is chosen by. auto: where the images have clean tags (the generated corpus, a
# hand-checked validation set), clean precision@5 minus the noise share of the top 5 when the noise tags are
# known (both of the corpus's goals), clean precision@5 alone when not; else recall@10 of the observed tags
GAMMA_CRITERIA = ("auto", "precision@1", "precision@5", "recall@10", "clean_precision@5", "clean_minus_noise@5")


class ValidationReport:
    """Accumulates a validation pass and computes its figures.

    γ (the tagging score's weight on log count) is chosen here when ``choose_gamma``: the γ of the
    sweep with the best ``gamma_by`` on these held-out images (ties: the smaller γ). The
    validation split is grouped by user where the data allows it (the ingest's ``--split-by
    user``), so the choice reflects new uploaders; test figures are computed elsewhere, at this γ.
    """

    def __init__(self, tags: list[str], counts: Tensor, noise_ids: Tensor | None, gamma: float,
                 gammas: list[float], projector_tags: int, grid_images: int, choose_gamma: bool = True,
                 gamma_by: str = "auto", gamma_rule: str = "best"):
        if gamma_by not in GAMMA_CRITERIA:
            raise BadValue(f"validation.gamma_by={gamma_by!r}", f"use one of {', '.join(GAMMA_CRITERIA)}")
        if gamma_rule not in GAMMA_RULES:
            raise BadValue(f"validation.gamma_rule={gamma_rule!r}", f"use one of {', '.join(GAMMA_RULES)}")
        self.tags, self.counts, self.noise_ids = tags, counts, noise_ids
        self.gamma, self.gammas = gamma, sorted(set(gammas) | {gamma})
        self.choose_gamma, self.gamma_by, self.gamma_rule = choose_gamma, gamma_by, gamma_rule
        self.projector_tags, self.grid_images = min(projector_tags, 100_000, len(tags)), grid_images
        self.metrics: dict[str, float] = {}
        self.step = -1  # global step of the last computed figures
        self.reset()

    def reset(self) -> None:
        self.u, self.obs, self.clean, self.keys, self.users = [], [], [], [], []
        self.images, self.image_keys = None, []  # the grid: the held-out images of smallest key rank so far

    @property
    def size(self) -> int:
        return sum(len(u) for u in self.u)

    def add(self, u: Tensor, tags: Tensor, clean: Tensor, keys: list[str], images: Tensor | None,
            users: list[str] | None = None) -> None:
        self.u.append(u)
        self.obs.append(tags)
        self.clean.append(clean)
        self.keys += keys
        self.users += list(users) if users is not None else [""] * len(keys)  # the intervals resample uploaders
        if images is not None and self.grid_images > 0:  # keep the grid_images smallest key ranks: inside any subset
            pool = self.image_keys + list(keys)
            best = sorted(range(len(pool)), key=lambda i: key_rank(pool[i]))[: self.grid_images]
            new = [i - len(self.image_keys) for i in best if i >= len(self.image_keys)]
            if new:
                fresh = images[torch.tensor(new, device=images.device)].float().cpu()
                old = [i for i in best if i < len(self.image_keys)]
                self.images = torch.cat([self.images[old], fresh]) if old else fresh
                self.image_keys = [self.image_keys[i] for i in old] + [keys[i] for i in new]

    def gather(self, group, rank: int, world: int, everywhere: bool = False) -> None:
        """Every rank's images of this pass onto rank 0 (its report then holds them all, as one device's
        would: the same key-hash subset and grid, so the same figures); the other ranks' reports are
        emptied, or (``everywhere``) hold every rank's vectors and tags too, without the grid's images.
        Every rank must call it."""
        import torch.distributed as dist

        mine = (self.u, self.obs, self.clean, self.keys, self.users)
        every = [None] * world if rank == 0 or everywhere else None
        if everywhere:
            dist.all_gather_object(every, mine, group=group)
        else:
            dist.gather_object(mine, every, dst=0, group=group)
        shown = [None] * world if rank == 0 else None
        dist.gather_object((self.images, self.image_keys), shown, dst=0, group=group)
        self.reset()
        for u, obs, clean, keys, users in every or []:
            self.u += u
            self.obs += obs
            self.clean += clean
            self.keys += keys
            self.users += users
        if rank != 0:
            return
        pool = [images for images, _ in shown if images is not None]
        pool_keys = [k for images, image_keys in shown if images is not None for k in image_keys]
        if pool:
            best = sorted(range(len(pool_keys)), key=lambda i: key_rank(pool_keys[i]))[: self.grid_images]
            self.images = torch.cat(pool)[torch.tensor(best, dtype=torch.long)]
            self.image_keys = [pool_keys[i] for i in best]

    def compute(self, table: Tensor, log_counts: Tensor, step: int, max_images: int | None = None,
                device: str | torch.device | None = None) -> dict[str, float]:
        """The figures on the ``max_images`` images with the smallest key hashes (all when None).

        The scores of every tag are computed on ``device`` (default: the CPU; training passes the
        trunk's), the host table going there a chunk of rows at a time: one pass for every γ of the
        sweep. Everything after the top-10 lists (metrics, the choice of γ) is on the CPU."""
        keep, u, obs, clean = self._kept(max_images)
        top = {g: ids for g, (_, ids) in topk_tags(u, table, log_counts, self.gammas, K_MAX, device=device).items()}
        return self.figures(top, keep, obs, clean, step)

    def _kept(self, max_images: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The images scored: (their rows in the pass, u (N, d), observed and clean tags (N, ·) PAD-padded)."""
        keep = first_by_key(self.keys, max_images)  # the same subset whatever the loader's settings
        return keep, torch.cat(self.u)[keep], _cat_padded(self.obs)[keep], _cat_padded(self.clean)[keep]

    def figures(self, top: dict[float, Tensor], keep: Tensor, obs: Tensor, clean: Tensor, step: int) -> dict:
        """The figures from each γ's top-10 lists (N, 10) of the kept images (``_kept``); chooses γ."""
        prior = prior_topk(self.counts, len(obs), K_MAX)
        has_clean = bool((clean >= 0).any())
        crit = self.gamma_by
        if crit == "auto":
            crit = ("recall@10" if not has_clean else "clean_precision@5" if self.noise_ids is None
                    else "clean_minus_noise@5")
        if crit.startswith("clean_") and self.choose_gamma and not has_clean:
            raise BadValue(f"validation.gamma_by={crit}: the validation images have no clean tags "
                           "(a clean_tags field in their JSON)", "use recall@10 or auto")
        if crit == "clean_minus_noise@5" and self.choose_gamma and self.noise_ids is None:
            raise BadValue("validation.gamma_by=clean_minus_noise@5: no noise tags are known (data.content_tags_path)",
                           "use clean_precision@5 or auto")
        by = {g: _observed(ids, obs) for g, ids in top.items()}  # γ -> {precision@1, precision@5, recall@10}
        if has_clean:
            for g, ids in top.items():
                by[g]["clean_precision@5"] = precision_at_k(ids, clean, K)
                if self.noise_ids is not None:
                    by[g]["noise_share@5"] = noise_share(ids, self.noise_ids, K)
                    by[g]["clean_minus_noise@5"] = by[g]["clean_precision@5"] - by[g]["noise_share@5"]
        # each γ's criterion per image, and its mean over uploaders resampled with replacement (intervals.py)
        users, keys = [self.users[i] for i in keep.tolist()], [self.keys[i] for i in keep.tolist()]
        values = torch.stack([per_image(crit, top[g], obs, clean, self.noise_ids) for g in self.gammas], 1)  # (N, G)
        boot = bootstrap_means(values, users, keys)
        point = torch.tensor([image_mean(values[:, j]) for j in range(len(self.gammas))])
        chosen, info = choose(self.gammas, point, boot, self.gamma_rule)
        if self.choose_gamma:  # the γ the rule picks on these images (best: ties go to the smaller γ)
            self.gamma = self.gammas[chosen]
        g0 = self.gamma
        m = {f"val/{name}": v for name, v in by[g0].items() if name != "clean_minus_noise@5"}
        j0 = self.gammas.index(g0)
        m.update({f"val/{crit}_lo": float(info["lo"][j0]), f"val/{crit}_hi": float(info["hi"][j0]),
                  "val/images": float(len(users)), "val/uploaders": float(len({u for u in users if u})),
                  "val/best_gamma": self.gammas[info["best"]]})
        if crit != "precision@5":  # the headline figure's interval too
            lo, hi = interval(bootstrap_means(precision_per_image(top[g0], obs, K).unsqueeze(1), users, keys))
            m.update({"val/precision@5_lo": float(lo[0]), "val/precision@5_hi": float(hi[0])})
        m.update({f"val/{name}_prior": v for name, v in _observed(prior, obs).items()})
        m["val/gamma"] = g0
        if has_clean:
            m["val/clean_precision@5_prior"] = precision_at_k(prior, clean, K)
        if self.noise_ids is not None:
            m["val/noise_share@5"] = noise_share(top[g0], self.noise_ids, K)
            m["val/noise_share@5_prior"] = noise_share(prior, self.noise_ids, K)
        for j, g in enumerate(self.gammas):  # the sweep: what γ would have given, a diagnostic
            m[f"val_gamma/precision@5/{g:g}"] = by[g]["precision@5"]
            if crit not in ("precision@5", "clean_precision@5"):
                m[f"val_gamma/{crit}/{g:g}"] = by[g][crit]
            # the criterion's interval, and that of its difference to the best γ's (paired: the same resamples)
            for name in ("lo", "hi", "diff_lo", "diff_hi", "diff_sd"):
                m[f"val_gamma/{crit}_{name}/{g:g}"] = float(info[name][j])
            if has_clean:
                m[f"val_gamma/clean_precision@5/{g:g}"] = by[g]["clean_precision@5"]
            if self.noise_ids is not None:
                m[f"val_gamma/noise_share@5/{g:g}"] = (by[g]["noise_share@5"] if has_clean
                                                       else noise_share(top[g], self.noise_ids, K))
        self.metrics, self.step = m, step
        self._top = top[g0]
        self._obs = obs
        self._row = {self.keys[i]: r for r, i in enumerate(keep.tolist())}  # key -> row of _top (the kept subset)
        return m

    def compute_across(self, table: Tensor, log_counts: Tensor, step: int, max_images: int | None,
                       device, group=None, rank: int = 0, world: int = 1) -> tuple[dict | None, int]:
        """``compute`` for a run on ``world`` ranks whose table is sharded by rows: ``table`` is this rank's
        rows (ids rank, rank + world, …; the whole table when ``world`` is 1). Every rank gets every rank's
        image vectors, scores them against its own rows and keeps each image's top 10; the lists merge on rank
        0 (im2vec/eval/shard_scoring.py), which computes the figures of one process; they and γ then go to
        every rank (γ goes into every rank's checkpoint) -> (figures or None when no image was usable, images
        scored). The table is never assembled."""
        if world == 1:
            return (self.compute(table, log_counts, step, max_images, device=device) if self.size else None), self.size
        import torch.distributed as dist

        self.gather(group, rank, world, everywhere=True)
        metrics = None
        if self.size:  # the same on every rank now
            keep, u, obs, clean = self._kept(max_images)
            scores, ids = shard_topk(u, table, log_counts, self.gammas, K_MAX, rank, world, device)
            merged = merge_to_rank0(scores, ids, group, rank, world)
            if merged is not None:  # rank 0
                k = min(K_MAX, log_counts.shape[0])
                metrics = self.figures({g: merged[1][j, :, :k] for j, g in enumerate(self.gammas)}, keep, obs,
                                       clean, step)
        box = [metrics, self.gamma, self.step, self.size]
        dist.broadcast_object_list(box, src=0, group=group)
        metrics, self.gamma, self.step, size = box
        self.metrics = metrics or self.metrics
        return metrics, size

    def log_pictures(self, tb, table: Tensor, log_counts: Tensor, step: int) -> None:
        """Tag vectors of the most frequent tags to the projector (``table``: at least their rows, the first
        ``projector_tags``: the vocabulary is sorted by count); a grid of images with their top 5."""
        n = self.projector_tags
        tb.add_embedding(table[:n].clone(), metadata=self.tags[:n], tag="tag_vectors", global_step=step)
        if self.images is not None:
            rows = [(img, self._row[k]) for img, k in zip(self.images, self.image_keys) if k in self._row]
            tiles = [self._tile(img, self._top[i, :K].tolist(), set(self._obs[i].tolist())) for img, i in rows]
            if not tiles:  # the first batch's images all fell outside the key-hash subset
                return
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
