"""Tagging quality: the defaults beside the frequency prior and the dense BCE head, over seeds.

    python -m im2vec.bench.quality                        # both data sets, 3 seeds (~1 h on 2 cores)
    python -m im2vec.bench.quality --data openclipart --variant lr3 optim.lr=3e-3   # a setting beside them
    python -m im2vec.bench.quality --multirun multirun/train/<time>   # the table of a Hydra -m sweep

Each run is ``train(cfg)`` (what ``python train.py`` does): fit on the training split, choose γ on the
validation split (uploaders not seen in training), then score the test split (uploaders seen in
neither) at that γ. Every head trains the same trunk for the same batches; the prior needs no
training (every image gets s = log count(t)). Figures: precision@1, precision@5, recall@10 and mAP
per image, macro precision@5 (per tag, then averaged over the tags present in the test split) and
the same over the rarer half of the vocabulary, as mean ± sd over seeds; on the generated corpus also
precision@5 against the clean tags and the noise share of the top 5.

Data sets:
- ``openclipart``: the real development set (``python -m im2vec.bench.openclipart``), under
  ``--data-dir`` (default: ``$IM2VEC_DATA`` or ``data``): ``+experiment=openclipart``;
- ``corpus``: the generated default corpus (``python train.py``'s).

Runs are appended to ``--json`` (JSON lines) as they finish; a run already there (same data set,
variant overrides and seed) is not run again, so an interrupted benchmark continues.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import yaml

from im2vec.errors import ArgumentParser, BadValue, NotFound, run_cli

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ sits beside the package
COLUMNS = [("P@1", "tagging/precision@1"), ("P@5", "tagging/precision@5"), ("R@10", "tagging/recall@10"),
           ("mAP", "tagging/map"), ("macro P@5", "tagging/tag_precision@5"),
           ("rare-half P@5", "tagging/tag_precision@5/rare")]
CORPUS_COLUMNS = [("clean P@5", "tagging/clean/precision@5"), ("noise@5", "tagging/noise_share@5")]  # where known
HEADS = {"sampled (defaults)": [], "full BCE head": ["sampler.head=full"]}


def data_overrides(name: str, data_dir: str) -> list[str]:
    if name == "openclipart":
        return ["+experiment=openclipart", f"paths.data_dir={data_dir}"]
    if name == "corpus":
        return []
    raise BadValue(f"quality: unknown data set {name!r}", "use openclipart or corpus")


def run_one(data: str, data_dir: str, overrides: list[str], seed: int, out: Path) -> dict:
    """One training run (train(cfg), γ chosen on validation) -> its test figures and the prior's."""
    from hydra import compose, initialize_config_dir

    from im2vec.training import train

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*data_overrides(data, data_dir), *overrides, f"seed={seed}",
                                          f"paths.output_dir={out}", "trainer.enable_progress_bar=false",
                                          "trainer.enable_model_summary=false"])
    metrics, _ = train(cfg)
    if "test/images" not in metrics:
        raise BadValue(f"quality: {data} has no test split: nothing to report", "build the data set with a test split")
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "val/", "info/"))}


def _key(r: dict) -> tuple:
    return r["data"], tuple(r["overrides"]), r["seed"]


def load(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run(datasets: list[str], variants: dict[str, list[str]], seeds: list[int], data_dir: str, path: Path,
        out: Path) -> list[dict]:
    done = {_key(r): r for r in load(path)}
    for data in datasets:
        for name, overrides in variants.items():
            for seed in seeds:
                rec = {"data": data, "variant": name, "overrides": list(overrides), "seed": seed}
                if _key(rec) in done:
                    continue
                slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
                print(f"quality: {data} · {name} {' '.join(overrides)} · seed {seed}", file=sys.stderr, flush=True)
                rec["metrics"] = run_one(data, data_dir, list(overrides), seed, out / data / slug / f"seed{seed}")
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
    """One row per (data set, variant): mean ± sd over its seeds; the prior's row from the same test images."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["data"], r["variant"], tuple(r["overrides"])), []).append(r)
    columns = COLUMNS + [c for c in CORPUS_COLUMNS if any(f"test/{c[1]}" in r["metrics"] for r in records)]
    head = f"| data | head / setting | seeds | {' | '.join(c for c, _ in columns)} | γ | minutes |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    shown_prior = set()
    for (data, variant, overrides), rs in groups.items():
        ms = [r["metrics"] for r in rs]
        if prior and data not in shown_prior:
            shown_prior.add(data)
            vals = [mean_sd([m.get(f"test/prior/{k}", math.nan) for m in ms][:1]) for _, k in columns]
            lines.append(f"| {data} | frequency prior | – | {' | '.join(vals)} | – | – |")
        label = variant + (f" ({' '.join(overrides)})" if overrides and variant not in HEADS else "")
        vals = [mean_sd([m.get(f"test/{k}", math.nan) for m in ms]) for _, k in columns]
        gammas = ", ".join(f"{g:g}" for g in sorted({m["test/gamma"] for m in ms if "test/gamma" in m})) or "–"
        minutes = statistics.fmean(m.get("info/seconds", math.nan) for m in ms) / 60
        lines.append(f"| {data} | {label} | {len(ms)} | {' | '.join(vals)} | {gammas} | {minutes:.1f} |")
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
        data = "openclipart" if "+experiment=openclipart" in rest else "corpus"
        rest = [o for o in rest if not o.startswith(("+experiment=", "paths.", "hydra.", "trainer.enable_"))]
        records.append({"data": data, "variant": " ".join(rest) or "defaults", "overrides": [], "seed": seed,
                        "metrics": json.loads(metrics.read_text())})
    if not records:
        raise NotFound(f"quality: no finished jobs (N/metrics.json with N/.hydra/overrides.yaml) in {folder}",
                       "give the folder of a finished python train.py -m sweep")
    return records


def main(argv: list[str] | None = None) -> str:
    ap = ArgumentParser(prog="python -m im2vec.bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["openclipart", "corpus"], choices=("openclipart", "corpus"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS),
                    help="the heads to train (the prior is always shown)")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                    help="another setting to train beside the heads: a name and Hydra overrides")
    ap.add_argument("--data-dir", default=os.environ.get("IM2VEC_DATA", "data"),
                    help="where python -m im2vec.bench.openclipart wrote openclipart/ (default: $IM2VEC_DATA or data)")
    ap.add_argument("--json", default="bench-quality.jsonl", help="runs are appended here, and not run again")
    ap.add_argument("--out", default="outputs/quality", help="the runs' output folders (TensorBoard, checkpoints)")
    ap.add_argument("--multirun", default=None, help="only print the table of a Hydra -m sweep's folder")
    a = ap.parse_args(argv)
    if a.multirun:
        text = table(from_multirun(Path(a.multirun)))
    else:
        variants = {h: HEADS[h] for h in a.heads} | {v[0]: v[1:] for v in a.variant}
        wanted = {(d, tuple(o)) for d in a.data for o in variants.values()}
        records = run(a.data, variants, a.seeds, a.data_dir, Path(a.json), Path(a.out))
        text = table([r for r in records if (r["data"], tuple(r["overrides"])) in wanted and r["seed"] in a.seeds])
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
