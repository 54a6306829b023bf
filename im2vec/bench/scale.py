"""The seed's experiment at YFCC's scale: sampling methods for the wide part at 60k and 600k tags.

    python -m im2vec.bench.scale                                 # 60k and 600k tags, every arm, seeds 0-2
    python -m im2vec.bench.scale --sizes 60000 --seeds 0 --arms "ns a0.75 b0,softmax logQ"
    python -m im2vec.bench.scale --dry-run                       # a tiny corpus, two arms, a few batches
    python -m im2vec.bench.scale --table                         # the table and plots of what --json holds

**Data.** The generated corpus at YFCC's shape (README's 600k-tag option): 30,000 training photos whose
user tags, camera brands, years and generic junk are as in the default corpus, plus a Zipfian long tail of
60 tags a photo drawn from 1M distinct tags (exponent 0.5), a vocabulary of every tag seen at least once cut
to the V most frequent (``--sizes``). **Features** come from a trunk trained on the images (the default run's:
``--trunk CKPT``, else one default run is trained first into ``--out``/trunk) through the frozen-trunk fast
mode (``python -m im2vec.train.features``, once per split), so the image side carries real signal and each
arm trains W and the table only (``+experiment=features``).

**Arms** (each ``train(cfg)`` at ``--samples`` samples, 3 seeds): negative sampling with α ∈ {0, 0.5, 0.75,
1} and β ∈ {0, 0.5, 1}; sampled softmax with logQ; in-batch softmax; shared negatives (K = 2,048 a batch);
lazy Adam and row-wise Adagrad (beside SparseAdam, the default); the full BCE head at 60k (its step time is
reported: it grows ∝ V, so 600k is projected from it, not run).

**Figures** per run, from its closing test pass (γ chosen on validation): P@5 (observed tags), clean P@5,
noise share of the top 5, recall@5 of the tags seen at most 10 times in training (``tag_recall@5/le10``:
macro over those tags), and validation P@5 at each validation (four a run) against the run's seconds
(wall clock on this machine; CPU seconds of the whole run beside it): the time-to-quality curves, one PNG
per size in ``--out``. Runs are appended to ``--json`` as they finish; a run already there is skipped.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from im2vec.bench.quality import ROOT, load, mean_sd
from im2vec.errors import ArgumentParser, BadValue, UserError, run_cli

SCALE_DATA = ["data.corpus.num_train=30000", "data.corpus.tail_size=1000000", "data.corpus.tail_per_image=60",
              "data.corpus.tail_exponent=0.5", "data.vocab_min_count=1"]
DRY_DATA = ["data.corpus.num_train=400", "data.corpus.num_val=100", "data.corpus.num_test=100",
            "data.corpus.tail_size=20000", "data.corpus.tail_per_image=20", "data.corpus.tail_exponent=0.5",
            "data.corpus.shard_size=200", "data.corpus.num_users=20", "data.vocab_min_count=1"]


def _arms() -> dict[str, list[str]]:
    arms = {}
    for a in (0, 0.5, 0.75, 1):
        for b in (0, 0.5, 1):
            arms[f"ns a{a:g} b{b:g}"] = [f"sampler.alpha={a}", f"sampler.beta={b}"]
    arms.update({
        "softmax logQ": ["sampler.loss=softmax"],
        "in-batch": ["sampler.loss=in_batch"],
        "shared K=2048": ["sampler.negatives=shared", "sampler.num_negatives=2048"],
        "lazy_adam": ["optim.table_optimizer=lazy_adam"],
        "row_adagrad": ["optim.table_optimizer=row_adagrad"],
        "BCE head": ["sampler.head=full"],
    })
    return arms


ARMS = _arms()
BCE_MAX_TAGS = 100_000  # the full head is run up to here; above, its step time is projected (∝ V)
FIGURES = [("P@5", "test/tagging/precision@5"), ("clean P@5", "test/tagging/clean/precision@5"),
           ("noise@5", "test/tagging/noise_share@5"), ("recall@5 seen ≤ 10", "test/tagging/tag_recall@5/le10"),
           ("prior P@5", "test/prior/tagging/precision@5")]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, "trainer.enable_progress_bar=false",
                                                 "trainer.enable_model_summary=false"])


def corpus_dir(data: list[str]) -> Path:
    from omegaconf import OmegaConf

    from im2vec.data.corpus import CorpusSpec, ensure_corpus

    cfg = compose(data)
    return ensure_corpus(cfg.data.cache_dir, CorpusSpec(**OmegaConf.to_container(cfg.data.corpus, resolve=True)))


def ensure_trunk(out: Path, trunk: str | None, dry: bool) -> Path:
    """A checkpoint whose trunk makes the features: ``trunk``, or the default run trained once into ``out``/trunk."""
    if trunk:
        if not Path(trunk).exists():
            raise BadValue(f"scale: --trunk {trunk} does not exist", "give a training checkpoint, or leave it out")
        return Path(trunk)
    ckpt = out / "trunk" / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        from im2vec.train.training import train

        extra = [*DRY_DATA, "trainer.max_epochs=1", "data.batches_per_epoch=4"] if dry else []
        print(f"scale: training the trunk (the default run) into {ckpt.parent.parent}", file=sys.stderr, flush=True)
        train(compose([*extra, f"paths.output_dir={out / 'trunk'}", "seed=0"]))
    return ckpt


def ensure_features(ckpt: Path, corpus: Path, feats: Path) -> None:
    """The corpus's three splits through the checkpoint's trunk (one extraction each, kept)."""
    for split in ("train", "val", "test"):
        if (feats / split / "features.json").is_file():
            continue
        print(f"scale: features of {corpus.name}/{split} through {ckpt}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "im2vec.train.features", str(ckpt), str(corpus / f"{split}-*.tar"),
                        "--out", str(feats / split)], check=True)


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(seconds since the run's log was opened, validation P@5) at each validation, from its TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points, starts = [], []
    files = sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    if not files:
        return []
    pid = files[-1].name.split(".")[-2]  # events.out.tfevents.<time>.<host>.<pid>.<n>: the last run's process only
    for f in (f for f in files if f.name.split(".")[-2] == pid):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        tags = ea.Tags().get("scalars", [])
        starts.append(ea.FirstEventTimestamp())  # the log's opening: the run's start (before its first batch)
        if "val/precision@5" in tags:
            points += [(e.wall_time, e.value) for e in ea.Scalars("val/precision@5")]
    if not points:
        return []
    t0 = min(starts) if starts else points[0][0]
    return [(round(t - t0, 2), v) for t, v in sorted(points)]


def run_one(size: int, arm: str, seed: int, feats: Path, data: list[str], samples: int, out: Path) -> dict:
    """One arm's run: W and the table trained on the features at V = ``size`` -> its figures, curve and seconds."""
    from im2vec.train.training import train

    run_dir = out / f"v{size}" / "".join(c if c.isalnum() else "_" for c in arm) / f"seed{seed}"
    overrides = ["+experiment=features", f"data.features_dir={feats}", *data, f"data.vocab_max_size={size}",
                 "sampler.head=sampled", *ARMS[arm], f"seed={seed}", f"train_samples={samples}",
                 f"paths.output_dir={run_dir}"]
    if run_dir.exists():  # a run stopped before it was recorded: start it again from nothing
        shutil.rmtree(run_dir)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    metrics, _ = train(compose(overrides))
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    if metrics.get("info/preempted"):
        raise UserError(f"scale: the {arm} run at {size:,} tags was stopped by a signal", "run the benchmark again")
    keep = {k: v for k, v in metrics.items() if k.startswith(("test/", "info/")) or k == "val/precision@5"}
    return {"size": size, "arm": arm, "seed": seed, "seconds": seconds, "cpu_seconds": cpu,
            "images_per_s": samples / seconds, "curve": curve(run_dir), "metrics": keep}


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def table(records: list[dict]) -> str:
    lines = ["| tags | arm | runs | " + " | ".join(n for n, _ in FIGURES) + " | seconds | CPU s |",
             "| ---: | --- | ---: |" + " ---: |" * (len(FIGURES) + 2)]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["size"], r["arm"]), []).append(r)
    order = list(ARMS)
    for (size, arm), rs in sorted(groups.items(), key=lambda x: (x[0][0], order.index(x[0][1]) if x[0][1] in order else 99)):
        cells = [mean_sd([r["metrics"].get(key, math.nan) for r in rs]) for _, key in FIGURES]
        lines.append(f"| {size:,} | {arm} | {len(rs)} | " + " | ".join(cells) +
                     f" | {_whole(r['seconds'] for r in rs)} | {_whole(r['cpu_seconds'] for r in rs)} |")
    bce = [r for r in records if r["arm"] == "BCE head" and r.get("images_per_s")]
    for r in bce[:1]:
        lines.append(f"BCE head at {r['size']:,} tags: {r['images_per_s']:,.0f} images/s over the whole run (validation "
                     f"included); its step is ∝ V, so at 600,000 tags ≈ {r['images_per_s'] * r['size'] / 600_000:,.0f} "
                     "images/s (projected, not run)")
    return "\n".join(lines)


def _whole(xs) -> str:
    """Seconds as a whole number, mean ± sd over the runs."""
    xs = list(xs)
    sd = f" ± {statistics.stdev(xs):.0f}" if len(xs) > 1 else ""
    return f"{statistics.fmean(xs):.0f}{sd}"


def plots(records: list[dict], out: Path) -> list[Path]:
    """One PNG per size, each arm's seeds' mean validation P@5 at each validation: against the training samples
    seen (the validations are evenly spaced in samples; the same for every arm, whatever the machine's load), and
    against the run's wall-clock seconds (which the load of the machine moves: compare runs made side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for size in sorted({r["size"] for r in records}):
        fig, (by_samples, by_seconds) = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
        for j, arm in enumerate(ARMS):
            rs = [r for r in records if r["size"] == size and r["arm"] == arm and r["curve"]]
            if not rs:
                continue
            style = {"marker": "o", "color": plt.cm.tab20(j % 20), "linestyle": "-" if arm.startswith("ns ") else "--"}
            n = min(len(r["curve"]) for r in rs)
            samples = round(rs[0]["images_per_s"] * rs[0]["seconds"])
            ys = [sum(r["curve"][i][1] for r in rs) / len(rs) for i in range(n)]
            label = f"{arm} ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
            by_samples.plot([samples * (i + 1) / n for i in range(n)], ys, label=label, **style)
            by_seconds.plot([sum(r["curve"][i][0] for r in rs) / len(rs) for i in range(n)], ys, label=label, **style)
        by_samples.set_xlabel("training samples")
        by_samples.set_ylabel("validation P@5")
        by_seconds.set_xlabel("seconds of training (wall clock, this machine, under the load of the day)")
        fig.suptitle(f"{size:,} tags: validation P@5 during training")
        by_seconds.legend(fontsize=7, ncol=2)
        for ax in (by_samples, by_seconds):
            ax.grid(alpha=0.3)
        path = out / f"scale_{size}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[dict]:
    ap = ArgumentParser(prog="python -m im2vec.bench.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="60000,600000", help="vocabulary sizes V, comma-separated")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: " + ", ".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=240_000, help="training samples a run (8 passes over 30,000)")
    ap.add_argument("--trunk", default=None, help="a training checkpoint whose trunk makes the features")
    ap.add_argument("--out", default="outputs/scale", help="runs, features, plots")
    ap.add_argument("--json", default=None, help="runs as JSON lines (default: OUT/scale.jsonl)")
    ap.add_argument("--table", action="store_true", help="only print the table and write the plots of --json")
    ap.add_argument("--dry-run", action="store_true", help="a tiny corpus, 2 arms, 1 seed, a few batches")
    a = ap.parse_args(argv)
    out = Path(a.out)
    path = Path(a.json) if a.json else out / "scale.jsonl"
    if a.dry_run:
        a.sizes, a.seeds, a.samples = "2000", "0", 1024
        a.arms = a.arms if a.arms != ",".join(ARMS) else "ns a0.75 b0,softmax logQ"
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x]
        seeds = [int(x) for x in a.seeds.split(",") if x]
    except ValueError:
        ap.error("--sizes and --seeds take whole numbers, comma-separated")
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    unknown = [x for x in arms if x not in ARMS]
    if unknown or not arms or not sizes or not seeds or min(sizes) < 2 or a.samples < 1:
        ap.error(f"--arms {unknown or a.arms!r}: use some of {', '.join(ARMS)}; sizes ≥ 2, samples ≥ 1")
    done = {(r["size"], r["arm"], r["seed"]): r for r in load(path)}
    if not a.table:
        data = [*DRY_DATA, "data.batches_per_epoch=4"] if a.dry_run else SCALE_DATA
        out.mkdir(parents=True, exist_ok=True)
        ckpt = ensure_trunk(out, a.trunk, a.dry_run)
        corpus = corpus_dir(data)
        feats = out / "features" / corpus.name
        ensure_features(ckpt, corpus, feats)
        for size in sizes:
            for arm in arms:
                if arm == "BCE head" and size > BCE_MAX_TAGS:
                    continue
                for seed in seeds:
                    if (size, arm, seed) in done:
                        continue
                    print(f"scale: {size:,} tags · {arm} · seed {seed}", file=sys.stderr, flush=True)
                    rec = run_one(size, arm, seed, feats, data, a.samples, out)
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[size, arm, seed] = rec
    records = list(done.values())
    print(table(records))
    for p in plots(records, out):
        print(f"wrote {p}")
    return records


if __name__ == "__main__":
    run_cli(main)
