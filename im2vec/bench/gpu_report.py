"""The GPU check's report (im2vec.bench.gpu): the correctness checks and speed comparisons drawn from the
runs' results, the markdown summary table, and the exit status (1 if a check failed)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from im2vec.bench.gpu_runs import MIB, Plan

HEAD_GOAL = 0.10  # the tag head's share of the step's time, at most


def fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ran(r: dict | None) -> bool:
    return r is not None and "skipped" not in r and "error" not in r


def memory_check(name: str, base: dict | None, other: dict | None, slack: float, extra: str = "") -> dict:
    """``other``'s peak GPU memory growth during its run (peak - allocated at its start: what an earlier run
    left allocated does not count) within ``slack`` MiB of ``base``'s."""
    if not (_ran(base) and _ran(other)):
        return {"check": name, "ok": False, "detail": "not measured: a run failed or was skipped"}
    grow = other["growth_mib"] - base["growth_mib"]
    return {"check": name, "ok": grow <= slack,
            "detail": f"{base['name']}: {base['growth_mib']:.0f} MiB, {other['name']}: {other['growth_mib']:.0f} MiB "
                      f"(peak - allocated at the run's start; {grow:+.0f} MiB, allowed +{slack:.0f}{extra})"}


def checks_from(results: dict[str, dict], p: Plan) -> list[dict]:
    """The correctness checks (check, ok: True / False / None = skipped, detail) from the runs' results."""
    checks = []
    for name in ("main", "resume"):
        r = results.get(name)
        if r is None or "skipped" in r:
            checks.append({"check": f"placement, {name}", "ok": None, "detail": r["skipped"] if r else "not run"})
            continue
        where = "after fit" + (" and at the resumed run's first batch" if name == "resume" else "")
        if "error" in r:
            checks.append({"check": f"placement, {name}", "ok": False, "detail": f"not checked: {r['error']}"})
        else:
            checks.append({"check": f"placement, {name}", "ok": not r["placement"], "reasons": r["placement"],
                           "detail": "; ".join(r["placement"]) or f"table weight fp32, its buffers and optimizer "
                                                                  f"state on cpu, trunk on {p.device_type} ({where})"})
    others = {n: r for n, r in results.items() if n not in ("main", "resume") and _ran(r)}
    bad = [f for r in others.values() for f in r["placement"]]
    checks.append({"check": "placement, other runs", "ok": not bad if others else None, "reasons": bad,
                   "detail": "; ".join(bad) or f"the same after fit: {', '.join(others) or 'none ran'}"})
    if p.device_type != "cuda":
        checks.append({"check": "peak GPU memory flat in V", "ok": None, "detail": "skipped: no CUDA"})
        checks.append({"check": "resumed peak ≤ fit peak", "ok": None, "detail": "skipped: no CUDA"})
    else:
        table = p.vocab * p.dim * 4 / MIB
        checks.append(memory_check("peak GPU memory flat in V", results.get("small_vocab"), results.get("main"),
                                   p.mem_slack_mib, f"; the V={p.vocab:,} table alone is {table:.0f} MiB"))
        checks.append(memory_check("resumed peak ≤ fit peak", results.get("main"), results.get("resume"),
                                   p.mem_slack_mib, "; the table's optimizer state must not pass through the GPU"))
    failed = [f for r in results.values() for f in r.get("failures", [])]
    ran = [n for n, r in results.items() if "skipped" not in r]
    checks.append({"check": "every run finishes as configured", "ok": not failed, "reasons": failed,
                   "detail": "; ".join(failed) or f"{len(ran)} runs: {', '.join(ran)}"})
    return checks


def ratios_from(results: dict[str, dict], batch_size: int) -> list[dict]:
    """The speed comparisons (goal, value, ok: True / False / None = no goal); never a failure."""
    def rate(name):
        r = results.get(name)
        return r.get("images_per_s") if _ran(r) else None

    out = []
    main, bare = rate("main"), rate("no_head")
    if main and bare:
        share = 1 - main / bare
        out.append({"goal": f"tag head ≤ {HEAD_GOAL:.0%} of the step", "value": f"{share:.1%} "
                    f"(1 - {main:.0f} / {bare:.0f} images/s)", "ok": share <= HEAD_GOAL})
        waited = results["no_head"].get("data_wait_ms", 0.0)
        if waited > 0.1 * 1e3 * batch_size / bare:  # the trunk alone outran the loader: its rate is the loader's
            out.append({"goal": "no_head waited for the loader", "value": f"{waited:.1f} ms a batch of "
                        f"{1e3 * batch_size / bare:.1f}: the head's share is understated (more data.num_workers, "
                        "or data.decode=gpu)", "ok": None})
    gpu = rate("decode_gpu")
    if main and gpu:
        out.append({"goal": "data.decode=gpu / cpu", "value": f"{gpu / main:.2f}× ({gpu:.0f} / {main:.0f} images/s)",
                    "ok": None})
    serial = rate("no_overlap")
    if main and serial:
        out.append({"goal": "optim.overlap=true / false", "value": f"{main / serial:.2f}× ({main:.0f} / "
                    f"{serial:.0f} images/s)", "ok": None})
    return out


def mark(ok) -> str:
    return "skipped" if ok is None else "PASS" if ok else "FAIL"


def peak(r: dict) -> str:
    if "peak_mib" not in r:
        return "—"
    return f"{r['peak_mib']:.0f} (+{r['growth_mib']:.0f})" if "growth_mib" in r else f"{r['peak_mib']:.0f}"


def summary_table(results: dict[str, dict], checks: list[dict], ratios: list[dict], p: Plan, header: str) -> str:
    lines = [header, "",
             "| run | V | head | decode | overlap | images/s | step ms | prepare ms | wait ms | update ms | "
             "fetch ms | peak GPU MiB (+ in the run) |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        rate = r.get("images_per_s")
        step = 1e3 * p.batch_size / rate if rate else None
        effective = r.get("overlap_effective")
        overlap = r["overlap"] + ("" if effective is None else f" ({str(effective).lower()})")
        if "skipped" in r or "error" in r:
            note = f"skipped: {r['skipped']}" if "skipped" in r else "FAILED"
            lines.append(f"| {name} | {r['vocab']:,} | {'yes' if r['head'] else 'no'} | {r['decode']} | {overlap} | "
                         f"{note} | | | | | | {peak(r)} |")
            continue
        lines.append(f"| {name} | {r['vocab']:,} | {'yes' if r['head'] else 'no'} | {r['decode']} | {overlap} | "
                     f"{fmt(rate, '.0f')} | {fmt(step, '.1f')} | {fmt(r.get('table_prepare_ms'), '.2f')} | "
                     f"{fmt(r.get('table_wait_ms'), '.2f')} | {fmt(r.get('table_update_ms'), '.2f')} | "
                     f"{fmt(r.get('data_wait_ms'), '.2f')} | "
                     f"{peak(r) if p.device_type == 'cuda' else 'no CUDA'} |")
    lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {mark(c['ok'])} | {c['detail']} |" for c in checks]
    if ratios:
        lines += ["", "| comparison | measured | goal |", "| --- | --- | --- |"]
        lines += [f"| {g['goal']} | {g['value']} | {'' if g['ok'] is None else mark(g['ok'])} |" for g in ratios]
    return "\n".join(lines)


def finish(results: dict[str, dict], p: Plan, header: str, out: Path | None = None) -> int:
    """Print the summary (and write it, with the results, under ``out``); 1 if a correctness check failed."""
    checks, ratios = checks_from(results, p), ratios_from(results, p.batch_size)
    table = summary_table(results, checks, ratios, p, header)
    print("\n" + table, flush=True)
    failed = [c for c in checks if c["ok"] is False]
    if out is not None:
        (out / "summary.md").write_text(table + "\n", encoding="utf-8")
        (out / "results.json").write_text(json.dumps({"plan": asdict(p), "results": results, "checks": checks,
                                                      "comparisons": ratios}, indent=1, default=str) + "\n")
    for c in failed:  # one line per reason
        for line in c.get("reasons") or [c["detail"]]:
            print(f"FAIL: {c['check']}: {line}", file=sys.stderr, flush=True)
    return 1 if failed else 0

