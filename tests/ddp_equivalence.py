"""A few real training steps of Im2VecModule under Lightning DDP (W CPU processes, gloo) or in one process
on the ranks' batches concatenated, with the same drawn ids; each run saves its trunk and whole table.

    python tests/ddp_equivalence.py --world 2 --out DIR      # Lightning launches rank 1 itself
    python tests/ddp_equivalence.py --world 2 --out DIR --reference

tests/test_ddp_train.py compares the two. The trunk has no batch norm (its statistics are per rank).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from im2vec.train.module import Im2VecModule, OptimConfig
from im2vec.wide.head import SamplerConfig, draw_ids
from im2vec.wide.sharded_table import ROW_STATE, rank_seed
from im2vec.wide.tag_head import TagHead
from im2vec.wide.tag_vectors import TagVectorMap

V, D, B, T, SIDE, STEPS, SEED = 97, 16, 6, 4, 16, 4, 3
warnings.filterwarnings("ignore")


class TinyTrunk(nn.Module):
    """conv → ReLU → global mean → linear: no batch norm, no dropout."""

    def __init__(self, dim: int = D):
        super().__init__()
        self.conv, self.proj, self.dim, self.spec = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, dim), dim, {}

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)).mean((2, 3)))


def batch(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    tags = torch.randint(0, V, (B, T), generator=g)
    tags[:, T - 1] = -1  # padded slots, as the loader's collate makes them
    return {"image": torch.randint(0, 256, (B, 3, SIDE, SIDE), dtype=torch.uint8, generator=g), "tags": tags,
            "skipped": torch.zeros(5, dtype=torch.long)}


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, ranks: list[int]):
        self.ranks = ranks

    def __iter__(self):
        for t in range(STEPS):
            parts = [batch(t, r) for r in self.ranks]
            yield {"image": torch.cat([p["image"] for p in parts]), "tags": torch.cat([p["tags"] for p in parts]),
                   "skipped": parts[0]["skipped"]}


class Data(pl.LightningDataModule):
    def __init__(self, world: int, reference: bool):
        super().__init__()
        self.world, self.reference = world, reference

    def train_dataloader(self):
        ranks = list(range(self.world)) if self.reference else [self.trainer.global_rank]
        return torch.utils.data.DataLoader(Batches(ranks), batch_size=None)


class ConcatenatedHead(TagHead):
    """Each step's ids drawn chunk by chunk with the generator each rank would use (an own ``draw``: the head
    then gathers its rows on the step's thread, as the sharded head does)."""

    def draw(self, tags):
        parts = [draw_ids(self.cfg, self.pos_sampler, self.neg_sampler, tags[r * B:(r + 1) * B], g)
                 for r, g in enumerate(self.gens)]
        return tuple(torch.cat(x) for x in zip(*parts))


class ConcatenatedRanks(Im2VecModule):
    """One process, the ranks' batches side by side."""
    head_class = ConcatenatedHead

    def __init__(self, world: int, **kw):
        super().__init__(**kw)
        self.head.gens = [torch.Generator().manual_seed(rank_seed(SEED, r)) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--table-optimizer", default="sparse_adam")
    ap.add_argument("--tag-vectors", action="store_true", help="v = r + A·w for a third of the tags")
    a = ap.parse_args()
    pl.seed_everything(SEED)
    counts = torch.randint(1, 100, (V,), generator=torch.Generator().manual_seed(0))
    kw = dict(encoder=TinyTrunk(), tags=[f"t{i}" for i in range(V)], counts=counts, total_batches=STEPS,
              sampler=SamplerConfig(num_negatives=5, num_positives=2), seed=SEED, projector_tags=0, grid_images=0,
              optim=OptimConfig(warmup_batches=2, table_optimizer=a.table_optimizer, table_lr=0.05))
    if a.tag_vectors:  # the same map on every rank and in the reference (A synced by DDP, the w replicated)
        g = torch.Generator().manual_seed(5)
        kw["tag_map"] = TagVectorMap(V, D, torch.arange(0, V, 3), torch.randn(len(range(0, V, 3)), 7, generator=g),
                                     init_std=0.2)
    module = ConcatenatedRanks(a.world, **kw) if a.reference else Im2VecModule(**kw)
    strategy = "auto" if a.reference else pl.strategies.DDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=1 if a.reference else a.world, strategy=strategy,
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         use_distributed_sampler=False, callbacks=[Save(a.out, a.reference)])
    trainer.fit(module, datamodule=Data(a.world, a.reference))


class Save(pl.Callback):
    def __init__(self, out: str, reference: bool):
        self.out, self.reference = Path(out), reference

    def on_train_end(self, trainer, module):
        opt = module.optimizers()[1].optimizer
        state = opt.state[module.table.weight]
        whole = {"table": module.full_table()}  # the tag vectors (r + A·w with --tag-vectors)
        if module.tag_map is not None:
            whole["A"] = module.tag_map.proj.weight.detach().clone()
        for k, v in state.items():
            if k in ROW_STATE:
                whole[k] = module.table.assemble(v) if module.sharded else v.clone()
            elif k == "step":
                whole[k] = torch.tensor(float(v))
        name = "reference.pt" if self.reference else f"rank{trainer.global_rank}.pt"
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"trunk": {k: v.detach().cpu() for k, v in module.encoder.state_dict().items()},
                    "whole": whole if trainer.global_rank == 0 else None,
                    "batches": trainer.fit_loop.epoch_loop._batches_that_stepped}, self.out / name)


if __name__ == "__main__":
    main()
