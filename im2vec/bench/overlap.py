"""The overlapped step against the serial one, on the CPU: the trunk on one thread, the table's work
(draw, dedup, gather of the next step; update of this one) on the other core.

    python -m im2vec.bench.overlap                       # V = 600k, d = 256, B = 64, small_cnn at 64 px
    python -m im2vec.bench.overlap --negatives 20,200 --steps 30 --json overlap.json

For each K it runs, in one process and interleaved (trunk, head, serial, overlap, then again), four
Lightning fits of the real ``Im2VecModule`` on in-memory batches:

- **trunk**: the trunk's step alone (forward, backward, clipping, AdamW; a loss on u, no tag head);
- **head**: the tag head alone (draw, dedup, gather, score, backward, SparseAdam) behind a trunk
  that costs nothing (a pooled 3-vector and the projection);
- **serial**: the whole step, the table's work inline (``optim.overlap=false``);
- **overlap**: the whole step with the table's work on the worker thread (``optim.overlap=true``).

A figure is the mean time per batch over ``--steps`` batches after ``--warmup``, the better of the
two rounds. The goal: overlap ≤ 1.1 × max(trunk, head). The head has two parts: the **table side**
(draw, dedup, gather, update: what the worker thread takes; the serial run's logged timings) and
the scores, loss and their backward on the rows, which run where the trunk runs (on a GPU, there;
here, on the trunk's core). The JSON also has "hidden": (serial − overlap) / table side. torch uses one thread (the trunk's), the
table's kernels one (``set_table_threads(1)``): on a 2-core machine each side has a core.
"""

from __future__ import annotations

import argparse
import json
import time

import pytorch_lightning as pl
import torch
from torch import nn

from im2vec.errors import ArgumentParser, run_cli

GOAL = 1.1


class BatchClock(pl.Callback):
    """Times batches warmup..end from batch start to batch start (an overlapped update is counted in the
    batch that waits for it)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.n = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx == self.warmup:
            self.start = now
        elif batch_idx > self.warmup:
            self.end, self.n = now, batch_idx - self.warmup


class _NoTrunk(nn.Module):
    """A trunk that costs nothing: the image's mean colour, projected."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(3, dim, bias=False)
        self.dim, self.spec = dim, {"trunk": "none", "dim": dim}

    def forward(self, x):
        return self.proj(x.mean((2, 3)))


def _batches(n: int, batch: int, size: int, tags: int, per_image: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, tags + 1, dtype=torch.float64)  # Zipf: count ∝ 1/rank
    out = []
    for _ in range(n):
        t = torch.multinomial(p, batch * per_image, replacement=True, generator=g).view(batch, per_image)
        out.append({"image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
                    "tags": t, "clean": t[:, :1].clone(), "skipped": torch.zeros(5, dtype=torch.long),
                    "keys": [str(i) for i in range(batch)]})
    return out


def run_case(kind: str, args, negatives: int, counts: torch.Tensor, batches: list[dict]) -> float:
    """(ms per batch, the table side's ms per batch as the module logged it) of one case (``trunk``, ``head``,
    ``serial``, ``overlap``)."""
    from im2vec.bench.trunk_only import TrunkOnly
    from im2vec.deep.encoder import ImageEncoder
    from im2vec.train.module import Im2VecModule, OptimConfig
    from im2vec.wide.head import SamplerConfig

    cls = TrunkOnly if kind == "trunk" else Im2VecModule
    encoder = _NoTrunk(args.dim) if kind == "head" else ImageEncoder(args.trunk, args.dim)
    module = cls(encoder, [str(i) for i in range(args.tags)], counts, len(batches),
                 SamplerConfig(num_negatives=negatives), OptimConfig(overlap=kind == "overlap", warmup_batches=1),
                 image_size=args.image_size)
    clock = BatchClock(args.warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[clock], log_every_n_steps=max(1, args.steps // 2))
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    m = trainer.callback_metrics  # the module's own averages over the last log interval (steady state)
    table_side = float(m.get("train/table_prepare_ms", 0.0)) + float(m.get("train/table_update_ms", 0.0))
    return (clock.end - clock.start) / clock.n * 1e3, table_side


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.overlap", description=__doc__.split("\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", type=int, default=600_000, help="vocabulary size V")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--negatives", default="20,200", help="K per image, comma-separated: one row of figures each")
    ap.add_argument("--tags-per-image", type=int, default=8)
    ap.add_argument("--trunk", default="small_cnn")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="timed batches per case")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="each case runs this many times, interleaved; best kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from im2vec.wide.sparse_optim import set_table_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trunk: one thread; the table's worker thread runs on the other core
    set_table_threads(1)
    try:
        counts = (1e6 / torch.arange(1, args.tags + 1, dtype=torch.float64)).round().clamp_min(1)
        batches = _batches(args.warmup + args.steps + 1, args.batch, args.image_size, args.tags,
                           args.tags_per_image, seed=0)
        rows = []
        for k in (int(x) for x in args.negatives.split(",")):
            times = {c: [] for c in ("trunk", "head", "serial", "overlap")}
            table_side = []
            for _ in range(args.rounds):
                for case in times:
                    ms, side = run_case(case, args, k, counts, batches)
                    times[case].append(ms)
                    if case == "serial":
                        table_side.append(side)
            best = {c: min(v) for c, v in times.items()}
            bound = max(best["trunk"], best["head"])
            side = min(table_side)  # draw, dedup, gather, update: what the worker thread can take
            rows.append({"K": k, **{f"{c}_ms": round(v, 2) for c, v in best.items()},
                         "table_side_ms": round(side, 2),
                         "overlap_vs_bound": round(best["overlap"] / bound, 3),
                         "serial_vs_overlap": round(best["serial"] / best["overlap"], 3),
                         # of the table side, the share the overlap took off the step
                         "hidden": round((best["serial"] - best["overlap"]) / side, 3) if side else float("nan"),
                         "met": best["overlap"] <= GOAL * bound})
    finally:
        torch.set_num_threads(threads)
        set_table_threads(None)
    report = {"V": args.tags, "d": args.dim, "B": args.batch, "trunk": args.trunk, "image_size": args.image_size,
              "steps": args.steps, "rows": rows, "goal": f"overlap ≤ {GOAL} × max(trunk, head)"}
    print(f"V = {args.tags:,}, d = {args.dim}, B = {args.batch}, {args.trunk} at {args.image_size} px, "
          f"{args.tags_per_image} tags per image; ms per batch, the better of {args.rounds} rounds\n")
    print("| K | trunk alone | head alone | of which table side | serial | overlap | serial / overlap "
          "| overlap / max(trunk, head) | goal ≤ 1.1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['trunk_ms']:.1f} | {r['head_ms']:.1f} | {r['table_side_ms']:.1f} | {r['serial_ms']:.1f} "
              f"| {r['overlap_ms']:.1f} | {r['serial_vs_overlap']:.2f} "
              f"| {r['overlap_vs_bound']:.2f} | {'met' if r['met'] else 'not met'} |")
    print("\ntable side: draw, dedup, gather and update, the work the worker thread takes (the serial run's own "
          "timings); the rest of the head (scores, loss and their backward on the rows) runs where the trunk runs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    run_cli(main)
