"""Sharded tag-table benchmark: the row exchange of ``ShardedTagTable`` at W = 1, 2, 4 CPU ranks.

    python -m im2vec.bench.dist                          # V = 600k, d = 256, B = 256, K = 20, W = 1,2,4
    python -m im2vec.bench.dist --worlds 1,2 --optimizer row_adagrad --json dist.json

For each W, W processes are spawned (gloo over 127.0.0.1, max(1, cores // W) torch threads each). Every
rank builds only its own shard (``full=None``: it draws its rows itself) of a V×d table with Zipf counts
(count ∝ 1/rank) and the table optimizer, then runs the training step's tag head: an image batch's tags
(``--tags-per-image`` drawn ∝ count; the data loader's part, not timed), a random u (B, d), and, timed,
``draw_ids`` (P = 1, K negatives, a (seed, rank) generator), ``sampled_loss`` (its ``gather`` fetches the
rows from their owners), backward, ``reduce_grads`` (the row gradients back to their owners) and the
optimizer step. After ``--warmup`` steps, ``--steps`` are timed. Per rank and step:

- **bytes** sent and received, and **exchange ms**: the deltas of ``table.stats`` (the exchange time is
  the ``all_to_all_single`` calls, waiting for the slowest rank included);
- **step ms**: the whole head step above; means over ranks, and the slowest rank's;
- **distinct ids**: of the rank's batch (what ``gather`` fetches), and how many each rank owns;
- **table + state**: bytes of the shard and of every tensor in the optimizer state (after warm-up),
  beside V·d·4·(1+s)/W, s = 2 for the Adam variants (lazy_adam's int32 row steps come on top), 1/d for
  row_adagrad.

Projection to W = 8, 64: bytes per rank ∝ n·(W−1)/W (n distinct ids per rank, independent of W), scaled
from each measured W > 1; table + state V·d·4·(1+s)/W. Goals: bytes per rank flat in W (W=4 / W=2
≤ 1.2), table + state within 1.1× of the prediction, exchange ≤ 25 % of the head step at W = 4.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

import torch

from im2vec.bench.head_cases import zipf_counts
from im2vec.bench.machine import GiB, machine, meminfo
from im2vec.errors import ArgumentParser, run_cli
from im2vec.wide.sharded_table import rank_seed

OPTIMIZERS = ("sparse_adam", "lazy_adam", "row_adagrad")
FLAT_GOAL, MEMORY_GOAL, SHARE_GOAL = 1.2, 1.1, 0.25
PROJECT_TO = (8, 64)
MB = 1e6


def state_per_weight(optimizer: str, d: int) -> float:
    """s in V·d·4·(1+s): optimizer state per table weight."""
    return 1.0 / d if optimizer == "row_adagrad" else 2.0


def predicted_bytes(v: int, d: int, optimizer: str, world: int) -> float:
    return v * d * 4 * (1 + state_per_weight(optimizer, d)) / world


def image_tags(tag_sampler, b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) tag ids drawn ∝ count, distinct within a row, PAD (-1) last (im2vec.bench.head_cases.batch_tags
    with the sampler built once)."""
    from im2vec.wide.sampler import PAD

    ids, _ = tag_sampler.sample((b, t), gen).sort(1)
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return torch.where(dup, torch.full_like(ids, PAD), ids).sort(1, descending=True).values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- one rank, in its own process
def worker(rank: int, case: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from im2vec.wide.allocator import tune_malloc
    from im2vec.wide.head import SamplerConfig, draw_ids, sampled_loss
    from im2vec.wide.sampler import NegativeSampler, PositiveSampler
    from im2vec.wide.sharded_table import ShardedTagTable, exchange_group
    from im2vec.wide.sparse_optim import make_table_optimizer

    tune_malloc()  # as training does
    w, v, d, b = case["W"], case["V"], case["d"], case["B"]
    torch.set_num_threads(case["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{case['port']}", rank=rank, world_size=w)
    try:
        group = exchange_group(600.0)
        torch.manual_seed(rank_seed(case["seed"], rank))  # the shard's own rows (normal_)
        gen = torch.Generator().manual_seed(rank_seed(case["seed"], rank))
        counts = zipf_counts(v)
        cfg = SamplerConfig(num_negatives=case["K"], num_positives=1)
        pos_sampler, neg_sampler = PositiveSampler(counts, cfg.beta), NegativeSampler(counts, cfg.alpha)
        tag_sampler = NegativeSampler(counts, alpha=1.0)
        table = ShardedTagTable(counts, d, 0.01, rank, w, group, full=None)
        opt = make_table_optimizer(case["optimizer"], [table.weight], lr=0.01)

        step_s, distinct, owners = [], 0, torch.zeros(w, dtype=torch.long)
        for i in range(case["warmup"] + case["steps"]):
            if i == case["warmup"]:
                dist.barrier(group)
                before = dict(table.stats)
            tags = image_tags(tag_sampler, b, case["tags_per_image"], gen)  # the data loader's part
            u = torch.randn(b, d, generator=gen).mul_(0.1).requires_grad_()
            t0 = time.perf_counter()
            pos, neg, weight = draw_ids(cfg, pos_sampler, neg_sampler, tags, gen)
            loss = sampled_loss(cfg, table, u, pos, neg, weight)[0]
            loss.backward()
            table.reduce_grads()
            opt.step()
            t1 = time.perf_counter()
            if i >= case["warmup"]:
                step_s.append(t1 - t0)
                uniq = torch.cat([pos.flatten(), neg.flatten()]).unique()  # what gather fetched, counted apart
                distinct += uniq.numel()
                owners += torch.bincount(uniq % w, minlength=w)
        after = dict(table.stats)
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        state_bytes = {k: t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                       if isinstance(t, torch.Tensor)}
        weight_bytes = table.weight.numel() * table.weight.element_size()
        result = {
            "rank": rank, "rows": table.weight.shape[0],
            "bytes_sent": after["bytes_sent"] - before["bytes_sent"],
            "bytes_received": after["bytes_received"] - before["bytes_received"],
            "exchange_s": after["exchange_s"] - before["exchange_s"],
            "step_s": step_s, "distinct_ids": distinct, "owner_counts": owners.tolist(),
            "weight_bytes": weight_bytes, "state_bytes": state_bytes,
            "table_bytes": weight_bytes + sum(t.numel() * t.element_size() for t in state),
            "rss_bytes": meminfo("VmRSS"), "peak_rss_bytes": meminfo("VmHWM"),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier(group)
    finally:
        dist.destroy_process_group()


def run_world(case: dict) -> dict:
    """Spawn the W ranks of one case; -> its per-rank results and their means."""
    import torch.multiprocessing as mp

    w = case["W"]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mp.start_processes(worker, args=({**case, "port": free_port()}, tmp), nprocs=w, join=True,
                           start_method="spawn")
        seconds = time.perf_counter() - t
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(w)]
    s = case["steps"]

    def mean(key: str) -> float:
        return sum(r[key] for r in ranks) / w

    step_ms = [sum(r["step_s"]) / s * 1e3 for r in ranks]
    predicted = predicted_bytes(case["V"], case["d"], case["optimizer"], w)
    out = {
        "distinct_ids": mean("distinct_ids") / s,
        "sent_bytes": mean("bytes_sent") / s, "received_bytes": mean("bytes_received") / s,
        "exchange_ms": mean("exchange_s") / s * 1e3,
        "step_ms": sum(step_ms) / w, "step_ms_max": max(step_ms),
        "table_bytes": mean("table_bytes"), "table_bytes_max": max(r["table_bytes"] for r in ranks),
        "predicted_bytes": predicted, "seconds": seconds,
    }
    out["exchange_share"] = out["exchange_ms"] / out["step_ms"]
    out["memory_ratio"] = out["table_bytes_max"] / predicted
    return {**case, **out, "ranks": ranks}


# ---------------------------------------------------------------- projection, goals, table
def project(results: list[dict], a) -> list[dict]:
    """Bytes per rank at W = 8, 64 from each measured W > 1: bytes / ((W−1)/W) · (W'−1)/W'."""
    rows = []
    for r in results:
        if r["W"] < 2 or "sent_bytes" not in r:
            continue
        frac = (r["W"] - 1) / r["W"]
        for w in PROJECT_TO:
            f = (w - 1) / w
            rows.append({"W": w, "from_W": r["W"], "distinct_ids": r["distinct_ids"],
                         "sent_bytes": r["sent_bytes"] / frac * f, "received_bytes": r["received_bytes"] / frac * f,
                         "predicted_bytes": predicted_bytes(a.tags, a.dim, a.optimizer, w)})
    return rows


def goals(results: list[dict]) -> list[dict]:
    by_w = {r["W"]: r for r in results if "sent_bytes" in r}
    out = []

    def add(name: str, target: str, ratio: float | None, met: bool, detail: str, percent: bool = False) -> None:
        out.append({"goal": name, "target": target, "ratio": ratio, "met": met, "detail": detail, "percent": percent})

    if 2 in by_w and 4 in by_w:
        lo, hi = by_w[2]["sent_bytes"], by_w[4]["sent_bytes"]
        scaled = (hi / (3 / 4)) / (lo / (1 / 2))  # n·(W−1)/W predicts 1.5×; this ratio is 1 if bytes ∝ (W−1)/W
        add("bytes per rank per step flat in W", f"≤ {FLAT_GOAL}×", hi / lo, hi / lo <= FLAT_GOAL,
            f"W=4 {hi / MB:.2f} MB / W=2 {lo / MB:.2f} MB sent; n·(W−1)/W predicts 1.5×, "
            f"measured / predicted {scaled:.3f}")
    else:
        add("bytes per rank per step flat in W", f"≤ {FLAT_GOAL}×", None, False, "needs W=2 and W=4")
    for w, r in sorted(by_w.items()):
        ratio = r["memory_ratio"]
        add(f"table + state per rank at W={w}", f"≤ {MEMORY_GOAL}×", ratio, max(ratio, 1 / ratio) <= MEMORY_GOAL,
            f"{r['table_bytes_max'] / MB:,.1f} MB (largest rank) / {r['predicted_bytes'] / MB:,.1f} MB predicted")
    if 4 in by_w:
        r = by_w[4]
        add("exchange share of the head step at W=4", f"≤ {SHARE_GOAL:.0%}", r["exchange_share"],
            r["exchange_share"] <= SHARE_GOAL, f"{r['exchange_ms']:.2f} ms of {r['step_ms']:.2f} ms", percent=True)
    else:
        add("exchange share of the head step at W=4", f"≤ {SHARE_GOAL:.0%}", None, False, "needs W=4", True)
    return out


def table(results: list[dict], projected: list[dict], goal_rows: list[dict], info: dict, a) -> str:
    lines = [f"machine: {info['cpu']}, {info['cores']} cores (W > {info['cores']} is oversubscribed), "
             f"{info['ram_gib']} GiB RAM; torch {info['torch']}, numba {info['numba']}",
             f"V={a.tags:,}, d={a.dim}, B={a.batch}, K={a.negatives}, P=1, {a.tags_per_image} tags/image, "
             f"optimizer {a.optimizer}; {a.steps} timed steps after {a.warmup}; means over ranks", "",
             "| W | distinct ids/rank | sent MB/rank/step | received MB/rank/step | exchange ms | step ms "
             "| step ms (slowest rank) | exchange share | table+state MB/rank | predicted MB | ratio |",
             "|" + " ---: |" * 11]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['W']} | {r['skipped']} |" + " |" * 9)
            continue
        lines.append(f"| {r['W']} | {r['distinct_ids']:,.0f} | {r['sent_bytes'] / MB:.3f} | "
                     f"{r['received_bytes'] / MB:.3f} | {r['exchange_ms']:.2f} | {r['step_ms']:.2f} | "
                     f"{r['step_ms_max']:.2f} | {r['exchange_share']:.1%} | {r['table_bytes'] / MB:,.1f} | "
                     f"{r['predicted_bytes'] / MB:,.1f} | {r['memory_ratio']:.3f} |")
    for p in projected:
        lines.append(f"| {p['W']} (projected from W={p['from_W']}) | {p['distinct_ids']:,.0f} | "
                     f"{p['sent_bytes'] / MB:.3f} | {p['received_bytes'] / MB:.3f} | | | | | | "
                     f"{p['predicted_bytes'] / MB:,.1f} | |")
    row_step = [r for r in results if "ranks" in r and "row_step" in r["ranks"][0]["state_bytes"]]
    for r in row_step:  # lazy_adam: its per-row int32 step counts are in table+state, not in the prediction
        mb = sum(k["state_bytes"]["row_step"] for k in r["ranks"]) / r["W"] / MB
        lines.append(f"W={r['W']}: lazy_adam's int32 row steps, {mb:,.2f} MB/rank, are in table+state (not predicted)")
    lines += [""]
    for g in goal_rows:
        if g["ratio"] is None:
            measured = "not measured"
        else:
            measured = f"{g['ratio']:.1%}" if g["percent"] else f"{g['ratio']:.3f}×"
        lines.append(f"goal: {g['goal']} {g['target']}: {measured} ({g['detail']}): "
                     f"{'met' if g['met'] else 'not met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.dist", description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4", help="numbers of ranks W, comma-separated")
    ap.add_argument("--tags", type=int, default=600_000, help="vocabulary size V")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256, help="images per rank per step")
    ap.add_argument("--negatives", type=int, default=20, help="K per image")
    ap.add_argument("--tags-per-image", type=int, default=8)
    ap.add_argument("--optimizer", default="sparse_adam", choices=OPTIMIZERS)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank; default max(1, cores // W)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write every figure (per rank too) here")
    a = ap.parse_args(argv)
    try:
        worlds = [int(x) for x in a.worlds.split(",") if x]
    except ValueError:
        ap.error(f"--worlds {a.worlds!r}: give whole numbers, e.g. 1,2,4")
    if not worlds or min(worlds) < 1:
        ap.error("--worlds: every W must be at least 1")
    if min(a.tags, a.dim, a.batch, a.negatives, a.tags_per_image, a.steps) < 1 or a.warmup < 0:
        ap.error("--tags, --dim, --batch, --negatives, --tags-per-image and --steps must be at least 1")
    info = machine()
    cores = info["cores"] or 1
    results = []
    for w in worlds:
        case = {"W": w, "V": a.tags, "d": a.dim, "B": a.batch, "K": a.negatives, "tags_per_image": a.tags_per_image,
                "optimizer": a.optimizer, "steps": a.steps, "warmup": a.warmup, "seed": a.seed,
                "threads": a.threads or max(1, cores // w)}
        # every rank: its shard and state, plus the whole counts, log counts and the samplers' tables (~40 B/tag)
        need = predicted_bytes(a.tags, a.dim, a.optimizer, 1) + w * (a.tags * 40 + 400 * 2**20)
        free = meminfo("MemAvailable")
        if free and need > free:
            results.append({**case, "skipped": f"skipped: needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"})
            print(f"W={w}: {results[-1]['skipped']}", flush=True)
            continue
        print(f"W={w} ...", end=" ", flush=True)
        results.append(run_world(case))
        r = results[-1]
        print(f"{r['step_ms']:.2f} ms/step ({r['seconds']:.0f} s)", flush=True)
    projected = project(results, a)
    goal_rows = goals(results)
    text = table(results, projected, goal_rows, info, a)
    print("\n" + text)
    report = {"machine": info, "args": vars(a), "results": results, "projected": projected, "goals": goal_rows,
              "table": text}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {a.json}")
    return report


if __name__ == "__main__":
    run_cli(main)
