"""Peak host memory per rank of a sharded tag table's checkpoint save, its load on W′ ranks, and validation.

    python -m im2vec.bench.dist_memory                   # V = 600k, d = 256, W = 1,2,4, 2,000 images
    python -m im2vec.bench.dist_memory --dry-run         # tiny V, W = 1,2: under 40 s
    python -m im2vec.bench.dist_memory --worlds 2 --load-worlds 1,3 --json mem.json

For each W, W ranks are spawned (gloo over 127.0.0.1). Each builds its own shard of the V×d table
(``ShardedTagTable``, ``full=None``) and the ``sparse_adam`` table optimizer, and runs one step with a sparse
gradient on every row of the shard (so ``exp_avg`` and ``exp_avg_sq`` exist, shard-sized), and a small trunk
with AdamW. Then, per rank, three phases, each measured as **peak RSS above the rank's RSS just before it**
(the kernel's high-water mark VmHWM, reset by writing 5 to /proc/self/clear_refs; where that does not work,
RSS sampled by a thread every 5 ms) and its wall time (the slowest rank's):

1. **save**: the checkpoint dict a run writes (``state_dict`` with ``table.embedding.weight``, the trunk,
   ``optimizer_states`` [trunk AdamW, table SparseAdam], the ``im2vec`` metadata, ``ROW_SHARDS`` naming the
   table and the two moments) through ``row_checkpoint.save_sharded`` into a temporary folder;
2. **load** on W′ ranks (a separate group of W′ processes per W′, default 1, W and W+1): what a resume does,
   ``read_sharded(path, rank=None)`` (``AtomicCheckpointIO.load_checkpoint``) then
   ``TableStateMixin.load_state`` (``read_rows`` of the rank's rows for every per-row key);
3. **validate** (on the W saving ranks): N random image vectors with 5 tags (2 of them "clean") per image,
   dealt over the ranks, through ``ValidationReport.compute_across`` with the rank's own rows, a γ sweep of
   11 values, as ``Im2VecModule.on_validation_epoch_end`` calls it.

Before each phase: ``gc.collect()`` and ``malloc_trim(0)`` (training's malloc tuning keeps up to 1 GiB of freed
heap; trimmed, the figure is what the phase itself needs). Goal per phase: the largest rank's peak above its
start ≤ 1.2× the rank's own table + state (shard + exp_avg + exp_avg_sq; for a load, of its W′ shard).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import math
import mmap
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch

from im2vec.bench.head_cases import zipf_counts
from im2vec.bench.machine import GiB, machine, meminfo, peak_rss, reset_peak, rss
from im2vec.errors import ArgumentParser, positive_int, run_cli

GOAL = 1.2
GAMMAS = [round(0.1 * i, 1) for i in range(11)]  # 0, 0.1, …, 1.0: 11 values
PHASES = ("save", "load", "validate")
PROCESS_BYTES = 450 << 20  # one rank's interpreter, torch and im2vec, before any table
MB = 1e6
FULL = {"tags": 600_000, "dim": 256, "images": 2000, "worlds": "1,2,4", "load_worlds": None}
DRY = {"tags": 20_000, "dim": 64, "images": 64, "worlds": "1,2", "load_worlds": "1,2"}  # W′ = W, < W, > W


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- peak RSS of one phase
def clear_refs_works() -> bool:
    """Whether writing 5 to /proc/self/clear_refs resets VmHWM here: 64 MiB touched and unmapped, then reset."""
    if not reset_peak():
        return False
    size = 64 << 20
    m = mmap.mmap(-1, size)
    for i in range(0, size, mmap.PAGESIZE):
        m[i] = 1
    high = peak_rss()
    m.close()
    reset_peak()
    return high - peak_rss() > size // 2 and peak_rss() <= rss() + (4 << 20)


def malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PhaseMeter:
    """``start()`` … ``stop()`` -> the phase's RSS before, its peak, the peak above the start, and seconds."""

    def __init__(self, method: str):
        self.method = method  # "clear_refs" (VmHWM reset) or "sampling" (RSS every 5 ms)
        self._stop, self._thread, self.peak = threading.Event(), None, 0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def start(self) -> None:
        gc.collect()
        malloc_trim()
        self.base = self.peak = rss()
        if self.method == "clear_refs":
            reset_peak()
        else:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        seconds = time.perf_counter() - self.t0
        if self.method == "clear_refs":
            peak = peak_rss()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self.peak, rss())
        return {"start_bytes": self.base, "peak_bytes": peak, "above_bytes": peak - self.base, "seconds": seconds}


def resolve(choice: str) -> str:
    return ("clear_refs" if clear_refs_works() else "sampling") if choice == "auto" else choice


# ---------------------------------------------------------------- the ranks, in their own processes
def _start(rank: int, world: int, case: dict):
    import torch.distributed as dist

    from im2vec.wide.allocator import tune_malloc
    from im2vec.wide.sharded_table import exchange_group

    meter = PhaseMeter(resolve(case["peak"]))  # probed before the malloc tuning, on a bare mmap
    tune_malloc()  # as training does
    torch.set_num_threads(max(1, case["cores"] // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{case['port']}", rank=rank, world_size=world)
    return meter, exchange_group(600.0)


def _sums(weight, state: dict) -> dict:  # what the ranks hold, summed: every row read exactly once on load
    return {k: float(t.detach().double().sum()) for k, t in
            (("weight", weight), ("exp_avg", state["exp_avg"]), ("exp_avg_sq", state["exp_avg_sq"]))}


def own_bytes(v: int, d: int, rank: int, world: int) -> int:  # the shard, exp_avg, exp_avg_sq (fp32)
    return max(0, (v - rank + world - 1) // world) * d * 4 * 3


def image_set(case: dict, rank: int, world: int) -> tuple:
    """The whole validation set (the same on every rank), the rank's images of it (dealt round-robin)."""
    g, n = torch.Generator().manual_seed(case["seed"] + 17), case["images"]
    u, obs = torch.randn(n, case["d"], generator=g).mul_(0.1), torch.randint(0, case["V"], (n, 5), generator=g)
    mine = torch.arange(rank, n, world)
    return u[mine], obs[mine], obs[mine, :2].clone(), [f"img{i:06d}" for i in mine.tolist()]


def save_worker(rank: int, case: dict, out_dir: str) -> None:
    """Rank ``rank`` of W: its shard and state, then the save and validation phases."""
    import torch.distributed as dist
    from torch import nn

    from im2vec.eval.validation import ValidationReport
    from im2vec.wide.row_checkpoint import ROW_SHARDS, save_sharded
    from im2vec.wide.sharded_table import ShardedTagTable, rank_seed
    from im2vec.wide.sparse_optim import make_table_optimizer
    from im2vec.wide.table_state import TABLE_KEY, TABLE_OPTIMIZER

    w, v, d = case["W"], case["V"], case["d"]
    meter, group = _start(rank, w, case)
    try:
        torch.manual_seed(rank_seed(case["seed"], rank))
        counts = zipf_counts(v)
        table = ShardedTagTable(counts, d, 0.01, rank, w, group, full=None)
        opt = make_table_optimizer("sparse_adam", [table.weight], lr=0.01)
        n = table.weight.shape[0]
        table.weight.grad = torch.sparse_coo_tensor(torch.arange(n)[None], torch.randn(n, d).mul_(0.01), (n, d),
                                                    check_invariants=False)
        opt.step()  # every row touched: exp_avg and exp_avg_sq of the shard's shape
        table.weight.grad = None
        trunk = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        trunk_opt = torch.optim.AdamW(trunk.parameters(), lr=1e-3)
        trunk(torch.randn(8, d)).square().mean().backward()
        trunk_opt.step()
        table_opt = opt.state_dict()  # references to the state tensors, as Lightning's checkpoint holds them
        keys = [f"state_dict/{TABLE_KEY}"] + [f"optimizer_states/{TABLE_OPTIMIZER}/state/{pid}/{k}"
                                              for pid, st in table_opt["state"].items()
                                              for k in ("exp_avg", "exp_avg_sq") if k in st]
        rngs = (torch.Generator().manual_seed(rank_seed(case["seed"], rank)).get_state(), torch.get_rng_state())
        every = [None] * w
        dist.all_gather_object(every, rngs, group=group)
        checkpoint = {
            "epoch": 0, "global_step": 2,
            "state_dict": {**{f"encoder.{k}": t for k, t in trunk.state_dict().items()},
                           TABLE_KEY: table.weight.detach()},
            "optimizer_states": [trunk_opt.state_dict(), table_opt],
            "im2vec": {"num_tags": v, "dim": d, "world_size": w, "sampler_rng": every[0][0],
                       "sampler_rngs": [g for g, _ in every], "torch_rngs": [r for _, r in every],
                       "torch_rng": every[0][1]},
            ROW_SHARDS: {"rank": rank, "world": w, "rows": v, "keys": keys},
        }
        result = {"rank": rank, "rows": n, "own_bytes": own_bytes(v, d, rank, w), "method": meter.method,
                  "sums": _sums(table.weight, opt.state[table.weight]), "phases": {}}

        dist.barrier(group)
        meter.start()
        save_sharded(checkpoint, case["path"], rank, w, group)
        result["phases"]["save"] = meter.stop()
        del checkpoint, table_opt

        report = ValidationReport([f"t{i}" for i in range(v)], counts, None, 0.5, GAMMAS, 0, 0)
        u, obs, clean, names = image_set(case, rank, w)
        report.add(u, obs, clean, names, None)
        del u, obs, clean, names
        dist.barrier(group)
        meter.start()
        metrics, size = report.compute_across(table.weight.detach(), table.log_counts, 0, None, "cpu", group,
                                              rank, w)
        result["phases"]["validate"] = meter.stop()
        result["validation"] = {"images": size, "gammas": len(report.gammas),
                                "precision@5": (metrics or {}).get("val/precision@5")}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier(group)
    finally:
        dist.destroy_process_group()


def load_worker(rank: int, case: dict, out_dir: str) -> None:
    """Rank ``rank`` of W′: the load phase, as a resumed run reads its rows."""
    import types

    import torch.distributed as dist

    from im2vec.wide.row_checkpoint import ROW_SHARDS, read_sharded
    from im2vec.wide.sharded_table import shard_rows
    from im2vec.wide.table_state import TABLE_KEY, TableStateMixin

    w, v, d = case["W"], case["V"], case["d"]
    meter, group = _start(rank, w, case)
    try:
        head = types.SimpleNamespace(table=types.SimpleNamespace(rank=rank, world=w), sharded=True,
                                     gen=torch.Generator(), seed=case["seed"], _table_opt_state=None)
        dist.barrier(group)
        meter.start()
        checkpoint = read_sharded(case["path"], rank=None)  # AtomicCheckpointIO.load_checkpoint
        checkpoint.pop(ROW_SHARDS)
        with contextlib.redirect_stdout(io.StringIO()):  # (its note on resuming with another world size)
            TableStateMixin.load_state(head, checkpoint, checkpoint["im2vec"])  # this rank's rows
        phase = meter.stop()
        weight, state = checkpoint["state_dict"][TABLE_KEY], next(iter(head._table_opt_state["state"].values()))
        n = shard_rows(v, rank, w)
        assert weight.shape == state["exp_avg"].shape == state["exp_avg_sq"].shape == (n, d), weight.shape
        result = {"rank": rank, "rows": n, "own_bytes": own_bytes(v, d, rank, w), "method": meter.method,
                  "sums": _sums(weight, state), "phases": {"load": phase}}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier(group)
    finally:
        dist.destroy_process_group()


def spawn(fn, case: dict) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(fn, args=({**case, "port": free_port()}, tmp), nprocs=case["W"], join=True,
                           start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(case["W"])]


# ---------------------------------------------------------------- summary, table
def summarize(ranks: list[dict], phase: str, world: int, loaded_from: int | None = None) -> dict:
    """The phase over its ranks: the rank with the largest peak above its start, its own table + state."""
    top = max(ranks, key=lambda r: r["phases"][phase]["above_bytes"])
    above, own = top["phases"][phase]["above_bytes"], top["own_bytes"]
    ratio = above / own if own else math.inf
    out = {"phase": phase, "ranks": world, "rank": top["rank"], "above_bytes": above, "own_bytes": own,
           "ratio": ratio, "met": ratio <= GOAL, "seconds": max(r["phases"][phase]["seconds"] for r in ranks),
           "start_bytes": top["phases"][phase]["start_bytes"], "peak_bytes": top["phases"][phase]["peak_bytes"],
           "method": sorted({r["method"] for r in ranks}), "per_rank": [r["phases"][phase] for r in ranks]}
    return out if loaded_from is None else {**out, "saved_by": loaded_from}


def totals(ranks: list[dict]) -> dict:
    return {k: sum(r["sums"][k] for r in ranks) for k in ranks[0]["sums"]}


def fits(v: int, d: int, procs: int) -> tuple[bool, str]:
    """Whether ``procs`` ranks holding a V×d table and its two moments between them fit in MemAvailable."""
    need = v * d * 4 * 3 * (1 + 1 / procs) + procs * (PROCESS_BYTES + v * 120)
    free = meminfo("MemAvailable")
    if free and need > 0.9 * free:
        return False, f"needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB available"
    return True, ""


def run_world(w: int, a, cores: int) -> dict:
    base = {"V": a.tags, "d": a.dim, "images": a.images, "seed": a.seed, "peak": a.peak, "cores": cores}
    ok, why = fits(a.tags, a.dim, w)
    if not ok:
        print(f"W={w}: skipped: {why}", flush=True)
        return {"W": w, "skipped": why}
    out = {"W": w, "phases": []}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        path = str(Path(tmp, "ckpt"))
        print(f"W={w}: save + validate ...", end=" ", flush=True)
        saved = spawn(save_worker, {**base, "W": w, "path": path})
        out["phases"].append(summarize(saved, "save", w))
        out["validation"] = saved[0]["validation"]
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        print(f"{out['phases'][0]['seconds']:.1f} s", flush=True)
        for w2 in a.load_worlds or sorted({1, w, w + 1}):
            ok, why = fits(a.tags, a.dim, w2) if w2 != w else (True, "")
            if not ok:
                print(f"  load on W′={w2}: skipped: {why}", flush=True)
                out["phases"].append({"phase": "load", "ranks": w2, "skipped": why})
                continue
            print(f"  load on W′={w2} ...", end=" ", flush=True)
            loaded = spawn(load_worker, {**base, "W": w2, "path": path})
            got, want = totals(loaded), totals(saved)
            for k in want:  # every row read exactly once: the sums over the ranks agree
                if not math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-9):
                    raise RuntimeError(f"load on {w2} ranks of a {w}-rank save: sum of {k} {got[k]} != {want[k]}")
            out["phases"].append(summarize(loaded, "load", w2, loaded_from=w))
            print(f"{out['phases'][-1]['seconds']:.1f} s", flush=True)
    out["phases"].append(summarize(saved, "validate", w))
    return out


def table(results: list[dict], info: dict, a, method: str) -> str:
    setting = (f"V={a.tags:,}, d={a.dim}, sparse_adam (table + exp_avg + exp_avg_sq fp32), {a.images:,} validation "
               f"images, {len(GAMMAS)} γs; peak RSS by {method}; goal: peak above start ≤ {GOAL}× own table + state")
    header = ("| W | phase | ranks | peak above start, largest rank (MB) | own table + state (MB) | ratio "
              f"| ≤ {GOAL}× | time (s, slowest rank) |")
    lines = [f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; torch {info['torch']}",
             setting, "", header, "|" + " ---: |" * 8]
    for r in results:
        for p in r.get("phases", [{"phase": "all", "ranks": r["W"], "skipped": r.get("skipped")}]):
            name = p["phase"] if p["phase"] != "load" else f"load (W′={p['ranks']})"
            if "skipped" in p:
                lines.append(f"| {r['W']} | {name} | {p['ranks']} | skipped: {p['skipped']} | | | | |")
                continue
            lines.append(f"| {r['W']} | {name} | {p['ranks']} | {p['above_bytes'] / MB:,.1f} | "
                         f"{p['own_bytes'] / MB:,.1f} | {p['ratio']:.3f} | {'met' if p['met'] else 'NOT met'} | "
                         f"{p['seconds']:.2f} |")
    return "\n".join(lines)


def _ints(ap, flag: str, text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{flag} {text!r}: give whole numbers, comma-separated, e.g. 1,2,4")
    if not out or min(out) < 1:
        ap.error(f"{flag} {text!r}: every number of ranks must be at least 1")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.dist_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default=None, help="numbers of saving ranks W, comma-separated (default 1,2,4)")
    ap.add_argument("--load-worlds", default=None,
                    help="numbers of loading ranks W′, comma-separated (default: 1, W and W+1 where it fits)")
    ap.add_argument("--tags", type=positive_int, default=None, help="vocabulary size V (default 600000)")
    ap.add_argument("--dim", type=positive_int, default=None, help="d (default 256)")
    ap.add_argument("--images", type=positive_int, default=None, help="validation images N, whole set (default 2000)")
    ap.add_argument("--peak", default="auto", choices=("auto", "clear_refs", "sampling"),
                    help="how peak RSS is measured: VmHWM reset through /proc/self/clear_refs where that works "
                         "(auto), or RSS sampled every 5 ms")
    ap.add_argument("--dry-run", action="store_true", help=f"tiny: V={DRY['tags']:,}, d={DRY['dim']}, "
                    f"{DRY['images']} images, W={DRY['worlds']}, W′={DRY['load_worlds']}")
    ap.add_argument("--tmp", default=None, help="folder for the checkpoints (default: the system's temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write every figure (per rank too) here")
    a = ap.parse_args(argv)
    for k, v in (DRY if a.dry_run else FULL).items():  # what is given wins
        if getattr(a, k) is None:
            setattr(a, k, v)
    worlds = _ints(ap, "--worlds", a.worlds)
    a.load_worlds = _ints(ap, "--load-worlds", a.load_worlds) if a.load_worlds is not None else None
    most = max(worlds + (a.load_worlds or [w + 1 for w in worlds]))
    if a.tags < most:
        ap.error(f"--tags {a.tags}: fewer tags than ranks ({most}); every rank needs rows")
    if a.tmp is not None and not Path(a.tmp).is_dir():
        ap.error(f"--tmp {a.tmp}: no such folder")
    info = machine()
    method = resolve(a.peak)
    print(f"peak RSS by {method}" + (" (VmHWM reset through /proc/self/clear_refs)" if method == "clear_refs"
                                     else " (RSS sampled every 5 ms)"), flush=True)
    results = [run_world(w, a, info["cores"] or 1) for w in worlds]
    used = sorted({m for r in results for p in r.get("phases", []) for m in p.get("method", [])})
    text = table(results, info, a, ", ".join(used) or method)
    print("\n" + text)
    report = {"machine": info, "args": vars(a), "method": used, "goal": GOAL, "gammas": GAMMAS,
              "results": results, "table": text}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {a.json}")
    return report


if __name__ == "__main__":
    run_cli(main)
