"""Tagging quality on every real collection and both split kinds: the recipe beside the frequency prior,
the BCE head and a dense CNN at the same budget, over seeds.

    python -m im2vec.bench.quality                         # every collection × split kind × arm × 3 seeds
    python -m im2vec.bench.quality --data emoji --splits random --variant tau0 data.user_temperature=0
    python -m im2vec.bench.quality --gamma-rules           # how each rule for γ would have done (no training)
    python -m im2vec.bench.quality --multirun multirun/train/<time>   # the table of a Hydra -m sweep

Each run is ``train(cfg)`` (what ``python train.py`` does): fit on the training split, choose γ on the
validation split, score the test split at that γ. Arms, all at the recipe's budget (same trunk, images,
crops, batches): ``recipe`` (the defaults as they are: ``sampler.head=auto`` is the full head up to
20,000 tags, so on the collections it is the ``BCE head`` run under another name), ``sampled head``
(``sampler.head=sampled``: negative sampling), ``BCE head`` (``sampler.head=full``: a logit for each
of the V tags through the same table) and ``dense CNN``
(``im2vec.bench.dense``: the plain multi-label CNN a researcher would write). The prior needs no
training (every image gets s = log count(t)) and is read off any run's test figures.

Data (``--data-dir``, default ``$IM2VEC_DATA`` or ``data``; each written by its builder):
- ``openclipart``: 7.9k drawings by 500 uploaders, 11 of them prolific (``python -m im2vec.bench.openclipart``);
- ``emoji``: 4 vendors' emoji, ~1,900 each, every vendor drawing the same concepts (``python -m im2vec.bench.emoji``);
- ``openmoji``: OpenMoji's drawings by their ~120 authors, one style (``python -m im2vec.bench.openmoji``);
each in two split kinds: ``users`` (validation and test uploaders never seen in training) and
``random`` (images held out at random); and ``corpus``, the generated default corpus (its own split,
by uploader).

Runs are appended to ``--json`` (JSON lines) as they finish; a run already there (same data, split,
overrides and seed) is not run again, so an interrupted benchmark continues.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import yaml

from im2vec.errors import ArgumentParser, BadValue, NotFound, UserError, run_cli

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ sits beside the package
COLUMNS = [("P@1", "tagging/precision@1"), ("P@5", "tagging/precision@5"), ("R@10", "tagging/recall@10"),
           ("mAP", "tagging/map"), ("macro P@5", "tagging/tag_precision@5"),
           ("rare-half P@5", "tagging/tag_precision@5/rare")]
CORPUS_COLUMNS = [("clean P@5", "tagging/clean/precision@5"), ("noise@5", "tagging/noise_share@5")]  # where known
DENSE = "+arm=dense"  # not a Hydra override: run_one trains im2vec.bench.dense instead of train()
HEADS = {"recipe": [], "sampled head": ["sampler.head=sampled"], "BCE head": ["sampler.head=full"], "dense CNN": [DENSE]}
COLLECTIONS = ("openclipart", "emoji", "openmoji")
DATASETS = (*COLLECTIONS, "corpus")
SPLITS = ("users", "random")


def data_overrides(name: str, data_dir: str) -> list[str]:
    """Hydra overrides for a data label: ``corpus`` or ``<collection>/<split kind>``."""
    if name == "corpus":
        return []
    collection, _, kind = name.partition("/")
    if collection not in COLLECTIONS or kind not in SPLITS:
        raise BadValue(f"quality: unknown data set {name!r}",
                       f"use corpus or <{'|'.join(COLLECTIONS)}>/<{'|'.join(SPLITS)}>")
    return [f"+experiment={collection}", f"paths.data_dir={data_dir}", f"split_kind={kind}"]


def labels(datasets: list[str], splits: list[str]) -> list[str]:
    """The data labels to run: every collection in every split kind; the corpus once (its own split)."""
    return [d if d == "corpus" else f"{d}/{s}" for d in datasets for s in (["users"] if d == "corpus" else splits)]


def run_one(data: str, data_dir: str, overrides: list[str], seed: int, out: Path) -> dict:
    """One run (train(cfg), or the dense CNN) -> its test figures, the prior's, validation's and the γ sweeps."""
    from hydra import compose, initialize_config_dir

    dense = DENSE in overrides
    overrides = [o for o in overrides if o != DENSE]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*data_overrides(data, data_dir), *overrides, f"seed={seed}",
                                          f"paths.output_dir={out}", "trainer.enable_progress_bar=false",
                                          "trainer.enable_model_summary=false"])
    if dense:
        from im2vec.bench.dense import train_dense

        metrics = train_dense(cfg)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    else:
        from im2vec.train.training import train

        metrics, _ = train(cfg)
    if metrics.get("info/preempted"):
        raise UserError(f"quality: the {data} run was stopped by a signal (its checkpoint is in {out})",
                        "run the benchmark again: finished runs are kept in --json")
    if "test/images" not in metrics:
        raise BadValue(f"quality: {data} has no test split: nothing to report", "build the data set with a test split")
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "val/", "val_gamma/", "info/"))}


def _key(r: dict) -> tuple:
    return r["data"], tuple(r["overrides"]), r["seed"]


def load(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run(datasets: list[str], variants: dict[str, list[str]], seeds: list[int], data_dir: str, path: Path,
        out: Path, extra: list[str] = ()) -> list[dict]:
    """Every (data, variant, seed) not in ``path`` yet, run and appended to it. ``extra``: overrides for every run
    that do not change its figures' meaning (threads.trunk=1 to run two benchmarks side by side): recorded with the
    run, not part of its identity."""
    done = {_key(r): r for r in load(path)}
    for data in datasets:
        for name, overrides in variants.items():
            for seed in seeds:
                rec = {"data": data, "variant": name, "overrides": list(overrides), "seed": seed}
                if _key(rec) in done:
                    continue
                slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
                print(f"quality: {data} · {name} {' '.join(overrides)} · seed {seed}", file=sys.stderr, flush=True)
                rec["metrics"] = run_one(data, data_dir, [*overrides, *extra], seed,
                                         out / data.replace("/", "_") / slug / f"seed{seed}")
                if extra:
                    rec["extra"] = list(extra)
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                done[_key(rec)] = rec
    return list(done.values())


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(records: list[dict], prior: bool = True) -> str:
    """One row per (data set, variant): mean ± sd over its seeds; the prior's row from the same test images;
    × prior: the mean P@5 over the prior's."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["data"], r["variant"], tuple(r["overrides"])), []).append(r)
    columns = COLUMNS + [c for c in CORPUS_COLUMNS if any(f"test/{c[1]}" in r["metrics"] for r in records)]
    head = f"| data | head / setting | seeds | {' | '.join(c for c, _ in columns)} | × prior | γ | minutes |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    shown_prior = set()
    for (data, variant, overrides), rs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        ms = [r["metrics"] for r in rs]
        p5 = [m.get("test/prior/tagging/precision@5", math.nan) for m in ms][:1]
        if prior and data not in shown_prior:
            shown_prior.add(data)
            vals = [mean_sd([m.get(f"test/prior/{k}", math.nan) for m in ms][:1]) for _, k in columns]
            lines.append(f"| {data} | frequency prior | – | {' | '.join(vals)} | 1.00 | – | – |")
        label = variant + (f" ({' '.join(overrides)})" if overrides and variant not in HEADS else "")
        vals = [mean_sd([m.get(f"test/{k}", math.nan) for m in ms]) for _, k in columns]
        ratio = statistics.fmean(m.get("test/tagging/precision@5", math.nan) for m in ms) / p5[0] if p5 else math.nan
        gammas = ", ".join(f"{g:g}" for g in sorted({m["test/gamma"] for m in ms if "test/gamma" in m})) or "–"
        minutes = statistics.fmean(m.get("info/seconds", math.nan) for m in ms) / 60
        lines.append(f"| {data} | {label} | {len(ms)} | {' | '.join(vals)} | {ratio:.2f} | {gammas} | {minutes:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- how each rule for γ would have done
RULES = ("best", "within", "1se", "oracle")


def rule_choices(m: dict) -> dict[str, float] | None:
    """From one run's validation γ sweep (the criterion, its paired bootstrap against the best γ), the γ each
    rule picks: best (the best point figure), within (the largest γ not worse than the best beyond the 90 %
    interval), 1se (the largest γ within one paired standard error of the best), oracle (the test split's best:
    what no rule can know). None for runs without the sweep's intervals."""
    hi = {float(k.rsplit("/", 1)[1]): v for k, v in m.items() if k.startswith("val_gamma/") and "_diff_hi/" in k}
    if not hi:
        return None
    crit = next(k for k in m if "_diff_hi/" in k).split("/")[1].rsplit("_diff_hi", 1)[0]
    gammas = sorted(hi)
    point = {g: m.get(f"val_gamma/{crit}/{g:g}", m.get(f"val_gamma/precision@5/{g:g}")) for g in gammas}
    sd = {g: m[f"val_gamma/{crit}_diff_sd/{g:g}"] for g in gammas}
    best = m.get("val/best_gamma", max(gammas, key=lambda g: (point[g], -g)))
    test = {g: m.get(f"test/gamma_sweep/precision@5/{g:g}", math.nan) for g in gammas}
    return {"best": best, "within": max(g for g in gammas if hi[g] >= 0 or g == best),
            "1se": max(g for g in gammas if point[g] >= point[best] - sd[g] or g == best),
            "oracle": max(gammas, key=lambda g: (test[g], -g))}


def gamma_rules(records: list[dict]) -> str:
    """Mean test P@5 at the γ each rule picks on validation, per data set (the arms with a γ: not the dense CNN)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["data"], []).append(r)
    lines = ["| data | runs | " + " | ".join(f"test P@5, γ by {r}" for r in RULES) + " |", "|" + " --- |" * (2 + len(RULES))]
    for data, rs in sorted(groups.items()):
        rows = []
        for r in rs:
            pick = rule_choices(r["metrics"])
            if pick:
                rows.append([r["metrics"].get(f"test/gamma_sweep/precision@5/{pick[k]:g}", math.nan) for k in RULES])
        if rows:
            lines.append(f"| {data} | {len(rows)} | " + " | ".join(mean_sd([x[i] for x in rows]) for i in range(len(RULES)))
                         + " |")
    return "\n".join(lines)


def from_multirun(folder: Path) -> list[dict]:
    """The jobs of a Hydra ``-m`` sweep (``multirun/…/N/``), grouped by their overrides less ``seed``."""
    records = []
    for job in sorted(folder.glob("*/"), key=lambda p: (len(p.name), p.name)):
        metrics, overrides = job / "metrics.json", job / ".hydra" / "overrides.yaml"
        if not metrics.is_file() or not overrides.is_file():
            continue
        ovr = yaml.safe_load(overrides.read_text()) or []
        seed = next((int(o.split("=", 1)[1]) for o in ovr if o.startswith("seed=")), 0)
        rest = [o for o in ovr if not o.startswith("seed=")]
        exp = next((o.split("=", 1)[1] for o in rest if o.startswith("+experiment=")), None)
        kind = next((o.split("=", 1)[1] for o in rest if o.startswith("split_kind=")), "users")
        data = f"{exp}/{kind}" if exp in COLLECTIONS else "corpus"
        rest = [o for o in rest if not o.startswith(("+experiment=", "paths.", "hydra.", "trainer.enable_", "split_kind="))]
        records.append({"data": data, "variant": " ".join(rest) or "defaults", "overrides": [], "seed": seed,
                        "metrics": json.loads(metrics.read_text())})
    if not records:
        raise NotFound(f"quality: no finished jobs (N/metrics.json with N/.hydra/overrides.yaml) in {folder}",
                       "give the folder of a finished python train.py -m sweep")
    return records


def main(argv: list[str] | None = None) -> str:
    ap = ArgumentParser(prog="python -m im2vec.bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="split kinds of the collections")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS),
                    help="the arms to train (the prior is always shown)")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                    help="another setting to train beside the arms: a name and Hydra overrides")
    ap.add_argument("--data-dir", default=os.environ.get("IM2VEC_DATA", "data"),
                    help="where the collection builders wrote their folders (default: $IM2VEC_DATA or data)")
    ap.add_argument("--json", default="bench-quality.jsonl", help="runs are appended here, and not run again")
    ap.add_argument("--out", default="outputs/quality", help="the runs' output folders (TensorBoard, checkpoints)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run, not part of its identity "
                    "(e.g. threads.trunk=1 to run two benchmarks side by side on 2 cores)")
    ap.add_argument("--multirun", default=None, help="only print the table of a Hydra -m sweep's folder")
    ap.add_argument("--gamma-rules", action="store_true", help="only print how each rule for γ did on the runs in --json")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs already in --json")
    a = ap.parse_args(argv)
    wanted_data = labels(a.data, a.splits)
    if a.multirun:
        text = table(from_multirun(Path(a.multirun)))
    elif a.gamma_rules:
        text = gamma_rules([r for r in load(Path(a.json)) if r["data"] in wanted_data and DENSE not in r["overrides"]])
    else:
        variants = {h: HEADS[h] for h in a.heads} | {v[0]: v[1:] for v in a.variant}
        wanted = {(d, tuple(o)) for d in wanted_data for o in variants.values()}
        records = load(Path(a.json)) if a.table else run(wanted_data, variants, a.seeds, a.data_dir, Path(a.json),
                                                         Path(a.out), a.extra)
        text = table([r for r in records if (r["data"], tuple(r["overrides"])) in wanted and r["seed"] in a.seeds])
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
