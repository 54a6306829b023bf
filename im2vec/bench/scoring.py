"""Scoring benchmark: evaluation's full-vocabulary pass at YFCC scale, on random vectors.

    python -m im2vec.bench.scoring                       # 10k images, V = 600k, d = 256
    python -m im2vec.bench.scoring --images 2000 --tags 100000
    python -m im2vec.bench.scoring --device cuda          # the passes on a GPU, the table staying in host memory

Times what evaluate.py does per scorer: the chunked pass over all V tags (top 10, and for every
true tag how many tags score above it), the tagging metrics, and retrieval over every query tag;
and validation's pass (the top 10 of every γ of a 14-value sweep).
"""

from __future__ import annotations

import time

import torch

from im2vec.errors import ArgumentParser, run_cli
from im2vec.eval.ranking import rank_tags, retrieval_metrics, tagging_metrics
from im2vec.eval.scoring import topk_tags


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.scoring", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--tags", type=int, default=600_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--true-tags", type=int, default=8, help="true tags per image")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where the passes run (the table stays in host memory)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(a.images, a.dim, generator=g)
    table = torch.randn(a.tags, a.dim, generator=g) * 0.1
    log_counts = torch.log(torch.randint(1, 100_000, (a.tags,), generator=g).float())
    truth = torch.randint(0, a.tags, (a.images, a.true_tags), generator=g)
    t0 = time.perf_counter()
    r = rank_tags(u, table, log_counts, 1.0, [truth], kmax=10, device=a.device)
    t1 = time.perf_counter()
    tagging_metrics(r, 0, num_tags=a.tags)
    t2 = time.perf_counter()
    rm, _, _ = retrieval_metrics(u, table, truth, device=a.device)
    t3 = time.perf_counter()
    gammas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]  # configs/train.yaml's
    topk_tags(u, table, log_counts, gammas, 10, device=a.device)
    t4 = time.perf_counter()
    out = {"images": a.images, "tags": a.tags, "dim": a.dim, "threads": torch.get_num_threads(), "device": a.device,
           "tagging_pass_s": t1 - t0, "tagging_metrics_s": t2 - t1, "retrieval_s": t3 - t2,
           "queries": rm["queries"], "total_s": t3 - t0, "validation_pass_s": t4 - t3}
    print(f"{a.images:,} images × {a.tags:,} tags, d = {a.dim}, {out['threads']} threads, on {a.device}: "
          f"tagging pass {out['tagging_pass_s']:.1f} s, tagging metrics {out['tagging_metrics_s']:.1f} s, "
          f"retrieval over {int(rm['queries']):,} query tags {out['retrieval_s']:.1f} s; total {out['total_s']:.1f} s; "
          f"validation's pass ({len(gammas)} γ) {out['validation_pass_s']:.1f} s")
    return out


if __name__ == "__main__":
    run_cli(main)
