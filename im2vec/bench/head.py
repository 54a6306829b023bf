"""Tag-head benchmark: the wide part against its limits and against a dense head.

    python -m im2vec.bench                               # V = 60k, 600k, 6M; d = 256, B = 256, K = 20
    python -m im2vec.bench --sizes 60000,600000 --steps 50 --json head.json

Every case runs in a fresh child process (so that its peak resident memory is its own), one after
the other, and each figure is the median over ``--steps`` timed steps after ``--warmup`` steps:

- **tag-head step** at each V, for the fused SparseAdam (im2vec's default), the row-wise Adagrad,
  the shared-negative mode (K = ``--shared`` rows per batch, SparseAdam) and the stock
  ``torch.optim.SparseAdam``. A step is what training does after the trunk: draw the ids
  (``sample``), gather the rows, score, loss and backward (``fwd+bwd``), the table update
  (``update``). The image vectors u (B, d) are a random leaf tensor; the counts are Zipf
  (count ∝ 1/rank); each image has ``--tags-per-image`` tags drawn ∝ count.
- **bandwidth floor** of the update: the bytes it must move (distinct rows × d × 4 B × the tensors
  it reads and writes: SparseAdam reads g, w, m, v and writes w, m, v = 7; Adagrad reads g, w and
  writes w = 3, plus 8 B per row of accumulator) divided by this machine's copy bandwidth,
  measured in the same process just before (``dst.copy_(src)`` of ``--bandwidth-mb`` MB buffers).
- **peak memory** of table + optimizer state: the process's peak resident set (VmHWM, reset just
  before the table is built) minus its resident set at that moment, beside the arithmetic
  minimum (V·d·4 B for the table, plus 2·V·d·4 B of Adam moments or V·4 B of Adagrad sums).
  A step's own working memory (the sampled rows, their gradients: independent of V) is measured
  first, on a small table, and reported apart (``working MiB``); it is in the baseline.
- **dense head**: ``nn.Linear(d, V)``, BCE-with-logits over the multi-hot targets and
  ``torch.optim.Adam``: what one would write without a sampled head. Skipped where its memory
  (about 4·V·d·4 B of parameters and state plus 4·B·V·4 B of logits) does not fit.
- **whole training step** with the default small trunk at ``--whole-vocab`` tags: trunk forward,
  sampled head, backward, gradient clipping, AdamW and the table update, beside the same trunk
  with no tag head (loss on u alone), the two interleaved step by step.

Cases whose estimated memory exceeds what the machine has free are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from im2vec.bench.head_cases import estimate_bytes, run_case
from im2vec.bench.machine import GiB, machine, meminfo
from im2vec.errors import ArgumentParser, run_cli

FLAT_GOAL, FLOOR_GOAL, DENSE_GOAL, SHARE_GOAL, MEMORY_GOAL = 1.5, 3.0, 200.0, 0.20, 1.2
HEADS = ("sparse_adam", "row_adagrad", "shared", "torch_sparse_adam")


# ---------------------------------------------------------------- the parent: cases, table, goals
def child(case: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "im2vec.bench.head", "--case", json.dumps(case)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**case, **json.loads(line[7:])}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**case, "failed": f"exit {proc.returncode}: {tail}"}


def plan(a: argparse.Namespace) -> list[dict]:
    common = {"d": a.dim, "B": a.batch, "K": a.negatives, "shared": a.shared, "warmup": a.warmup,
              "tags_per_image": a.tags_per_image, "bandwidth_mb": a.bandwidth_mb, "threads": a.threads,
              "malloc_tuning": not a.no_malloc_tuning}
    cases = [{**common, "kind": "head", "head": h, "V": v, "steps": a.steps} for v in a.sizes for h in a.heads]
    if not a.no_dense:
        cases += [{**common, "kind": "dense", "head": "dense", "V": v, "steps": a.dense_steps, "warmup": 1}
                  for v in a.sizes]
    if not a.no_whole:
        cases.append({**common, "kind": "whole", "head": "sparse_adam", "V": a.whole_vocab,
                      "image_size": a.image_size, "steps": a.whole_steps, "warmup": 2})
    return cases


def goals(results: list[dict]) -> list[dict]:
    ok = [r for r in results if "failed" not in r and "skipped" not in r]
    head = {(r["head"], r["V"]): r for r in ok if r["kind"] == "head"}
    sizes = sorted({v for _, v in head})
    out = []

    def add(name: str, goal: str, ratio: float, met: bool, detail: str, percent: bool = False) -> None:
        out.append({"goal": name, "target": goal, "ratio": ratio, "met": met, "detail": detail, "percent": percent})

    for h in ("sparse_adam", "row_adagrad", "shared"):
        have = [v for v in sizes if (h, v) in head]
        if len(have) >= 2:
            lo, hi = head[(h, have[0])]["step_ms"], head[(h, have[-1])]["step_ms"]
            add(f"flat in V ({h})", f"≤ {FLAT_GOAL}×", hi / lo, hi / lo <= FLAT_GOAL,
                f"step {hi:.2f} ms at V={have[-1]:,} / {lo:.2f} ms at V={have[0]:,}")
    def worst(name: str, key: str, limit: float, heads: tuple[str, ...], detail) -> None:
        """One goal per head: the largest ratio over the sizes measured."""
        for h in heads:
            rs = [head[(h, v)] for v in sizes if (h, v) in head]
            if rs:
                r = max(rs, key=lambda r: r[key])
                add(f"{name} ({h})", f"≤ {limit}×", r[key], r[key] <= limit, f"worst at V={r['V']:,}: {detail(r)}")

    worst("update vs bandwidth floor", "update_over_floor", FLOOR_GOAL, ("sparse_adam", "row_adagrad", "shared"),
          lambda r: f"update {r['update_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms")
    dense = {r["V"]: r for r in ok if r["kind"] == "dense"}
    both = [v for v in sizes if v in dense and ("sparse_adam", v) in head]
    if both:
        v = 600_000 if 600_000 in both else both[-1]
        ratio = dense[v]["step_ms"] / head[("sparse_adam", v)]["step_ms"]
        add("faster than the dense head", f"≥ {DENSE_GOAL:.0f}×", ratio, ratio >= DENSE_GOAL,
            f"V={v:,}: dense {dense[v]['step_ms']:.1f} ms / sampled {head[('sparse_adam', v)]['step_ms']:.2f} ms")
    whole = [r for r in ok if r["kind"] == "whole"]
    if whole:
        w = whole[0]
        add("wide part of a whole step", f"≤ {SHARE_GOAL:.0%}", w["wide_share"], w["wide_share"] <= SHARE_GOAL,
            f"V={w['V']:,}: whole {w['step_ms']:.1f} ms, trunk alone {w['trunk_ms']:.1f} ms", percent=True)
    worst("peak memory vs minimum", "peak_over_min", MEMORY_GOAL, ("sparse_adam", "row_adagrad"),
          lambda r: f"{r['peak_bytes'] / 2**20:,.0f} MiB / {r['min_bytes'] / 2**20:,.0f} MiB")
    return out


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def table(results: list[dict], goal_rows: list[dict], info: dict) -> str:
    lines = [f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
             f"{info['ram_gib']} GiB RAM; torch {info['torch']}, numba {info['numba']}; glibc malloc thresholds "
             f"{'tuned as in training' if any(r.get('malloc_tuned') for r in results) else 'left at their defaults'}", "",
             "| V | head | step ms | sample | fwd+bwd | update | distinct rows | floor ms | update / floor "
             "| peak MiB | minimum MiB | peak / min | working MiB |", "|" + " ---: |" * 13]
    for r in results:
        if r["kind"] == "whole":
            continue
        what = f"| {r['V']:,} | {r['head']} |"
        if "failed" in r or "skipped" in r:
            lines.append(f"{what} {r.get('skipped') or r.get('failed')} |" + " |" * 11)
        elif r["kind"] == "dense":
            lines.append(f"{what} {r['step_ms']:.1f} | | | | | | | {mib(r['peak_bytes'])} | {mib(r['min_bytes'])} "
                         f"| {r['peak_over_min']:.2f} | |")
        else:
            lines.append(f"{what} {r['step_ms']:.2f} | {r['sample_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                         f"{r['update_ms']:.2f} | {r['rows']:,.0f} | {r['floor_ms']:.2f} | {r['update_over_floor']:.2f} "
                         f"| {mib(r['peak_bytes'])} | {mib(r['min_bytes'])} | {r['peak_over_min']:.2f} "
                         f"| {mib(r['working_bytes'])} |")
    for r in results:
        if r["kind"] == "whole" and "step_ms" in r:
            lines += ["", f"whole training step, small_cnn trunk at {r['image_size']} px, B={r['B']}, d={r['d']}, "
                      f"V={r['V']:,}: {r['step_ms']:.1f} ms; trunk alone {r['trunk_ms']:.1f} ms; "
                      f"wide part {r['wide_share']:.1%} of the step"]
        elif r["kind"] == "whole":
            lines += ["", f"whole training step: {r.get('skipped') or r.get('failed')}"]
    lines += ["", "| goal | target | measured | met |", "| --- | ---: | ---: | :---: |"]
    for g in goal_rows:
        measured = f"{g['ratio']:.1%}" if g["percent"] else f"{g['ratio']:.2f}×"
        lines.append(f"| {g['goal']}: {g['detail']} | {g['target']} | {measured} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="60000,600000,6000000", help="vocabulary sizes V, comma-separated")
    ap.add_argument("--heads", default=",".join(HEADS), help="tag-head cases, comma-separated: " + ", ".join(HEADS))
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=20, help="K per image")
    ap.add_argument("--shared", type=int, default=1024, help="K per batch in the shared-negative mode")
    ap.add_argument("--tags-per-image", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per tag-head case")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dense-steps", type=int, default=5)
    ap.add_argument("--whole-vocab", type=int, default=600_000)
    ap.add_argument("--whole-steps", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=64, help="the default run's image size")
    ap.add_argument("--bandwidth-mb", type=int, default=256, help="buffer size of the copy-bandwidth measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default: torch's")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="keep glibc's default malloc thresholds (training tunes them: im2vec/wide/allocator.py)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-whole", action="store_true")
    ap.add_argument("--in-process", action="store_true",
                    help="run every case in this process (quicker; peak memory then includes what earlier cases left)")
    ap.add_argument("--json", default="bench-head.json", help="where the results go")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    a = ap.parse_args(argv)
    if a.case:
        print("RESULT " + json.dumps(run_case(json.loads(a.case))), flush=True)
        return {}
    a.sizes = [int(x) for x in a.sizes.split(",")]
    a.heads = [h for h in a.heads.split(",") if h]
    if set(a.heads) - set(HEADS):
        ap.error(f"--heads: unknown {sorted(set(a.heads) - set(HEADS))}; choose from {', '.join(HEADS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine()
    results = []
    for case in plan(a):
        need, free = estimate_bytes(case), meminfo("MemAvailable")
        label = f"{case['kind']} {case['head']} V={case['V']:,}"
        if free and need + GiB > free:
            results.append({**case, "skipped": f"skipped: needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"})
            print(f"{label}: {results[-1]['skipped']}", flush=True)
            continue
        print(f"{label} ...", end=" ", flush=True)
        results.append({**case, **run_case(case)} if a.in_process else child(case))
        r = results[-1]
        print(r.get("failed") or f"{r['step_ms']:.2f} ms/step ({r['case_seconds']:.0f} s)", flush=True)
    goal_rows = goals(results)
    text = table(results, goal_rows, info)
    print("\n" + text)
    report = {"machine": info, "args": {k: v for k, v in vars(a).items() if k != "case"}, "results": results,
              "goals": goal_rows, "table": text}
    Path(a.json).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {a.json}")
    return report


if __name__ == "__main__":
    run_cli(main)
