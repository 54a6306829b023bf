"""Which tags a picture can show (tag visualness): per-tag held-out retrieval AP of the model against the prior's.

Most of YFCC's tags describe nothing in the picture (cameras, years, user names). For a tag t, rank every
held-out image by the model's score v_t·u (retrieval: γ does not change the order) and take the average
precision of that ranking against the images that carry t. The frequency prior gives every image the same
score for t: it knows nothing of the picture. A tag the model ranks no better than the prior does is one the
pictures do not show (or one the model has not learned to see).

Average precision here is the ranking AP, (1/p) Σ over the p images with the tag of the precision at that
image's own rank. Equal model scores of images with and without the tag are ranked pessimistically (the
images without it first). The prior ties every image, so its AP is the *expected* ranking AP under a uniformly
random order, exactly: (1/N)·[H_N + (p−1)/(N−1)·(N − H_N)] for p of N images (H_N the harmonic number).
That is what a model that knows nothing gets on average; it exceeds the base rate p/N (scikit-learn's AP of
all-equal scores, which takes the precision at the end of the tie group) by up to ~H_N/N for rare tags.

The bound: the held-out images are resampled with replacement (``resamples`` times, the same draws for every
tag, model and prior paired on each draw; a duplicated image is a tie of equal labels and its copies take
consecutive ranks) and ``lower`` is the ``alpha`` quantile of AP_model − AP_prior over the draws (draws
without an image of the tag are left out). A tag is visual when ``lower > threshold``. By default the draws
are over images; images of one uploader are not independent (one person's tags and subjects repeat), so
``by="uploaders"`` draws uploaders with all their images instead (a wider, more honest bound on held-out
sets of few uploaders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from im2vec.data.visual_file import COLUMNS, read_tsv  # noqa: F401 (the file's reader, re-exported)
from im2vec.tags import PAD

RESAMPLES = 200
ALPHA = 0.05  # the lower bound: the 5 % quantile of the bootstrap differences
MIN_IMAGES = 5
BY = ("images", "uploaders")  # what the bootstrap resamples


@dataclass
class TagRow:
    tag: str
    n_heldout: int
    n_train: int
    ap_model: float = math.nan  # NaN: no held-out image has the tag
    ap_prior: float = math.nan
    lower: float = math.nan  # NaN: fewer than min_images held-out images (not tested)
    visual: bool | None = None  # None: not tested

    @property
    def lift(self) -> float:
        return self.ap_model - self.ap_prior


def average_precision(scores: Tensor, rel: Tensor) -> float:
    """Ranking AP of one tag over N images (scores (N,), rel (N,) bool), equal scores ranked pessimistically."""
    order = _order(scores, rel)
    r = rel[order].double()
    prec = torch.cumsum(r, 0) / torch.arange(1, len(r) + 1, dtype=torch.float64)
    return float((prec * r).sum() / r.sum()) if r.sum() > 0 else math.nan


def prior_average_precision(p: Tensor | int, n: Tensor | int) -> Tensor:
    """The expected ranking AP of p relevant among n items in a uniformly random order (all scores equal):
    E[AP] = (1/n)·[H_n + (p−1)/(n−1)·(n − H_n)], elementwise; NaN where p = 0."""
    p, n = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(n, dtype=torch.float64)
    h = torch.special.digamma(n + 1) + 0.5772156649015329  # H_n
    frac = torch.where(n > 1, (p - 1) / (n - 1).clamp(min=1), torch.zeros_like(p))
    ap = (h + frac * (n - h)) / n
    return torch.where(p > 0, ap, torch.full_like(ap, math.nan))


def bootstrap_counts(n: int, resamples: int = RESAMPLES, seed: int = 0, groups: Tensor | None = None) -> Tensor:
    """(resamples, n) float: how many times each of n images is drawn in each resample. Without ``groups``, n
    images drawn with replacement; with ``groups`` (n,) (e.g. uploader ids 0..G-1), G groups drawn with
    replacement, each drawn group bringing all its images (the resample's size then varies)."""
    g = torch.Generator().manual_seed(seed)
    units = n if groups is None else int(groups.max()) + 1
    draws = torch.randint(units, (resamples, units), generator=g)
    drawn = torch.zeros(resamples, units, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, units, dtype=torch.float64))
    return drawn if groups is None else drawn[:, groups]


def group_ids(users: list[str], keys: list[str]) -> Tensor:
    """(N,) uploader ids numbered in the sorted order of their names (an image without one alone, by its key):
    the same ids whatever the images' order."""
    names = [u if u else f"\0{k}" for u, k in zip(users, keys)]
    ids = {name: j for j, name in enumerate(sorted(set(names)))}
    return torch.tensor([ids[x] for x in names], dtype=torch.long)


def resampled_average_precision(scores: Tensor, rel: Tensor, counts: Tensor) -> Tensor:
    """(R,) ranking AP of one tag on each resample (counts (R, N): copies of each image; the copies of one image
    tie with equal labels and take consecutive ranks); NaN where a resample has no image with the tag."""
    order = _order(scores, rel)
    c = counts[:, order]  # (R, N) in ranked order
    r = rel[order]
    before_all = torch.cumsum(c, 1) - c  # copies ranked before each image's first copy
    before_rel = torch.cumsum(c * r, 1) - c * r
    cp, mb, pb = c[:, r], before_all[:, r], before_rel[:, r]  # (R, p): the images with the tag only
    total = torch.zeros_like(cp)
    for k in range(1, int(cp.max()) + 1 if cp.numel() else 1):  # the k-th copy: precision (P_b + k)/(M_b + k)
        total += torch.where(cp >= k, (pb + k) / (mb + k), torch.zeros_like(cp))
    n_rel = cp.sum(1)
    return torch.where(n_rel > 0, total.sum(1) / n_rel.clamp(min=1), torch.full_like(n_rel, math.nan))


def _order(scores: Tensor, rel: Tensor) -> Tensor:
    """Images by score, best first; among equal scores those without the tag first (pessimistic)."""
    by_rel = torch.argsort(rel.long(), stable=True)  # without the tag first
    by_score = torch.argsort(scores[by_rel].double(), descending=True, stable=True)
    return by_rel[by_score]


def relevance(obs: Tensor, num_tags: int) -> Tensor:
    """(N, V) bool: image i carries tag t, from padded tag ids (N, L)."""
    rel = torch.zeros(obs.shape[0], num_tags + 1, dtype=torch.bool)
    ids = torch.where(obs == PAD, torch.full_like(obs, num_tags), obs)
    rel.scatter_(1, ids.long(), True)
    return rel[:, :num_tags]


@torch.no_grad()
def visualness(u: Tensor, table: Tensor, obs: Tensor, tags: list[str], n_train: list[int],
               min_images: int = MIN_IMAGES, threshold: float = 0.0, resamples: int = RESAMPLES,
               alpha: float = ALPHA, seed: int = 0, groups: Tensor | None = None) -> list[TagRow]:
    """Every tag of the vocabulary as a TagRow: those with at least ``min_images`` held-out images tested
    (AP of v_t·u over the N held-out images u (N, d) against the prior's, the bootstrap bound, visual when
    lower > threshold) first, by lower bound, best first; then the rest, not tested (visual None), by held-out
    then training count. ``obs`` (N, L): the held-out images' tag ids, PAD-padded. ``groups`` (N,): resample
    these groups (uploaders) with their images instead of single images."""
    u, table = u.float(), table.float()
    n = u.shape[0]
    rel = relevance(obs, len(tags))
    n_held = rel.sum(0)
    counts = bootstrap_counts(n, resamples, seed, groups)
    sizes = counts.sum(1)  # (R,) images in each resample
    tested, untested = [], []
    for t, name in enumerate(tags):
        row = TagRow(name, int(n_held[t]), int(n_train[t]))
        if row.n_heldout == 0:
            untested.append(row)
            continue
        s, r = u @ table[t], rel[:, t]
        row.ap_model = average_precision(s, r)
        row.ap_prior = float(prior_average_precision(row.n_heldout, n))
        if row.n_heldout < min_images:
            untested.append(row)
            continue
        boot_model = resampled_average_precision(s, r, counts)
        rel_boot = counts[:, r].sum(1)  # copies of images with the tag in each resample
        boot_prior = prior_average_precision(rel_boot, sizes)
        diff = boot_model - boot_prior
        diff = diff[~diff.isnan()]
        row.lower = float(torch.quantile(diff, alpha)) if diff.numel() else math.nan
        row.visual = bool(row.lower > threshold)
        tested.append(row)
    tested.sort(key=lambda x: (-x.lower, x.tag))
    untested.sort(key=lambda x: (-x.n_heldout, -x.n_train, x.tag))
    return tested + untested


def _fmt(x: float) -> str:
    return "NA" if math.isnan(x) else f"{x:.4f}"


def write_tsv(rows: list[TagRow], path: str | Path, header: list[str]) -> Path:
    """``# ``-prefixed header lines, the column names, one line per tag (visual 1/0, NA when not tested)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {h}" for h in header] + ["\t".join(COLUMNS)]
    for r in rows:
        vis = "NA" if r.visual is None else str(int(r.visual))
        lines.append("\t".join([r.tag, vis, _fmt(r.ap_model), _fmt(r.ap_prior), _fmt(r.lift), _fmt(r.lower),
                                str(r.n_heldout), str(r.n_train)]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def summary(rows: list[TagRow], min_images: int, threshold: float) -> str:
    tested = [r for r in rows if r.visual is not None]
    few = sum(1 for r in rows if r.visual is None and r.n_heldout > 0)
    none = sum(1 for r in rows if r.n_heldout == 0)
    vis = sum(1 for r in tested if r.visual)
    return (f"{len(rows):,} tags: {len(tested):,} tested (≥ {min_images} held-out images), {vis:,} visual "
            f"(lower bound > {threshold:g}), {len(tested) - vis:,} not; not tested (visual = NA): {few:,} with "
            f"1–{min_images - 1} held-out images, {none:,} with none")


def truth_figures(rows: list[TagRow], content: set[str]) -> dict[str, float]:
    """Precision and recall of "visual" against known truth (``content``: the tags that describe the picture,
    e.g. the corpus's clean tags; every other tag is noise). Recall over the tested clean tags, and over all
    clean tags of the vocabulary (an untested tag counts as not found)."""
    tested = [r for r in rows if r.visual is not None]
    found = [r for r in tested if r.visual]
    hits = sum(1 for r in found if r.tag in content)
    clean_tested = sum(1 for r in tested if r.tag in content)
    clean_all = sum(1 for r in rows if r.tag in content)
    return {"tested": len(tested), "visual": len(found), "clean_tested": clean_tested, "clean_all": clean_all,
            "true_positives": hits,
            "precision": hits / len(found) if found else math.nan,
            "recall": hits / clean_tested if clean_tested else math.nan,
            "recall_all": hits / clean_all if clean_all else math.nan}


def truth_line(f: dict[str, float], threshold: float) -> str:
    return (f"against the known truth (clean tags visual, the rest not), threshold {threshold:g}: "
            f"precision {f['precision']:.3f} ({f['true_positives']} of {f['visual']} visual tags are clean), "
            f"recall {f['recall']:.3f} of the {f['clean_tested']} tested clean tags "
            f"({f['recall_all']:.3f} of all {f['clean_all']} clean tags in the vocabulary)")


def from_checkpoint(ckpt: str, shards: list[str] | None = None, out: str | Path = "visual_tags.tsv",
                    min_images: int = MIN_IMAGES, threshold: float = 0.0, resamples: int = RESAMPLES,
                    alpha: float = ALPHA, seed: int = 0, truth: str | None = None, max_images: int | None = None,
                    batch_size: int = 256, num_workers: int = 1, device: str = "cpu", by: str = "images",
                    log=print, tensorboard: str | Path | None = "auto") -> dict:
    """The tool's work: ``ckpt`` on held-out ``shards`` (default: the checkpoint's own test split, else its
    validation split, as evaluate.py) -> the TSV at ``out``; returns {rows, summary, truth (figures or None)}.
    ``truth``: a file of the tags that describe the picture (one per line); default: the data's own content
    tags where it knows them (the built-in corpus). ``by``: resample "images" or "uploaders" (with their images)."""
    import sys

    if by not in BY:
        raise ValueError(f"by must be one of {BY}, not {by!r}")
    from im2vec.data.shards import expand_shards
    from im2vec.errors import BadValue, NotFound, make
    from im2vec.eval.heldout import check_shared_tags, embed_shards
    from im2vec.train.checkpoint import load_model

    model = load_model(ckpt)
    datamodule = None
    if not shards or truth is None:
        if model.data:
            datamodule = make(model.data)
        elif not shards:
            raise BadValue(f"visualness: {ckpt} records no data settings", "give the held-out shards")
    if shards:
        files = [f for s in shards for f in expand_shards(s)]
    else:
        files = datamodule.test_shards or datamodule.val_shards
        if not datamodule.test_shards:
            print("visualness: no test split: scoring the validation split", file=sys.stderr)
    if not files:
        raise NotFound("visualness: no held-out shards", "give them: python -m im2vec.visualness CKPT 'test-*.tar'")
    content = set(Path(truth).read_text(encoding="utf-8").split()) if truth else \
        getattr(datamodule, "content_tags", None)
    image_size = model.image_size or (datamodule.image_size if datamodule is not None else None)
    if image_size is None:
        raise BadValue(f"visualness: {ckpt} records no image size", "retrain with this version")
    data = embed_shards([model], files, image_size, batch_size, num_workers, max_images, device)
    check_shared_tags(data, len(model.tags), len(files))
    n_train = model.log_counts.exp().round().long().tolist()
    groups = group_ids(data["users"], data["keys"]) if by == "uploaders" else None
    rows = visualness(data["u"][0], model.table, data["obs"], model.tags, n_train, min_images, threshold,
                      resamples, alpha, seed, groups)
    n = len(data["keys"])
    header = [f"tag visualness of {ckpt}: held-out retrieval AP of v_t·u against the frequency prior's "
              f"(expected AP under a random order), on {n:,} images of {len(files)} shard(s)",
              f"threshold {threshold:g}: visual = 1 when lower > {threshold:g}; lower = the {alpha:g} quantile of "
              f"AP_model − AP_prior over {resamples} bootstrap resamples of the {by} (seed {seed}"
              + (f", {int(groups.max()) + 1} uploaders)" if groups is not None else ")"),
              f"tags with fewer than {min_images} held-out images: visual = NA (after the tested ones)"]
    write_tsv(rows, out, header)
    text = summary(rows, min_images, threshold)
    log(f"visualness: {text}")
    figures = None
    if content is not None:
        figures = truth_figures(rows, content)
        log(f"visualness: {truth_line(figures, threshold)}")
    log(f"visualness: wrote {out}")
    board = tensorboard_dir(ckpt) if tensorboard == "auto" else tensorboard
    if board:
        write_tensorboard(board, rows, text, figures, threshold)
        log(f"visualness: TensorBoard: tensorboard --logdir {board}")
    return {"rows": rows, "summary": text, "truth": figures, "images": n}


def tensorboard_dir(ckpt: str | Path) -> Path | None:
    """auto: ``visualness/`` in the run's TensorBoard folder (RUN/tensorboard beside RUN/checkpoints), else none."""
    board = Path(ckpt).resolve().parent.parent / "tensorboard"
    return board / "visualness" if board.is_dir() else None


def write_tensorboard(board: str | Path, rows: list[TagRow], text: str, figures: dict | None, threshold: float,
                      show: int = 30) -> None:
    """The file's figures where TensorBoard shows them: counts (and precision/recall against a known truth) as
    scalars, the bounds and lifts of the tested tags as histograms, the summary and the top and bottom ``show``
    tested tags as markdown tables (TEXT tab)."""
    from torch.utils.tensorboard import SummaryWriter

    tested = [r for r in rows if r.visual is not None]
    with SummaryWriter(str(board)) as tb:
        tb.add_scalar("visualness/tested", len(tested), 0)
        tb.add_scalar("visualness/visual", sum(1 for r in tested if r.visual), 0)
        if figures:
            for k in ("precision", "recall"):
                if not math.isnan(figures[k]):
                    tb.add_scalar(f"visualness/{k}", figures[k], 0)
        for name in ("lower", "lift"):
            xs = torch.tensor([getattr(r, name) for r in tested], dtype=torch.float64)
            if (xs := xs[~xs.isnan()]).numel():
                tb.add_histogram(f"visualness/{name}", xs, 0)
        tb.add_text("visualness/summary", f"{text}; threshold {threshold:g}", 0)

        def md(part: list[TagRow]) -> str:
            head = "| tag | visual | lower | lift | AP model | AP prior | held-out images |\n|---|---|---|---|---|---|---|\n"
            return head + "\n".join(f"| {r.tag} | {int(r.visual)} | {r.lower:.4f} | {r.lift:.4f} | {r.ap_model:.4f} | "
                                     f"{r.ap_prior:.4f} | {r.n_heldout} |" for r in part)

        tb.add_text("visualness/top", md(tested[:show]), 0)
        tb.add_text("visualness/bottom", md(tested[-show:][::-1]), 0)
