"""A trained model on held-out shards, beside the frequency prior: the figures training closes with
(``heldout_figures``) and evaluate.py builds on (``embed_shards``, ``score_model``, ``gamma_sweep``).
``TrainedModel`` is what a checkpoint holds for them: the encoder, the tag table, its counts and tags."""


from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from im2vec.data.loader import eval_loader
from im2vec.data.samples import SKIP_NO_TAG, SKIP_REASONS, normalize
from im2vec.data.shards import first_by_key
from im2vec.data.vocab import Vocabulary
from im2vec.deep.encoder import ImageEncoder
from im2vec.errors import BadValue, UserError
from im2vec.eval.metrics import noise_share, precision_at_k
from im2vec.eval.ranking import (
    KS,
    rank_prior,
    rank_tags,
    retrieval_metrics,
    tag_groups,
    tagging_metrics,
)
from im2vec.eval.scoring import topk_tags
from im2vec.eval.shard_heldout import shard_score_model, share_images
from im2vec.eval.validation import _cat_padded
from im2vec.tags import PAD
from im2vec.wide.tag_vectors import TagVectorMap


@dataclass
class TrainedModel:
    encoder: ImageEncoder  # in eval mode, on the CPU
    table: Tensor  # (V, d) tag vectors, fp32
    log_counts: Tensor  # (V,) log of each tag's training count
    tags: list[str]
    gamma: float  # the tagging score's γ: chosen on validation in training (else sampler.gamma)
    image_size: int | None  # None in checkpoints written before it was recorded
    fingerprint: str
    path: str
    tag_map: TagVectorMap | None = None  # model.tag_vectors: A and the tags' word vectors (table already includes A·w)
    holdout_tags: list[str] = field(default_factory=list)  # tags kept out of training (zero-shot evaluation)
    data: dict | None = None  # the data settings it was trained with (None in checkpoints before they were recorded)

    @property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tags)}


@torch.no_grad()
def embed_shards(models: list[TrainedModel], shards: list[str], image_size: int, batch_size: int, num_workers: int,
                 max_images: int | None, device: str = "cpu", thumb: int = 64, extra_tags: list[str] = ()) -> dict:
    """Every held-out image once: each model's vectors, the observed and clean tag ids (in the first
    model's vocabulary, followed by ``extra_tags``: unseen tags get ids from V on), keys, uploaders ("" where
    unknown), small thumbnails for pictures, and the skip counts."""
    vocab = Vocabulary(models[0].tags + list(extra_tags),
                       models[0].log_counts.exp().round().long().tolist() + [1] * len(extra_tags))
    # all of them, here
    loader = eval_loader(shards, vocab, image_size, batch_size, num_workers, max_images, rank=0, world_size=1)
    us, obs, clean, keys, users, thumbs = [[] for _ in models], [], [], [], [], []
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for m in models:
        m.encoder.to(device)
    for batch in loader:
        x = normalize(batch["image"].to(device))  # uint8 to the device, normalized there
        for m, u in zip(models, us):
            u.append(m.encoder(x).float().cpu())
        obs.append(batch["tags"])
        clean.append(batch["clean"])
        keys += batch["keys"]
        users += batch.get("users") or [""] * len(batch["keys"])
        thumbs.append(torch.nn.functional.interpolate(batch["image"].float(), size=(thumb, thumb), mode="area")
                      .round().to(torch.uint8))
        skipped += batch["skipped"]
    if not keys:
        check_shared_tags({"keys": keys, "skipped_by": skipped}, len(vocab), len(shards))
        raise BadValue(f"evaluate: no usable held-out image in {len(shards)} shard(s)",
                       "check that the shards are readable and belong to the checkpoint's vocabulary")
    keep = first_by_key(keys, max_images)  # the max_images smallest key hashes: the same for any loader settings
    return {"u": [torch.cat(u)[keep] for u in us], "obs": _cat_padded(obs)[keep], "clean": _cat_padded(clean)[keep],
            "keys": [keys[i] for i in keep.tolist()], "users": [users[i] for i in keep.tolist()],
            "thumbs": torch.cat(thumbs)[keep], "skipped": int(skipped.sum()),
            "skipped_by": skipped, "read": len(keys)}


def check_shared_tags(data: dict, num_tags: int, num_shards: int) -> None:
    """Refuse held-out images most of which share no tag with the checkpoint's vocabulary, in one line: they are
    another collection's (a checkpoint scored on the built-in corpus printed 0.000 for every figure)."""
    no_tag = int(data["skipped_by"][SKIP_NO_TAG])
    usable = data.get("read", len(data["keys"]))
    if no_tag > usable:
        raise BadValue(f"evaluate: {no_tag:,} of {no_tag + usable:,} held-out images in {num_shards} shard(s) share no "
                       f"tag with the checkpoint's {num_tags:,} tags", "are these the held-out images of the data it "
                       "was trained on? (leave data= and shards= out to score its own)")


def score_model(u: Tensor | None, table: Tensor, log_counts: Tensor, gamma: float, obs: Tensor, clean: Tensor | None,
                noise_ids: Tensor | None, queries: Tensor | None, prefix: str,
                device: str | torch.device | None = None) -> tuple[dict, Tensor]:
    """All tagging and retrieval metrics of one scorer -> (flat metrics, top-10 tag ids). ``u`` None is
    the frequency prior: s = log count(t) for every image, and every image ties in retrieval.
    Per-tag metrics are also given over the rarer half of the vocabulary (``tag_precision@5/rare``:
    the tags whose training count is at most the median count). The passes over the tags and the
    retrieval rankings run on ``device`` (default: the CPU), the table going there in chunks of rows."""
    rare = tag_groups(log_counts)
    truths = [obs] + ([clean] if clean is not None else [])
    if u is None:
        r = rank_prior(log_counts, truths, kmax=max(KS))
        u, table = torch.zeros(obs.shape[0], 1), torch.zeros(table.shape[0], 1)  # in retrieval every image ties
    else:
        r = rank_tags(u, table, log_counts, gamma, truths, kmax=max(KS), device=device)
    v = table.shape[0]
    m = tagging_metrics(r, 0, KS, noise_ids, v, prefix=f"{prefix}tagging/", groups=rare)
    if clean is not None:
        m.update(tagging_metrics(r, 1, KS, None, v, prefix=f"{prefix}tagging/clean/", groups=rare))
    m.update(retrieval_metrics(u, table, obs, queries, prefix=f"{prefix}retrieval/", device=device)[0])
    if clean is not None:
        m.update(retrieval_metrics(u, table, clean, queries, prefix=f"{prefix}retrieval/clean/", device=device)[0])
    return m, r.top_ids


def gamma_sweep(u: Tensor, table: Tensor, log_counts: Tensor, gammas: list[float], obs: Tensor, clean: Tensor | None,
                noise_ids: Tensor | None, k: int = 5, device: str | torch.device | None = None) -> dict[str, float]:
    """precision@k on observed and clean tags and the noise share of the top k, for each γ, from one
    pass of top-k lists over the table on ``device`` (default: the CPU; equal scores in torch.topk's
    order). topk_tags takes the images in batches: memory does not grow with N."""
    out = {}
    for g, (_, top) in topk_tags(u, table, log_counts, gammas, k, device=device).items():
        out[f"gamma_sweep/precision@{k}/{g:g}"] = precision_at_k(top, obs, k)
        if clean is not None:
            out[f"gamma_sweep/clean_precision@{k}/{g:g}"] = precision_at_k(top, clean, k)
        if noise_ids is not None:
            out[f"gamma_sweep/noise_share@{k}/{g:g}"] = noise_share(top, noise_ids, k)
    return out


@torch.no_grad()
def heldout_figures(encoder: torch.nn.Module, table: Tensor, log_counts: Tensor, tags: list[str], gamma: float,
                    shards: list[str], image_size: int, noise_ids: Tensor | None = None, gammas: list[float] = (),
                    batch_size: int = 256, num_workers: int = 0, max_images: int | None = None,
                    prefix: str = "test/", device: str | torch.device | None = None, group=None, rank: int = 0,
                    world: int = 1) -> dict[str, float]:
    """A trained encoder and table on held-out shards at ``gamma``, beside the frequency prior:
    training's closing test figures (``test/tagging/precision@5``, ``test/prior/tagging/map``, …) and
    the test γ sweep (``test/gamma_sweep/…``: a diagnostic, not a choice). At most ``max_images``
    images, chosen by key hash (YFCC's 1 % test split is a million photos: evaluate.py scores more).
    ``device``: where to embed and score (default: where the encoder is; Lightning moves the module to
    the CPU when ``fit`` ends, so training passes its root device). The table stays on the host and
    goes to the device a chunk of rows at a time.

    A table sharded over ``world`` ranks (every rank calls it, ``table`` its own rows: ids rank, rank + world, …):
    rank 0 embeds the images, every rank scores them against its rows (im2vec/eval/shard_heldout.py); the figures,
    one process's, on rank 0, {} elsewhere. The table is never assembled."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    model = TrainedModel(encoder.eval(), table.detach().float().cpu(), log_counts.float().cpu(), tags, gamma,
                         image_size, "", "")
    try:
        data = embed_shards([model], shards, image_size, batch_size, num_workers, max_images, str(device)) \
            if rank == 0 else None
    except UserError as e:
        if world == 1:
            raise
        data = e  # raised on every rank by share_images
    finally:
        encoder.train(was_training)
    if world > 1:
        data = share_images(data, group)
        clean = data["clean"] if bool((data["clean"] != PAD).any()) else None
        m = shard_score_model(data["u"][0], model.table, model.log_counts, gamma, sorted(set(gammas) | {gamma}),
                              data["obs"], clean, noise_ids, rank, world, group, device)
        return {} if m is None else _heldout_out(m, data, gamma, prefix)
    clean = data["clean"] if bool((data["clean"] != PAD).any()) else None
    m, _ = score_model(data["u"][0], model.table, model.log_counts, gamma, data["obs"], clean, noise_ids, None, "",
                       device)
    m.update(score_model(None, model.table, model.log_counts, 1.0, data["obs"], clean, noise_ids, None, "prior/",
                         device)[0])
    m.update(gamma_sweep(data["u"][0], model.table, model.log_counts, sorted(set(gammas) | {gamma}), data["obs"],
                         clean, noise_ids, device=device))
    return _heldout_out(m, data, gamma, prefix)


def _heldout_out(m: dict, data: dict, gamma: float, prefix: str) -> dict[str, float]:
    m.update({"images": float(len(data["keys"])), "skipped_images": float(data["skipped"]), "gamma": gamma})
    return {prefix + k: v for k, v in m.items()}


def noise_ids_for(tags: list[str], content: set[str] | None) -> Tensor | None:
    """Rows of the tags that are not content tags (None when the corpus names no content tags)."""
    if content is None:
        return None
    return torch.tensor([i for i, t in enumerate(tags) if t not in content], dtype=torch.long)


