"""Sharded tag-table benchmark: the training step's tag head at W = 1, 2, 4 CPU ranks, four ways.

    python -m im2vec.bench.dist                          # V = 600k, d = 256, B = 256, K = 20, W = 1,2,4, every arm
    python -m im2vec.bench.dist --worlds 1,2 --arms serial,overlap --optimizer row_adagrad --json dist.json

For each W and arm, W processes are spawned (gloo over 127.0.0.1, max(1, cores // W) torch threads each). Every
rank builds only its own shard of a V×d table with Zipf counts (count ∝ 1/rank) and the table optimizer, and
runs ``TagHead``'s step as training does (prepare, loss, backward, step): an image batch's tags
(``--tags-per-image`` drawn ∝ count; the data loader's part, not timed), a random u (B, d), and, timed: the
share all-reduce, the draw (P = 1, K negatives, a (seed, rank) generator), the rows from their owners, the loss,
backward, the gradients back to their owners and the update. The arms:

- ``serial``: the exchange on the step's thread (optim.overlap=false, optim.hot_rows=0);
- ``hot``: the rows a rank's batch draws with probability ≥ ``--hot-rows`` replicated on every rank, their gradients
  all-reduced (im2vec/wide/hot_rows.py);
- ``overlap`` / ``overlap_hot``: the exchange and update on the worker thread (im2vec/wide/sharded_step.py).

A GPU trunk is modelled as ``--trunk-ms`` of an idle CPU per step (one third before the loss, two thirds in
backward after the head's gradient): what the table's CPU work can hide behind. After ``--warmup`` steps,
``--steps`` are timed. Per rank and step:

- **bytes** sent and received, and **exchange ms**: the deltas of ``table.stats`` (the all-to-alls' payload; the
  hot rows' all-reduce counted as a ring's 2·(W−1)/W of its buffer; the time includes waiting for the slowest rank);
- **step ms**, **head ms** (step − trunk) and **exchange waited ms**: serial, the exchange; overlapped, the main
  thread's wait for the worker's rows; its **share** of the head ms;
- **fetched ids**: the distinct ids of the rank's batch fetched from their owners (hot rows excluded);
- **table + state**: bytes of the shard and of every tensor in the optimizer state (after warm-up),
  beside V·d·4·(1+s)/W, s = 2 for the Adam variants (lazy_adam's int32 row steps come on top), 1/d for
  row_adagrad; the hot replica's bytes are reported apart.

Projection to W = 8, 64: bytes per rank ∝ n·(W−1)/W (n distinct ids per rank, independent of W), scaled
from each measured W > 1; table + state V·d·4·(1+s)/W. Goals: bytes per rank flat in W (W=4 / W=2
≤ 1.2), table + state within 1.1× of the prediction, exchange waited for ≤ 25 % of the head step (serial at
W = 4; overlapped at W = 2). Peak memory during checkpoint save, load and validation: ``python -m
im2vec.bench.dist_memory``.
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
ARMS = {"serial": (False, False), "hot": (False, True), "overlap": (True, False), "overlap_hot": (True, True)}


def worker(rank: int, case: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from im2vec.wide.allocator import tune_malloc
    from im2vec.wide.head import SamplerConfig
    from im2vec.wide.sampler import NegativeSampler
    from im2vec.wide.tag_head import TagHead

    tune_malloc()  # as training does
    w, v, d, b = case["W"], case["V"], case["d"], case["B"]
    overlap, hot = ARMS[case["arm"]]
    torch.set_num_threads(case["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{case['port']}", rank=rank, world_size=w)
    try:
        torch.manual_seed(case["seed"])  # the table's initial rows (each rank draws only its own)
        gen = torch.Generator().manual_seed(rank_seed(case["seed"] + 1, rank))
        counts = zipf_counts(v)
        cfg = SamplerConfig(num_negatives=case["K"], num_positives=1)
        tag_sampler = NegativeSampler(counts, alpha=1.0)
        head = TagHead(counts, d, cfg, 0.01, case["seed"], overlap=overlap, hot_rows=case["hot_rows"] if hot else 0,
                       shard=(rank, w) if w > 1 else None)
        if w > 1:
            head.shard(rank, w, 600.0)
        opt = head.make_optimizer(case["optimizer"], 0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        head.start(opt, torch.device("cpu"))
        table = head.table
        counted = {"distinct": 0, "owners": torch.zeros(w, dtype=torch.long), "on": False}
        if w > 1:  # what each step fetches from the owners (the tail: hot rows are read from the replica)
            rows_for = table.rows_for

            def counting(uniq):
                if counted["on"]:
                    tail = uniq if table.hot is None else uniq[table.hot.slot[uniq] < 0]
                    counted["distinct"] += tail.numel()
                    counted["owners"] += torch.bincount(tail % w, minlength=w)
                return rows_for(uniq)

            table.rows_for = counting
        fwd_s, bwd_s = case["trunk_ms"] / 3e3, case["trunk_ms"] * 2 / 3e3  # a GPU trunk: the CPU idle meanwhile

        def backward(loss):
            loss.backward()  # the head's rows first: with overlap their update is queued from in here
            time.sleep(bwd_s)  # ... while the trunk's backward goes on

        step_s = []
        stats = table.stats if w > 1 else {"bytes_sent": 0, "bytes_received": 0, "exchange_s": 0.0}
        for i in range(case["warmup"] + case["steps"]):
            if i == case["warmup"]:
                head.drain()
                if w > 1:
                    dist.barrier()
                before, counted["on"] = dict(stats), True
                head.worker.wait_ms = 0.0
            tags = image_tags(tag_sampler, b, case["tags_per_image"], gen)  # the data loader's part
            u = torch.randn(b, d, generator=gen).mul_(0.1).requires_grad_()
            t0 = time.perf_counter()
            prep = head.prepare(tags, torch.device("cpu"))
            time.sleep(fwd_s)  # the trunk's forward
            loss = head.loss(u, prep)[0]
            opt.zero_grad(set_to_none=True)
            head.backward(loss, backward)
            head.step(opt, sched)
            if i >= case["warmup"]:
                step_s.append(time.perf_counter() - t0)
        t_end = time.perf_counter()
        head.drain()  # what the worker still had queued: counted in the last step
        if step_s:
            step_s[-1] += time.perf_counter() - t_end
        counted["on"] = False
        after = dict(stats)
        state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        state_bytes = {k: t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
                       if isinstance(t, torch.Tensor)}
        weight_bytes = table.weight.numel() * table.weight.element_size()
        hot_rows = table.hot.size if getattr(table, "hot", None) is not None else 0
        result = {
            "rank": rank, "rows": table.weight.shape[0], "hot_rows": hot_rows,
            "hot_bytes": table.hot.nbytes() if hot_rows else 0,
            "bytes_sent": after["bytes_sent"] - before["bytes_sent"],
            "bytes_received": after["bytes_received"] - before["bytes_received"],
            "exchange_s": after["exchange_s"] - before["exchange_s"],
            "wait_s": head.worker.wait_ms / 1e3,  # overlapped: the main thread waiting for the worker's rows
            "trunk_s": (fwd_s + bwd_s) * case["steps"],
            "step_s": step_s, "distinct_ids": counted["distinct"], "owner_counts": counted["owners"].tolist(),
            "weight_bytes": weight_bytes, "state_bytes": state_bytes,
            "table_bytes": weight_bytes + sum(t.numel() * t.element_size() for t in state),
            "rss_bytes": meminfo("VmRSS"), "peak_rss_bytes": meminfo("VmHWM"),
        }
        head.end(opt)
        head.close()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        if w > 1:
            dist.barrier()
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
    overlap = ARMS[case["arm"]][0]
    out = {
        "distinct_ids": mean("distinct_ids") / s, "hot_rows": ranks[0]["hot_rows"],
        "sent_bytes": mean("bytes_sent") / s, "received_bytes": mean("bytes_received") / s,
        "exchange_ms": mean("exchange_s") / s * 1e3, "wait_ms": mean("wait_s") / s * 1e3,
        "trunk_ms": mean("trunk_s") / s * 1e3,
        "step_ms": sum(step_ms) / w, "step_ms_max": max(step_ms),
        "table_bytes": mean("table_bytes"), "table_bytes_max": max(r["table_bytes"] for r in ranks),
        "hot_bytes": mean("hot_bytes"), "predicted_bytes": predicted, "seconds": seconds,
        "peak_rss_max": max(r["peak_rss_bytes"] or 0 for r in ranks),  # host memory of the largest rank, training
    }
    out["head_ms"] = out["step_ms"] - out["trunk_ms"]  # the step without the trunk's (modelled) time
    # the exchange the trunk's thread waits for: serial all of it; overlapped, only its wait for the worker's rows
    out["exposed_ms"] = out["wait_ms"] if overlap else out["exchange_ms"]
    out["exchange_share"] = out["exposed_ms"] / out["head_ms"] if out["head_ms"] > 0 else 0.0
    out["memory_ratio"] = out["table_bytes_max"] / predicted
    return {**case, **out, "ranks": ranks}


# ---------------------------------------------------------------- projection, goals, table
def project(results: list[dict], a) -> list[dict]:
    """Bytes per rank at W = 8, 64 from each measured W > 1 (each arm): bytes / ((W−1)/W) · (W'−1)/W'."""
    rows = []
    for r in results:
        if r["W"] < 2 or "sent_bytes" not in r:
            continue
        frac = (r["W"] - 1) / r["W"]
        for w in PROJECT_TO:
            f = (w - 1) / w
            rows.append({"W": w, "from_W": r["W"], "arm": r["arm"], "distinct_ids": r["distinct_ids"],
                         "sent_bytes": r["sent_bytes"] / frac * f, "received_bytes": r["received_bytes"] / frac * f,
                         "predicted_bytes": predicted_bytes(a.tags, a.dim, a.optimizer, w)})
    return rows


def goals(results: list[dict]) -> list[dict]:
    by = {(r["arm"], r["W"]): r for r in results if "sent_bytes" in r}
    out = []

    def add(name: str, target: str, ratio: float | None, met: bool, detail: str, percent: bool = False) -> None:
        out.append({"goal": name, "target": target, "ratio": ratio, "met": met, "detail": detail, "percent": percent})

    for arm in ARMS:
        if (arm, 2) in by and (arm, 4) in by and not ARMS[arm][0]:
            lo, hi = by[arm, 2]["sent_bytes"], by[arm, 4]["sent_bytes"]
            scaled = (hi / (3 / 4)) / (lo / (1 / 2))  # n·(W−1)/W predicts 1.5×; this ratio is 1 if bytes ∝ (W−1)/W
            add(f"bytes per rank per step flat in W ({arm})", f"≤ {FLAT_GOAL}×", hi / lo, hi / lo <= FLAT_GOAL,
                f"W=4 {hi / MB:.2f} MB / W=2 {lo / MB:.2f} MB sent; (W−1)/W predicts 1.5×, measured / predicted "
                f"{scaled:.3f}")
    for (arm, w), r in sorted(by.items(), key=lambda x: (x[0][1], x[0][0])):
        if arm != "serial":
            continue
        ratio = r["memory_ratio"]
        add(f"table + state per rank at W={w}", f"≤ {MEMORY_GOAL}×", ratio, max(ratio, 1 / ratio) <= MEMORY_GOAL,
            f"{r['table_bytes_max'] / MB:,.1f} MB (largest rank) / {r['predicted_bytes'] / MB:,.1f} MB predicted")
    for arm, w in (("serial", 4), ("overlap", 2), ("overlap_hot", 2)):
        if (arm, w) in by:
            r = by[arm, w]
            add(f"exchange the step waits for, share of the head step ({arm}, W={w})", f"≤ {SHARE_GOAL:.0%}",
                r["exchange_share"], r["exchange_share"] <= SHARE_GOAL,
                f"{r['exposed_ms']:.2f} ms of {r['head_ms']:.2f} ms (step {r['step_ms']:.2f} ms less the trunk's "
                f"{r['trunk_ms']:.0f} ms)", percent=True)
    return out


def table(results: list[dict], projected: list[dict], goal_rows: list[dict], info: dict, a) -> str:
    lines = [f"machine: {info['cpu']}, {info['cores']} cores (W > {info['cores']} is oversubscribed), "
             f"{info['ram_gib']} GiB RAM; torch {info['torch']}, numba {info['numba']}",
             f"V={a.tags:,}, d={a.dim}, B={a.batch}, K={a.negatives}, P=1, {a.tags_per_image} tags/image, "
             f"optimizer {a.optimizer}; hot rows: optim.hot_rows={a.hot_rows}; trunk modelled as {a.trunk_ms:g} ms "
             f"of an idle CPU per step (a GPU's fwd + bwd); {a.steps} timed steps after {a.warmup}; means over ranks",
             "", "| arm | W | hot rows | fetched ids/rank | sent MB/rank/step | received MB | exchange ms | step ms "
             "| head ms (step − trunk) | exchange waited ms | share of head | table+state MB/rank | predicted MB | ratio |",
             "| --- |" + " ---: |" * 13]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['arm']} | {r['W']} | {r['skipped']} |" + " |" * 11)
            continue
        lines.append(f"| {r['arm']} | {r['W']} | {r['hot_rows']:,} | {r['distinct_ids']:,.0f} | "
                     f"{r['sent_bytes'] / MB:.3f} | {r['received_bytes'] / MB:.3f} | {r['exchange_ms']:.2f} | "
                     f"{r['step_ms']:.2f} | {r['head_ms']:.2f} | {r['exposed_ms']:.2f} | {r['exchange_share']:.1%} | "
                     f"{r['table_bytes'] / MB:,.1f} | {r['predicted_bytes'] / MB:,.1f} | {r['memory_ratio']:.3f} |")
    for p in projected:
        lines.append(f"| {p['arm']} | {p['W']} (projected from W={p['from_W']}) | | | {p['sent_bytes'] / MB:.3f} | "
                     f"{p['received_bytes'] / MB:.3f} | | | | | | | {p['predicted_bytes'] / MB:,.1f} | |")
    row_step = [r for r in results if "ranks" in r and "row_step" in r["ranks"][0]["state_bytes"]]
    for r in row_step:  # lazy_adam: its per-row int32 step counts are in table+state, not in the prediction
        mb = sum(k["state_bytes"]["row_step"] for k in r["ranks"]) / r["W"] / MB
        lines.append(f"W={r['W']}: lazy_adam's int32 row steps, {mb:,.2f} MB/rank, are in table+state (not predicted)")
    rss = [f"{r['arm']} W={r['W']} {r['peak_rss_max'] / MB:,.0f} MB" for r in results if r.get("peak_rss_max")]
    if rss:
        lines.append("host memory per rank while training (peak RSS, largest rank; table + state is part of it): "
                     + "; ".join(rss))
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
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--hot-rows", type=float, default=0.5,
                    help="optim.hot_rows for the hot arms: a fraction in (0, 1), or a whole number of rows")
    ap.add_argument("--trunk-ms", type=float, default=50.0,
                    help="a GPU trunk's forward + backward per step, modelled as the CPU idle (1/3 before the loss, "
                         "2/3 in backward)")
    ap.add_argument("--json", default=None, help="also write every figure (per rank too) here")
    a = ap.parse_args(argv)
    try:
        worlds = [int(x) for x in a.worlds.split(",") if x]
    except ValueError:
        ap.error(f"--worlds {a.worlds!r}: give whole numbers, e.g. 1,2,4")
    if not worlds or min(worlds) < 1:
        ap.error("--worlds: every W must be at least 1")
    arms = [x for x in a.arms.split(",") if x]
    if not arms or any(x not in ARMS for x in arms):
        ap.error(f"--arms {a.arms!r}: use some of {', '.join(ARMS)}")
    a.hot_rows = int(a.hot_rows) if a.hot_rows >= 1 else a.hot_rows
    if a.hot_rows <= 0 or a.trunk_ms < 0:
        ap.error("--hot-rows must be above 0 and --trunk-ms at least 0")
    if min(a.tags, a.dim, a.batch, a.negatives, a.tags_per_image, a.steps) < 1 or a.warmup < 0:
        ap.error("--tags, --dim, --batch, --negatives, --tags-per-image and --steps must be at least 1")
    info = machine()
    cores = info["cores"] or 1
    results = []
    for w, arm in ((w, arm) for w in worlds for arm in arms):
        case = {"W": w, "V": a.tags, "d": a.dim, "B": a.batch, "K": a.negatives, "tags_per_image": a.tags_per_image,
                "optimizer": a.optimizer, "steps": a.steps, "warmup": a.warmup, "seed": a.seed, "arm": arm,
                "hot_rows": a.hot_rows, "trunk_ms": a.trunk_ms, "threads": a.threads or max(1, cores // w)}
        # every rank: its shard and state, plus the whole counts, log counts and the samplers' tables (~40 B/tag)
        need = predicted_bytes(a.tags, a.dim, a.optimizer, 1) + w * (a.tags * 40 + 400 * 2**20)
        free = meminfo("MemAvailable")
        if free and need > free:
            results.append({**case, "skipped": f"skipped: needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"})
            print(f"W={w} {arm}: {results[-1]['skipped']}", flush=True)
            continue
        print(f"W={w} {arm} ...", end=" ", flush=True)
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
