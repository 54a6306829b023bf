"""Zero-shot tags: held-out tags predicted through word vectors, beside a random-vector control and the prior.

    python -m im2vec.bench.zeroshot                          # the generated corpus, 3 seeds (~30 min on 2 cores)
    python -m im2vec.bench.zeroshot --seeds 0 --dry-run      # a tiny corpus, one seed: does it run
    python -m im2vec.bench.zeroshot --variant frozen:model.freeze_tag_vectors=true   # another variant beside
    python -m im2vec.bench.zeroshot --data openclipart --word-vectors data/openclipart/users/minilm.txt

Each run is ``train(cfg)`` with ``+experiment=zeroshot`` (the Spanish names of the corpus's colours, shapes
and scenes held out of training: out of the vocabulary, so no image is trained with them) followed by
``evaluate(cfg)`` on the test split (uploaders seen in neither training nor validation). Variants:

- ``no vectors``: the same held-out vocabulary, no word vectors (the seen tags' reference);
- ``word vectors``: ``model.tag_vectors=corpus`` (the corpus's generated vectors: a concept's names sit
  close across its languages).

On the real development set (``--data openclipart``, under ``--data-dir``; ``python -m
im2vec.bench.openclipart``) the held-out tags are every fifth tag (by a hash of the tag) among those
counted at least ``--min-count`` (10) times, and the word vectors come from ``--word-vectors`` (e.g.
``python -m im2vec.bench.wordvectors``: a sentence-embedding model's vectors of the tags).

Figures, mean ± sd over seeds: the seen tags' test precision@5 (observed and clean tags: does adding the
vectors cost the tags trained with images anything?) and, for the held-out tags ranked among themselves,
precision@5 and mAP against the clean tags (every name of what the picture shows) and the observed ones,
for the model (A·w), the random-vector control (random unit vectors through the same A) and the
frequency prior (the held-out tags by their count in the vocabulary file).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

from im2vec.errors import ArgumentParser, BadValue, NotFound, run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.corpus.num_train=192", "data.corpus.num_val=64", "data.corpus.num_test=48", "data.corpus.num_users=12",
        "data.corpus.tail_size=300", "data.corpus.shard_size=64", "data.vocab_min_count=1", "data.batch_size=16",
        "data.batches_per_epoch=4", "data.num_workers=0", "model.dim=16", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "validation.val_gammas=[0.0,1.0]"]
VARIANTS = {"no vectors": ["model.tag_vectors=null"], "word vectors": []}  # the corpus's
ROWS = [("seen P@5", "tagging/precision@5"), ("seen clean P@5", "tagging/clean/precision@5"),
        ("unseen clean P@5", "zeroshot/clean/precision@5"), ("unseen clean mAP", "zeroshot/clean/map"),
        ("unseen P@5", "zeroshot/precision@5"), ("unseen mAP", "zeroshot/map")]


def run_one(overrides: list[str], eval_overrides: list[str], seed: int, out: Path) -> dict[str, float]:
    """train(cfg) then evaluate(cfg) on its last checkpoint -> evaluate's metrics."""
    from hydra import compose, initialize_config_dir

    from im2vec.train.training import train
    from im2vec.use.evaluate import evaluate

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"seed={seed}", f"paths.output_dir={out}"])
        train(cfg)
        # evaluate.py scores the checkpoint's own data (the corpus or shards it was trained on, its held-out tags)
        ecfg = compose("evaluate", overrides=[*eval_overrides, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
                                              f"paths.output_dir={out / 'evaluate'}", f"seed={seed}"])
        return evaluate(ecfg)


def held_out(vocab: Path, min_count: int, every: int = 5) -> list[str]:
    """Every ``every``-th tag (by a hash of the tag, stable) among those counted at least ``min_count`` times."""
    import hashlib

    out = []
    for line in vocab.read_text(encoding="utf-8").splitlines():
        tag, count = line.split("\t")
        if int(count) >= min_count and int(hashlib.sha1(tag.encode()).hexdigest(), 16) % every == 0:
            out.append(tag)
    return out


def data_overrides(args, out: Path) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(train overrides, evaluate overrides, variants) for ``--data``."""
    if args.data == "corpus":
        cache = [f"paths.cache_dir={args.cache_dir}"] if args.cache_dir else []
        return ["+experiment=zeroshot", *cache], [], dict(VARIANTS)
    if args.data != "openclipart":
        raise BadValue(f"--data {args.data}", "use corpus or openclipart")
    root = Path(args.data_dir) / "openclipart" / "users"
    if not (root / "vocab.tsv").is_file():
        raise NotFound(f"no development set under {root}", "python -m im2vec.bench.openclipart --out " + str(root.parent))
    if not args.word_vectors:
        raise BadValue("--data openclipart needs --word-vectors FILE", "python -m im2vec.bench.wordvectors …")
    hold = out / "holdout.txt"
    hold.write_text("\n".join(held_out(root / "vocab.tsv", args.min_count)) + "\n")
    train = ["+experiment=openclipart", f"paths.data_dir={args.data_dir}", f"data.holdout_tags={hold}"]
    return train, [], {"no vectors": [], "word vectors": [f"model.tag_vectors={args.word_vectors}"]}


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def report(runs: list[dict]) -> str:
    """One row per figure: each variant's model, and for the unseen tags the random control and the prior."""
    names = list(dict.fromkeys(r["variant"] for r in runs))
    cols = [(n, "") for n in names] + [(f"{names[-1]}: random w", "random/"), ("prior", "prior/")]
    lines = [f"{'':20s}" + "".join(f"{c:>24s}" for c, _ in cols)]
    for title, key in ROWS:
        cells = []
        for name, control in cols:
            of = [r for r in runs if r["variant"] == (names[-1] if control else name)]
            k = key.replace("zeroshot/", f"zeroshot/{control}") if control else key
            if control and not key.startswith("zeroshot/"):
                k = key.replace("tagging/", "prior/tagging/") if control == "prior/" else None
            cells.append(mean_sd([r["metrics"][k] for r in of if k and k in r["metrics"]]))
        lines.append(f"{title:20s}" + "".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, argv, exit=False)


def _run(argv: list[str]) -> None:
    p = ArgumentParser(prog="python -m im2vec.bench.zeroshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="outputs/bench_zeroshot", help="run folders and runs.jsonl go here")
    p.add_argument("--cache-dir", default=None, help="where the corpus is generated (default: paths.cache_dir)")
    p.add_argument("--data", default="corpus", help="corpus (default) or openclipart")
    p.add_argument("--data-dir", default=os.environ.get("IM2VEC_DATA", "data"), help="openclipart/ is under it")
    p.add_argument("--word-vectors", default=None, help="--data openclipart: the tags' word vectors")
    p.add_argument("--min-count", type=int, default=10, help="--data openclipart: held-out tags' least count")
    p.add_argument("--dry-run", action="store_true", help="a tiny corpus and one short epoch per run")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDE[,OVERRIDE]",
                   help="a variant beside the two (e.g. frozen:model.freeze_tag_vectors=true)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. trainer.max_epochs=4)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, eval_overrides, variants = data_overrides(args, out)
    for v in args.variant:
        name, _, ov = v.partition(":")
        variants[name] = [o for o in ov.split(",") if o]
    runs = []
    for seed in args.seeds:
        for name, ov in variants.items():
            run_dir = out / f"{name.replace(' ', '_')}-seed{seed}"
            m = run_one([*base, *(TINY if args.dry_run else []), *ov, *args.overrides], eval_overrides, seed, run_dir)
            runs.append({"variant": name, "seed": seed, "overrides": ov + args.overrides, "metrics": m})
            with open(out / "runs.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(runs[-1]) + "\n")
    print(f"\nzero-shot benchmark, {args.data}, test split, seeds {args.seeds} (mean ± sd):", file=sys.stderr)
    print(report(runs))


if __name__ == "__main__":
    sys.exit(main())
