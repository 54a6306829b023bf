"""The plainest baseline: a dense multi-label CNN trained with binary cross-entropy over every tag.

    python -m im2vec.bench.dense +experiment=openclipart paths.data_dir=data split_kind=random seed=0

What a researcher would write instead of im2vec: the same trunk with a linear layer of V logits (and
biases) on its features, BCE against each image's multi-hot tags, AdamW; no tag table, no sampling,
no γ (a logit already carries its tag's prior through its bias). It takes ``train.py``'s own config,
so it runs at the recipe's budget: the same trunk and image size, the training split decoded once
into memory (``im2vec.data.memory``) with the same crops, flips, uploader balance and batches, AdamW with
the same learning rate, weight decay and warmup-cosine schedule. Its figures are the closing test
figures of ``train.py`` (same images, same metric code, beside the same prior): ``test/tagging/…``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from im2vec.data.memory import MemoryBatches, decode_split, uploader_weights
from im2vec.data.samples import normalize
from im2vec.deep.encoder import build_trunk
from im2vec.errors import BadValue, make, run_cli
from im2vec.eval.heldout import gamma_sweep, score_model
from im2vec.train.module import warmup_cosine
from im2vec.train.training import check_config, epochs_for_samples, schedule_length
from im2vec.wide.loss import multi_hot


class DenseTagger(nn.Module):
    """trunk features -> V logits (a weight row and a bias per tag)."""

    def __init__(self, trunk: str, num_tags: int, bias: bool = True, rank: int | None = None):
        super().__init__()
        self.trunk, width = build_trunk(trunk)
        # rank: logits through a (rank × F) projection first, im2vec's u = W·f and v_t·u in dense form
        self.proj = nn.Linear(width, rank, bias=False) if rank else nn.Identity()
        self.head = nn.Linear(rank or width, num_tags, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.trunk(x)))  # (B, V)

    def as_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (V, F+1), the bias folded in) so that features [f, 1] · rows = the logits: the scorers' form."""
        weight = self.head.weight @ self.proj.weight if isinstance(self.proj, nn.Linear) else self.head.weight
        bias = self.head.bias if self.head.bias is not None else weight.new_zeros(len(weight))
        return torch.cat([weight, bias.unsqueeze(1)], 1).detach()


class WithOne(nn.Module):
    """The trunk's features with a 1 appended: [f, 1] · [w_t, b_t] is tag t's logit, the scorers' u · v_t."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)  # (B, F)
        return torch.cat([f, torch.ones(len(f), 1, device=f.device, dtype=f.dtype)], 1)  # (B, F+1)


def train_dense(cfg: DictConfig) -> dict[str, float]:
    """Fit the dense tagger on cfg's training split, at cfg's budget; its test figures beside the prior."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    check_config(cfg)
    trunk_threads = (cfg.get("threads") or {}).get("trunk")
    if trunk_threads:  # threads.trunk, as train() takes it (two benchmarks side by side: 1 each)
        torch.set_num_threads(int(trunk_threads))
    dm = make(cfg.data)
    if not dm.test_shards:
        raise BadValue("dense: the data has no test split", "give data.test_shards")
    dm.resolve_epoch(1)
    data = decode_split(dm.train_shards, dm.vocab, dm.memory_side(), dm.num_workers, 0, 1, dm.max_pixels)
    t_fit = time.perf_counter()
    v, o = len(dm.vocab.tags), cfg.optim
    epochs = cfg.trainer.max_epochs
    if cfg.get("train_samples"):  # the recipe's budget in samples, as train() sizes it (training.size_by_samples)
        epochs = epochs_for_samples(cfg.train_samples, dm.batches_per_epoch * dm.batch_size)
        with open_dict(cfg):
            cfg.trainer.max_epochs = epochs
    # diagnostics: +dense_bias=false (no per-tag bias), +dense_rank=64 (the logits through a rank-64 projection)
    model = DenseTagger(cfg.model.trunk, v, bias=bool(cfg.get("dense_bias", True)), rank=cfg.get("dense_rank"))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}], lr=o.lr)
    total = schedule_length(cfg, dm.batches_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(o.warmup_batches, total, o.min_lr_ratio))
    weights = uploader_weights(data, dm.user_uses)
    model.train()
    for epoch in range(epochs):
        for batch in MemoryBatches(data, dm.batch_size, dm.batches_per_epoch, dm.image_size, dm.min_scale,
                                   cfg.seed * 100003 + epoch, weights):
            logits = model(normalize(batch["image"]))  # (B, V)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, multi_hot(batch["tags"], v),
                                                                  reduction="sum") / len(logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - t_fit
    return {**test_figures(model, dm, list(cfg.validation.val_gammas)), "info/seconds": time.perf_counter() - t0,
            "info/train_seconds": train_seconds}


@torch.no_grad()
def test_figures(model: DenseTagger, dm, gammas: list[float]) -> dict[str, float]:
    """The test split scored by the logits (γ = 0: the bias is the prior), with the prior and a γ sweep
    (an added γ·log count on top of the logits, a diagnostic) from the same metric code as training's."""
    from im2vec.eval.heldout import embed_shards
    from im2vec.train.checkpoint import TrainedModel

    model.eval()
    table, log_counts = model.as_table(), dm.vocab.counts.float().log()
    holder = TrainedModel(WithOne(model.trunk), table, log_counts, dm.vocab.tags, 0.0, dm.image_size, "", "")
    data = embed_shards([holder], dm.test_shards, dm.image_size, dm.val_batch_size, dm.num_workers, dm.val_max_images)
    clean = data["clean"] if bool((data["clean"] >= 0).any()) else None
    m, _ = score_model(data["u"][0], table, log_counts, 0.0, data["obs"], clean, dm.noise_ids, None, "")
    m.update(score_model(None, table, log_counts, 1.0, data["obs"], clean, dm.noise_ids, None, "prior/")[0])
    m.update(gamma_sweep(data["u"][0], table, log_counts, sorted(set(gammas) | {0.0}), data["obs"], clean,
                         dm.noise_ids))
    m.update({"images": float(len(data["keys"])), "gamma": 0.0})
    return {f"test/{k}": v for k, v in m.items()}


def main(argv: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(str(root), version_base="1.3"):
        cfg = compose("train", overrides=[a for a in argv if not a.startswith("--out=")] + ["paths.output_dir=."])
    metrics = train_dense(cfg)
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
    if out:
        Path(out).write_text(json.dumps(metrics, indent=1, sort_keys=True))
    for k in ("precision@1", "precision@5", "recall@10", "map"):
        print(f"  {k:14s} {metrics[f'test/tagging/{k}']:.3f}   prior {metrics[f'test/prior/tagging/{k}']:.3f}")
    print(f"  {metrics['info/seconds']:.0f} s ({metrics['info/train_seconds']:.0f} s training)")
    return metrics


if __name__ == "__main__":
    run_cli(main)
