"""How well each rule chooses γ on a validation split of a given size: small splits drawn from a run's own.

    python -m im2vec.bench.gamma outputs/quality/*/*/seed0 --uploaders 6 20 --draws 40

For every finished training run given (a folder with ``checkpoints/last.ckpt`` and ``metrics.json``): its
validation images are embedded once; then, ``--draws`` times, a random subset of ``--uploaders`` of
its validation uploaders (all their images) stands in for the validation split, each rule
(``im2vec.eval.intervals``) chooses γ on it by the run's own criterion, and the run's test split (from
its ``metrics.json``: the test γ sweep's precision@5) says what that γ gives. The split of a user who
holds out only a few uploaders is thereby measured, on real models, without training again.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import torch

from im2vec.data.shards import expand_shards
from im2vec.errors import ArgumentParser, NotFound, run_cli
from im2vec.eval.heldout import embed_shards
from im2vec.eval.intervals import GAMMA_RULES
from im2vec.eval.validation import ValidationReport
from im2vec.train.checkpoint import load_model


def run_values(run: Path) -> tuple[dict, dict]:
    """A run's validation images embedded (u, observed tags, users, keys) and its metrics."""
    metrics = json.loads((run / "metrics.json").read_text())
    model = load_model(run / "checkpoints" / "last.ckpt")
    shards = expand_shards(model.data["val_shards"])
    if not shards:
        raise NotFound(f"gamma: {run}: no validation shards", "give runs trained with a validation split")
    data = embed_shards([model], shards, model.image_size, 256, 0, None)
    users = _users(shards, data["keys"])
    return {"u": data["u"][0], "obs": data["obs"], "keys": data["keys"], "users": users, "model": model}, metrics


def _users(shards: list[str], keys: list[str]) -> list[str]:
    import tarfile

    from im2vec.data.shards import user_of

    by_key = {}
    for s in shards:
        with tarfile.open(s) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    by_key[m.name[: -len(".json")]] = user_of(json.loads(tar.extractfile(m).read()))
    return [by_key.get(k, "") for k in keys]


def choose_on(v: dict, rows: list[int], gammas: list[float], rule: str) -> float:
    """The γ ``rule`` chooses on the validation images ``rows`` (recall@10 of the observed tags, as training does
    on data without clean tags)."""
    m = v["model"]
    r = ValidationReport(m.tags, m.log_counts.exp().round().long(), None, 1.0, gammas, 1, 0, gamma_rule=rule)
    idx = torch.tensor(rows)
    r.add(v["u"][idx], v["obs"][idx], torch.full((len(rows), 1), -1), [v["keys"][i] for i in rows], None,
          [v["users"][i] for i in rows])
    r.compute(m.table, m.log_counts, step=0)
    return r.gamma


def measure(runs: list[Path], sizes: list[int], draws: int, seed: int = 0) -> dict:
    out = {}
    for run in runs:
        v, metrics = run_values(run)
        gammas = sorted(float(k.rsplit("/", 1)[1]) for k in metrics if k.startswith("test/gamma_sweep/precision@5/"))
        test = {g: metrics[f"test/gamma_sweep/precision@5/{g:g}"] for g in gammas}
        uploaders = sorted({u for u in v["users"] if u})
        rng = random.Random(seed)
        rec = {"oracle": max(test.values())}
        for n in sizes + [len(uploaders)]:
            if n > len(uploaders):
                continue
            picks = {rule: [] for rule in GAMMA_RULES}
            for _ in range(draws if n < len(uploaders) else 1):
                chosen = set(rng.sample(uploaders, n))
                rows = [i for i, u in enumerate(v["users"]) if u in chosen]
                for rule in GAMMA_RULES:
                    picks[rule].append(test[choose_on(v, rows, gammas, rule)])
            rec[f"{n}"] = {rule: statistics.fmean(p) for rule, p in picks.items()}
        out[str(run)] = rec
        print(f"gamma: {run}: {json.dumps(rec)}", file=sys.stderr)
    return out


def table(res: dict) -> str:
    sizes = sorted({k for r in res.values() for k in r if k != "oracle"}, key=int)
    lines = ["| run | oracle | " + " | ".join(f"{n} uploaders: {rule}" for n in sizes for rule in GAMMA_RULES) + " |",
             "|" + " --- |" * (2 + len(sizes) * len(GAMMA_RULES))]
    for run, r in res.items():
        cells = [f"{r[n][rule]:.3f}" if n in r else "–" for n in sizes for rule in GAMMA_RULES]
        lines.append(f"| {Path(run).parent.parent.name}/{Path(run).parent.name} | {r['oracle']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.gamma", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="training run folders (checkpoints/last.ckpt and metrics.json)")
    ap.add_argument("--uploaders", type=int, nargs="+", default=[6, 20], help="validation uploaders drawn")
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    runs = [Path(r) for r in a.runs if (Path(r) / "metrics.json").is_file()]
    if not runs:
        raise NotFound("gamma: no finished run among the folders given", "give folders with metrics.json")
    res = measure(runs, a.uploaders, a.draws)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    run_cli(main)
