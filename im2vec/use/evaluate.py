"""evaluate.py's work: a trained checkpoint on held-out shards, beside the frequency prior (and a
second checkpoint when given), tagging over the full vocabulary and retrieval by tag.

Outputs in the run directory: metrics.json (flat keys: tagging/precision@5, tagging/clean/map,
retrieval/map, prior/tagging/precision@5, baseline/…, gamma_sweep/…), the same figures in
TensorBoard, a printed table, and pictures (PNG files and TensorBoard images).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from torchvision.utils import make_grid

from im2vec.data.datamodule import read_holdout
from im2vec.data.shards import expand_shards
from im2vec.errors import BadValue, NotFound, make
from im2vec.eval.heldout import (
    TrainedModel,
    check_shared_tags,
    embed_shards,
    gamma_sweep,
    noise_ids_for,
    score_model,
)
from im2vec.eval.metrics import noise_share
from im2vec.eval.ranking import (
    KS,
)
from im2vec.eval.validation import labelled_tile
from im2vec.eval.zeroshot import split_truths, unseen_figures
from im2vec.tags import PAD
from im2vec.train.checkpoint import load_model
from im2vec.use.visualness import read_tsv
from im2vec.wide.wordvec import read_vectors


def evaluate(cfg: DictConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    if not cfg.ckpt_path:
        raise BadValue("evaluate: no checkpoint given", "set ckpt_path=outputs/train/<time>/checkpoints/last.ckpt")
    model = load_model(cfg.ckpt_path)
    models = [model]
    if cfg.baseline_ckpt:
        base = load_model(cfg.baseline_ckpt)
        if base.tags != model.tags:
            raise BadValue("evaluate: baseline_ckpt was trained on another vocabulary",
                           "compare models of one vocabulary")
        models.append(base)
    data_cfg = cfg.get("data") or model.data  # data=…: the user's; else what the checkpoint was trained on
    if not data_cfg:
        raise BadValue(f"evaluate: {cfg.ckpt_path} records no data settings (written before checkpoints kept them)",
                       "say which data it was trained on: data=default (the built-in corpus) or data=shards "
                       "data.train_shards=… data.vocab_path=… (and shards=… for the held-out images)")
    if not cfg.get("data"):
        print(f"evaluate: the checkpoint's own data ({data_cfg.get('test_shards') or data_cfg.get('cache_dir')}); "
              "data=… or shards=… for other images", file=sys.stderr)
    datamodule = make(data_cfg)
    # the test split (uploaders seen neither in training nor where γ was chosen), else validation's
    shards = expand_shards(cfg.shards) if cfg.shards else datamodule.test_shards or datamodule.val_shards
    if not cfg.shards and not datamodule.test_shards and datamodule.val_shards:
        asked = data_cfg.get("test_shards")
        print(f"evaluate: {'data.test_shards matches no shard (' + repr(asked) + ')' if asked else 'no test split'}: "
              "scoring the validation split, where γ was chosen (its figures flatter the model)", file=sys.stderr)
    if not shards:
        raise NotFound("evaluate: no held-out shards", "set shards=…, data.test_shards=… or data.val_shards=…")
    noise_ids = noise_ids_for(model.tags, getattr(datamodule, "content_tags", None))
    image_size = cfg.image_size or model.image_size or datamodule.image_size
    if len(models) > 1 and (models[1].image_size or image_size) != image_size:
        raise BadValue(f"evaluate: baseline_ckpt was trained at {models[1].image_size} px, the model at "
                       f"{image_size} px", "both are scored on the same images: evaluate them separately")
    unseen, words, prior_counts = unseen_tags(cfg, model, datamodule)
    data = embed_shards(models, shards, image_size, cfg.batch_size, cfg.num_workers, cfg.max_images, cfg.device,
                        extra_tags=unseen)
    check_shared_tags(data, len(model.tags) + len(unseen), len(shards))
    truths_unseen = {}
    if unseen:  # the seen tags' figures below see only the vocabulary's tags
        data["obs"], truths_unseen[""] = split_truths(data["obs"], len(model.tags))
        data["clean"], truths_unseen["clean/"] = split_truths(data["clean"], len(model.tags))
    has_clean = bool((data["clean"] != PAD).any())
    clean = data["clean"] if has_clean else None
    if unseen and not bool((truths_unseen["clean/"] != PAD).any()):
        del truths_unseen["clean/"]
    queries = None
    if cfg.queries:
        index, names = model.index, [str(q) for q in cfg.queries]  # Hydra reads `2015` as a number
        missing = [q for q in names if q not in index]
        if missing:
            raise BadValue(f"evaluate: query tags not in the vocabulary: {missing[:5]}",
                           "query tags of this checkpoint")
        queries = torch.tensor([index[q] for q in names])
    gamma = model.gamma if cfg.gamma is None else float(cfg.gamma)
    t_scoring = time.perf_counter()
    metrics, top = score_model(data["u"][0], model.table, model.log_counts, gamma, data["obs"], clean, noise_ids,
                               queries, "", cfg.device)
    n = len(data["keys"])
    prior, prior_top = score_model(None, model.table, model.log_counts, 1.0, data["obs"], clean, noise_ids, queries,
                                   "prior/", cfg.device)
    metrics.update(prior)
    if len(models) > 1:
        b = models[1]
        bm, _ = score_model(data["u"][1], b.table, b.log_counts, b.gamma if cfg.gamma is None else gamma,
                            data["obs"], clean, noise_ids, queries, "baseline/", cfg.device)
        metrics.update(bm)
    if cfg.get("visual_tags"):  # python -m im2vec.visualness's file: the share of its visual tags in the top 5
        visual = visual_ids(cfg.visual_tags, model.index)
        metrics["tagging/visual_share@5"] = noise_share(top, visual, 5)
        metrics["prior/tagging/visual_share@5"] = noise_share(prior_top, visual, 5)
        metrics["info/visual_tags"] = float(len(visual))
    gammas = sorted(set(cfg.gammas) | {gamma})
    metrics.update(gamma_sweep(data["u"][0], model.table, model.log_counts, gammas, data["obs"], clean, noise_ids,
                               device=cfg.device))
    if len(models) > 1:
        metrics["info/baseline_gamma"] = models[1].gamma if cfg.gamma is None else gamma
    if unseen:
        zs = unseen_figures(data["u"][0], model.tag_map.proj.weight.detach(), words, prior_counts, truths_unseen,
                            cfg.seed, cfg.device)
        metrics.update({f"zeroshot/{k}": v for k, v in zs.items()})
        metrics["zeroshot/info/unseen_tags"] = float(len(unseen))
    metrics.update({"info/images": float(n), "info/tags": float(len(model.tags)), "info/gamma": gamma,
                    "info/skipped_images": float(data["skipped"]),
                    "info/scoring_seconds": time.perf_counter() - t_scoring,
                    "info/seconds": time.perf_counter() - t0})
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    pictures = make_pictures(model, data, top, prior_top, metrics, gammas, cfg.grid_images, cfg.query_pictures)
    for name, img in pictures.items():
        _save_png(img, out / f"{name}.png")
    _tensorboard(out, metrics, pictures)
    print(table(metrics, has_clean, len(models) > 1, gamma))
    if unseen:
        print(zero_shot_table(metrics, unseen))
    return metrics


def visual_ids(path: str, index: dict[str, int]) -> Tensor:
    """The vocabulary ids of the tags marked visual (1) in a file of ``python -m im2vec.visualness``."""
    if not Path(path).is_file():
        raise NotFound(f"evaluate: visual_tags file not found: {path}", "write it with python -m im2vec.visualness")
    ids = [index[r["tag"]] for r in read_tsv(path) if r.get("visual") == "1" and r["tag"] in index]
    if not ids:
        raise BadValue(f"evaluate: no tag of {path} is both visual and in the checkpoint's vocabulary",
                       "give the file written for this checkpoint (or its vocabulary)")
    return torch.tensor(sorted(ids), dtype=torch.long)


def unseen_tags(cfg: DictConfig, model: TrainedModel, datamodule) -> tuple[list[str], Tensor | None, Tensor | None]:
    """The tags to score zero-shot (zero_shot.unseen_tags, else those the checkpoint held out of training) that
    are outside its vocabulary and in the word-vector file, with their vectors w (n, d_w) and their counts in
    the data's vocabulary file (the prior's). ([], None, None) when there are none."""
    zs = cfg.get("zero_shot") or {}
    names = read_holdout(zs.get("unseen_tags")) if zs.get("unseen_tags") else list(model.holdout_tags)
    if not names:
        return [], None, None
    if model.tag_map is None:
        print(f"evaluate: {len(names)} unseen tag(s) but the checkpoint has no word vectors (train with "
              "model.tag_vectors=PATH): no unseen-tag figures", file=sys.stderr)
        return [], None, None
    trained = [t for t in names if t in model.index]
    names = [t for t in names if t not in model.index]
    path = zs.get("word_vectors") or model.tag_map.path
    wv = read_vectors(path, names) if names else None
    if trained or (wv is not None and wv.missing):
        print(f"evaluate: unseen tags left out: {len(trained)} in the checkpoint's vocabulary "
              f"{trained[:5]}, {len(wv.missing) if wv else 0} without a vector in {path} "
              f"{wv.missing[:5] if wv else []}", file=sys.stderr)
    if wv is None or not len(wv.rows):
        return [], None, None
    names = [names[i] for i in wv.rows.tolist()]
    vocab = datamodule.vocab
    counts = {**dict(zip(vocab.tags, vocab.counts.tolist())), **getattr(vocab, "held_out", {})}
    return names, wv.vectors, torch.tensor([float(counts.get(t, 1)) for t in names])


def zero_shot_table(m: dict, unseen: list[str]) -> str:
    """The unseen tags' figures beside the random-vector control and the frequency prior."""
    lines = [f"  unseen tags ({len(unseen)}: {', '.join(unseen[:6])}{', …' if len(unseen) > 6 else ''}), ranked "
             "among themselves by A·w" + " " * 2 + "".join(f"{c:>10s}" for c in ("model", "random w", "prior"))]
    for truth, title in (("", "observed"), ("clean/", "clean")):
        if f"zeroshot/{truth}precision@5" not in m:
            continue
        for r in ("precision@1", "precision@5", "recall@5", "map"):
            vals = [m.get(f"zeroshot/{p}{truth}{r}", math.nan) for p in ("", "random/", "prior/")]
            lines.append(f"    {title + ' ' + r:56s}" + "".join(f"{v:10.3f}" for v in vals))
    return "\n".join(lines)


# ---------------------------------------------------------------- the printed table
ROWS = [f"{m}@{k}" for m in ("precision", "recall", "f1") for k in KS] + ["map", "map_all_images"] + \
    [f"tag_{m}@5" for m in ("precision", "recall")]


def table(m: dict, has_clean: bool, has_baseline: bool, gamma: float) -> str:
    cols = [("model", ""), ("prior", "prior/")] + ([("baseline", "baseline/")] if has_baseline else [])
    lines = [f"held-out evaluation: {int(m['info/images'])} images, {int(m['info/tags'])} tags, "
             f"tagging score γ={gamma:g} ({m['info/seconds']:.1f} s, scoring {m['info/scoring_seconds']:.1f} s)"]
    sections = [("tagging (observed tags)", "tagging/", ROWS + ["noise_share@5"] +
                 (["visual_share@5"] if "tagging/visual_share@5" in m else []))]
    if has_clean:
        sections.append(("tagging (clean tags)", "tagging/clean/", ROWS))
    sections.append(("retrieval (observed tags)", "retrieval/", ["map", "precision@10", "queries"]))
    if has_clean:
        sections.append(("retrieval (clean tags)", "retrieval/clean/", ["map", "precision@10", "queries"]))
    for title, key, rows in sections:
        lines.append(f"  {title:30s}" + "".join(f"{c:>10s}" for c, _ in cols))
        for r in rows:
            vals = [m.get(f"{p}{key}{r}", math.nan) for _, p in cols]
            fmt = "{:10.0f}" if r == "queries" else "{:10.3f}"
            lines.append(f"    {r:28s}" + "".join(fmt.format(v) for v in vals))
    gammas = sorted({float(k.rsplit("/", 1)[1]) for k in m if k.startswith("gamma_sweep/precision@5/")})
    if gammas:
        names = [n for n in ("precision@5", "clean_precision@5", "noise_share@5")
                 if f"gamma_sweep/{n}/{gammas[0]:g}" in m]
        lines.append(f"  γ sweep of the model on these images (a diagnostic: the figures above use γ={gamma:g}, "
                     "the checkpoint's, chosen on validation, or gamma=)")
        lines.append("                    γ" + "".join(f"{n:>19s}" for n in names))
        for g in gammas:
            lines.append(f"{g:21.2f}" + "".join(f"{m[f'gamma_sweep/{n}/{g:g}']:19.3f}" for n in names))
    return "\n".join(lines)


# ---------------------------------------------------------------- pictures
def make_pictures(model: TrainedModel, data: dict, top: Tensor, prior_top: Tensor, m: dict, gammas: list[float],
                  grid_images: int, query_pictures: int) -> dict[str, Tensor]:
    """(3, H, W) float images: the top-5 grid, precision/recall@k, the γ sweep, retrieval examples."""
    obs, thumbs, tags = data["obs"], data["thumbs"], model.tags
    pics = {}
    tiles = []
    for i in range(min(grid_images, len(thumbs))):
        true = set(obs[i][obs[i] != PAD].tolist()) | set(data["clean"][i][data["clean"][i] != PAD].tolist())
        lines = [("* " if t in true else "  ") + tags[t][:18] for t in top[i, :5].tolist()]
        tiles.append(labelled_tile(thumbs[i], lines))
    if tiles:
        pics["top5_tags"] = make_grid(torch.stack(tiles), nrow=8, padding=2)
    pics["precision_recall_at_k"] = _plot_pr(m, "clean" if "tagging/clean/precision@5" in m else None)
    pics["gamma_sweep"] = _plot_gamma(m, gammas)
    # retrieval: the most frequent held-out query tags (clean ones where the corpus knows them), top images
    truth = data["clean"] if bool((data["clean"] != PAD).any()) else obs
    counts = torch.bincount(truth[truth != PAD], minlength=len(tags))
    rows = []
    for q in torch.argsort(counts, descending=True)[: min(query_pictures, int((counts > 0).sum()))].tolist():
        s = data["u"][0] @ model.table[q]
        best = torch.argsort(s, descending=True)[:8].tolist()
        rel = (truth[best] == q).any(1).tolist()
        rows += [labelled_tile(thumbs[i], [f"{'*' if r else ' '} {tags[q][:16]}", f"  #{j + 1}"], side=96)
                 for j, (i, r) in enumerate(zip(best, rel))]
    if rows:
        pics["retrieval"] = make_grid(torch.stack(rows), nrow=8, padding=2)
    return pics


def _figure_to_tensor(fig) -> Tensor:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255


def _plot_pr(m: dict, clean: str | None) -> Tensor:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, what in zip(axes, ("precision", "recall")):
        for prefix, style, label in (("", "-", "model"), ("prior/", "--", "prior"), ("baseline/", ":", "baseline")):
            for truth, marker in (("", "o"), ("clean/", "s")) if clean else (("", "o"),):
                ys = [m.get(f"{prefix}tagging/{truth}{what}@{k}") for k in KS]
                if ys[0] is not None:
                    ax.plot(KS, ys, style, marker=marker, label=f"{label}{' (clean tags)' if truth else ''}")
        ax.set_xlabel("k")
        ax.set_title(f"{what}@k")
        ax.set_xticks(KS)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return _figure_to_tensor(fig)


def _plot_gamma(m: dict, gammas: list[float]) -> Tensor:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, label in (("precision@5", "P@5 (observed)"), ("clean_precision@5", "P@5 (clean)"),
                        ("noise_share@5", "noise share@5")):
        ys = [m.get(f"gamma_sweep/{name}/{g:g}") for g in gammas]
        if ys[0] is not None:
            ax.plot(gammas, ys, marker="o", label=label)
    ax.set_xlabel("γ in s = v·u + γ·log count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _figure_to_tensor(fig)


def _save_png(img: Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray((img.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(path)


def _tensorboard(out: Path, metrics: dict, pictures: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as tb:
        for k, v in metrics.items():
            if not math.isnan(v):
                tb.add_scalar(k, v, 0)
        for name, img in pictures.items():
            tb.add_image(f"evaluate/{name}", img, 0)
