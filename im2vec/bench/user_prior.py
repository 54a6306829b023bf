"""Each uploader's own habits, measured: λ (and μ) of the per-user term chosen on validation, test figures with
and without it (im2vec/eval/user_prior.py has the score and the counts).

    python -m im2vec.bench.user_prior /work/runs/final/*/recipe/seed*/checkpoints/last.ckpt --out runs/user_prior
    python -m im2vec.bench.user_prior --table runs/user_prior/results.jsonl

For each checkpoint: the per-user counts of its own training shards (``OUT/<label>/<seed>/user_prior.pt``), its
validation and test images embedded once, then on validation every (λ, μ) of the grid scored (precision@5 per
image; where the images have clean tags, as the corpus's, clean precision@5 minus the noise share of the top 5, γ's
criterion there; a bootstrap over uploaders as γ's: im2vec/eval/intervals.py), the best taken (ties: the smaller λ), and
the test split ranked exactly (im2vec/eval/ranking.py) at λ = 0 and at the chosen (λ, μ). ``auto`` keeps the
chosen λ only where the paired 90 % interval of its validation gain over λ = 0 lies above 0, else 0.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from im2vec.eval.user_prior import LAMBDAS, MUS, choose_lambda, grid_p5, split_shards

METRICS = ("precision@1", "precision@5", "map")
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)  # --joint-gamma: γ chosen with λ, μ from these


def label_of(ckpt: str) -> tuple[str, str]:
    """(collection label, seed) from a run's path: …/<label>[/recipe]/seedN/checkpoints/last.ckpt."""
    parts = Path(ckpt).parts
    i = max((j for j, p in enumerate(parts) if re.fullmatch(r"seed\d+", p)), default=None)
    if i is None:
        return Path(ckpt).parent.parent.name, "seed?"
    j = i - 1
    while j > 0 and parts[j] in ("recipe", "runs"):
        j -= 1
    return parts[j], parts[i]


def exact(data: dict, model, prior, lam: float, mu: float) -> dict[str, float]:
    from im2vec.eval.ranking import KS, tagging_metrics
    from im2vec.eval.user_prior import rank_with_users

    from im2vec.tags import PAD

    truths = [data["obs"]] + ([data["clean"]] if bool((data["clean"] != PAD).any()) else [])  # clean: the corpus's
    r = rank_with_users(data["u"][0], model.table, model.log_counts, model.gamma, truths, data["users"],
                        prior, lam, mu, kmax=max(KS))
    m = tagging_metrics(r, 0, KS, None, model.table.shape[0])
    out = {k: m[k] for k in METRICS}
    if len(truths) > 1:  # the tags that describe the picture: does the term lift content or the uploader's noise?
        out["clean_precision@5"] = tagging_metrics(r, 1, KS, None, model.table.shape[0])["precision@5"]
    return out


def measure(ckpt: str, out: Path, lambdas=LAMBDAS, mus=MUS, max_images: int | None = None, batch_size: int = 256,
            num_workers: int = 1, log=print, label: str | None = None, beside: bool = False, by: str = "auto",
            gammas=()) -> dict:
    """One checkpoint: the prior built (or read) under ``out`` (``beside``: user_prior.pt beside the checkpoint, where
    Tagger and predict look for it), λ and μ chosen on validation and recorded in it, test with and without.
    ``gammas``: γ chosen with λ and μ (the test figures "with" and "auto" at that γ); the file is then left as it
    was (Tagger scores with the checkpoint's γ, which the recorded λ goes with)."""
    from im2vec.eval.heldout import embed_shards
    from im2vec.eval.user_prior import UserPrior, build_for_checkpoint
    from im2vec.train.checkpoint import load_model

    t0 = time.time()
    label, seed = label or label_of(ckpt)[0], label_of(ckpt)[1]
    model = load_model(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(ckpt).with_name("user_prior.pt") if beside else out / "user_prior.pt"
    prior = UserPrior.load(path) if path.is_file() else build_for_checkpoint(ckpt, out=path)[0]
    val_shards, test_shards, content = split_shards(model.data)
    size = model.image_size or model.data["image_size"]
    val, test = (embed_shards([model], s, size, batch_size, num_workers, max_images) for s in (val_shards, test_shards))
    chosen = choose_lambda(model, prior, val, content, lambdas, mus, by, gammas)
    lam, mu, auto = chosen["lam"], chosen["mu"], chosen["auto_lam"]
    at = replace(model, gamma=chosen["val_gamma"])  # the checkpoint's γ unless gammas
    at_auto = at if chosen["val_gain_lo"] > 0 else model
    lo, hi = chosen["val_gain_lo"], chosen["val_gain_hi"]
    known = lambda d: sum(prior.row(u) is not None for u in d["users"]) / max(1, len(d["users"]))  # noqa: E731
    test_settings, test_cols = grid_p5(test, model, prior, lambdas, mus)
    res = {"ckpt": str(ckpt), "label": label, "seed": seed, "gamma": model.gamma, **chosen,
           "val_images": len(val["keys"]), "test_images": len(test["keys"]), "val_known": known(val),
           "test_known": known(test), "prior_users": len(prior.users),
           "test_p5": {f"{a:g}/{b:g}": float(p) for (a, b), p in zip(test_settings, torch.nanmean(test_cols, 0))},
           "without": exact(test, model, prior, 0.0, mu), "with": exact(test, at, prior, lam, mu),
           "auto": exact(test, at_auto, prior, auto, mu), "joint_gamma": bool(gammas),
           "seconds": round(time.time() - t0, 1)}
    if not gammas:  # the file records what the auto rule chose on validation
        prior.lam, prior.mu = auto, mu
        prior.save(path)
    log(f"{label} {seed}: λ {lam:g} μ {mu:g} γ {chosen['val_gamma']:g} (auto λ {auto:g}; validation gain "
        f"{res['val_gain']:+.4f}, 90 % "
        f"{float(lo):+.4f} … {float(hi):+.4f}); test P@5 {res['without']['precision@5']:.4f} → "
        f"{res['with']['precision@5']:.4f}; known uploaders: validation {res['val_known']:.0%}, test "
        f"{res['test_known']:.0%} ({res['seconds']} s)")
    return res


def table(rows: list[dict]) -> str:
    """Markdown: mean ± sd over seeds per label, test figures without and with the term."""
    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    lines = ["| data | seeds | test uploaders seen in training | λ, μ chosen (validation) | auto λ | P@1 without | "
             "P@1 with | P@5 without | P@5 with | mAP without | mAP with | P@5 auto |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label in sorted(by):
        rs = sorted(by[label], key=lambda r: r["seed"])
        cells = [label, str(len(rs)), f"{statistics.mean(r['test_known'] for r in rs):.0%}",
                 ", ".join(f"{r['lam']:g}/{r['mu']:g}" + (f"/γ {r['val_gamma']:g}" if r.get("joint_gamma") else "")
                           for r in rs), ", ".join(f"{r['auto_lam']:g}" for r in rs)]
        for m in METRICS:
            cells += [ms([r["without"][m] for r in rs]), ms([r["with"][m] for r in rs])]
        cells.append(ms([r["auto"]["precision@5"] for r in rs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m im2vec.bench.user_prior", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="trained checkpoints (…/<label>/[recipe/]seedN/checkpoints/*.ckpt)")
    p.add_argument("--out", default="outputs/user_prior", help="priors and results.jsonl (default: %(default)s)")
    p.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    p.add_argument("--mus", type=float, nargs="+", default=list(MUS))
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--beside", action="store_true", help="read / write user_prior.pt beside each checkpoint (where "
                   "predict --user finds it) instead of under --out")
    p.add_argument("--by", default="auto", help="what λ is chosen by on validation: precision@5, clean_minus_noise@5 "
                   "(needs clean tags), auto: the latter where the images have clean tags (default: %(default)s)")
    p.add_argument("--joint-gamma", action="store_true", help="choose γ with λ and μ on validation (γ from "
                   f"{', '.join(f'{g:g}' for g in GAMMAS)} and the checkpoint's); the file is not rewritten")
    p.add_argument("--label", default=None, help="the rows' label (default: from each path: <label>/[recipe/]seedN)")
    p.add_argument("--table", nargs="*", default=None, help="print the table of these results.jsonl files and stop")
    a = p.parse_args(argv)
    if a.table is not None:
        files = a.table or [str(Path(a.out) / "results.jsonl")]
        print(table([json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]))
        return 0
    if 0.0 not in a.lambdas:
        p.error("--lambdas must include 0 (the plain score)")
    a.lambdas = sorted(a.lambdas)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for ckpt in a.checkpoints:
        label, seed = a.label or label_of(ckpt)[0], label_of(ckpt)[1]
        res = measure(ckpt, out / label / seed, a.lambdas, a.mus, a.max_images, label=label, beside=a.beside, by=a.by,
                      gammas=GAMMAS if a.joint_gamma else ())
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
