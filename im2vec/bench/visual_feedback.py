"""Tag visualness fed back into training, measured: all tags, the visual ones only, non-visual ones as negatives only.

    python -m im2vec.bench.visual_feedback                              # the built-in corpus, seeds 0, 1, 2
    python -m im2vec.bench.visual_feedback --baseline 'runs/vis/seed{seed}/checkpoints/last.ckpt'
    python -m im2vec.bench.visual_feedback --table                      # the table of what --json holds

Per seed: the **baseline** (``python train.py seed=S`` with the given overrides, or an existing checkpoint of
that run: ``--baseline``), its visualness TSV from its **validation** images (``python -m im2vec.visualness``;
the test split is not looked at), then two runs with the file fed back (``data.visual_tags=TSV``):

- ``only``: the tags marked 0 kept out of the vocabulary: never a positive, never a negative, never predicted;
- ``negatives``: they stay in the vocabulary, but no image has them as a tag in training: they are drawn only
  as negatives (pushed away from every image), and can still be predicted.

All three checkpoints are scored on the same test photos (those with a tag of the baseline's vocabulary) against
the same truth, by tag name: P@1 and P@5 of the observed tags, P@5 of the observed tags the file does not mark 0
("visual P@5"), clean P@5 and the noise share of the top 5 (where the data knows its clean tags), the share of the
top 5 the file marks 0, each model with its own γ (chosen on validation by training).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from im2vec.bench.quality import load, mean_sd
from im2vec.bench.scale import compose
from im2vec.errors import ArgumentParser, NotFound, make, run_cli

ARMS = ("all tags", "visual only", "non-visual as negatives")
USE = {"visual only": "only", "non-visual as negatives": "negatives"}
FIGURES = [("P@1", "p1"), ("P@5", "p5"), ("visual P@5", "visual_p5"), ("clean P@5", "clean_p5"),
           ("noise@5", "noise5"), ("marked 0 @5", "nonvisual5"), ("vocabulary", "tags")]


def train_run(overrides: list[str], out: Path) -> Path:
    from im2vec.train.training import train

    ckpt = out / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        train(compose([*overrides, f"paths.output_dir={out}"]))
    return ckpt


def visual_file(ckpt: Path, dm, out: Path) -> Path:
    """The baseline's visualness TSV from its validation images (never its test split); ``dm``: the runs' data."""
    from im2vec.use.visualness import from_checkpoint

    if not out.exists():
        if not dm.val_shards:
            raise NotFound(f"visual_feedback: {ckpt} has no validation split", "the file must not come from test images")
        from_checkpoint(str(ckpt), list(dm.val_shards), out=out, log=lambda m: print(m, file=sys.stderr),
                        tensorboard=out.with_suffix(".tensorboard"))
    return out


def score(ckpts: dict[str, Path], dm, nonvisual: set[str], max_images: int | None = None) -> dict[str, dict]:
    """Every checkpoint on the runs' test photos (``dm``'s) and the baseline's (the first's) truth, by tag name."""
    from im2vec.eval.heldout import embed_shards
    from im2vec.eval.metrics import noise_share, precision_at_k
    from im2vec.eval.scoring import topk_tags
    from im2vec.train.checkpoint import load_model

    models = {arm: load_model(p) for arm, p in ckpts.items()}
    base = next(iter(models.values()))
    data = embed_shards(list(models.values()), list(dm.test_shards), base.image_size, 256, 1, max_images)
    index = {t: i for i, t in enumerate(base.tags)}
    obs, clean = data["obs"], data["clean"]
    zero = torch.tensor([index[t] for t in nonvisual if t in index] or [-2])
    visual = obs.masked_fill(torch.isin(obs, zero), -1)
    content = getattr(dm, "content_tags", None)
    noise_ids = torch.tensor([i for i, t in enumerate(base.tags) if t not in content]) if content else None
    out = {}
    for (arm, m), u in zip(models.items(), data["u"]):
        _, ids = topk_tags(u, m.table, m.log_counts, [m.gamma], 5)[m.gamma]
        to_base = torch.tensor([index.get(t, -3) for t in m.tags])
        pred = to_base[ids]  # (N, 5) ids of the baseline's vocabulary
        out[arm] = {"p1": precision_at_k(pred, obs, 1), "p5": precision_at_k(pred, obs, 5),
                    "visual_p5": precision_at_k(pred, visual, 5), "nonvisual5": noise_share(pred, zero, 5),
                    "clean_p5": precision_at_k(pred, clean, 5) if content else math.nan,
                    "noise5": noise_share(pred, noise_ids, 5) if content else math.nan,
                    "tags": len(m.tags), "gamma": m.gamma, "images": len(data["keys"])}
    return out


def table(records: list[dict]) -> str:
    lines = ["| data | arm | seeds | " + " | ".join(n for n, _ in FIGURES) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(FIGURES)]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["label"], r["arm"]), []).append(r)
    for (label, arm), rs in sorted(groups.items(), key=lambda x: (x[0][0], ARMS.index(x[0][1]))):
        cells = [mean_sd([r.get(key, math.nan) for r in rs]) if key != "tags" else f"{sum(r[key] for r in rs) / len(rs):,.0f}"
                 for _, key in FIGURES]
        lines.append(f"| {label} | {arm} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = ArgumentParser(prog="python -m im2vec.bench.visual_feedback", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="train.py overrides of every run (default: the default run)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--label", default="corpus", help="the data's name in the table")
    ap.add_argument("--baseline", default=None,
                    help="an existing checkpoint of the baseline run, with {seed} (else it is trained into --out)")
    ap.add_argument("--visual-tags", default=None, help="use this file (with {seed}) instead of the baseline's own")
    ap.add_argument("--out", default="outputs/visual_feedback")
    ap.add_argument("--json", default=None, help="results as JSON lines (default: OUT/visual_feedback.jsonl)")
    ap.add_argument("--max-images", type=int, default=None, help="test photos scored (default: all)")
    ap.add_argument("--table", action="store_true", help="only print the table of --json")
    a = ap.parse_args(argv)
    out = Path(a.out)
    path = Path(a.json) if a.json else out / "visual_feedback.jsonl"
    records = load(path)
    if not a.table:
        out.mkdir(parents=True, exist_ok=True)
        done = {(r["label"], r["seed"]) for r in records}
        for seed in [int(s) for s in a.seeds.split(",") if s]:
            if (a.label, seed) in done:
                continue
            run = out / a.label / f"seed{seed}"
            common = [*a.overrides, f"seed={seed}"]
            base = Path(a.baseline.format(seed=seed)) if a.baseline else train_run(common, run / "all")
            if not base.exists():
                raise NotFound(f"visual_feedback: no baseline checkpoint {base}", "train it, or leave --baseline out")
            # the runs' data, composed from their settings (a checkpoint of an older version may name old classes)
            dm = make(compose(common).data)
            tsv = Path(a.visual_tags.format(seed=seed)) if a.visual_tags else \
                visual_file(base, dm, run / "visual_tags_val.tsv")
            from im2vec.data.visual_file import read_nonvisual

            nonvisual = set(read_nonvisual(str(tsv)))
            ckpts = {"all tags": base}
            for arm, use in USE.items():
                ckpts[arm] = train_run([*common, f"data.visual_tags={tsv}", f"data.visual_use={use}"], run / use)
            figures = score(ckpts, dm, nonvisual, a.max_images)
            with open(path, "a", encoding="utf-8") as f:
                for arm, fig in figures.items():
                    rec = {"label": a.label, "seed": seed, "arm": arm, "nonvisual": len(nonvisual), **fig}
                    f.write(json.dumps(rec) + "\n")
                    records.append(rec)
            print(f"visual_feedback: {a.label} seed {seed}: " + ", ".join(
                f"{arm}: P@5 {fig['p5']:.3f} clean {fig['clean_p5']:.3f}" for arm, fig in figures.items()),
                file=sys.stderr, flush=True)
    print(table(records))
    return records


if __name__ == "__main__":
    run_cli(main)
