"""Uploader balance that costs no reading: training images/s with balance on and off, on a collection of a few
prolific uploaders and on one of hundreds, streamed and decoded once; and the recipe's time on both.

    python -m im2vec.bench.balance --data-dir data          # emoji/random (4 uploaders), openclipart/random (~440)
    python -m im2vec.bench.balance --data-dir data --train  # and the whole recipe on both, same samples used
    python -m im2vec.bench.balance --mix data/emoji/users data/sorted/emoji/users   # how batches mix uploaders

Each setting of the loader is timed over the same number of batches, in interleaved rounds (best of
``--rounds``), so the ratios in a row sit side by side. Settings: no balance; the recipe's balance
(``data.user_temperature``, uses ∝ n_u^τ, which sum to the samples read); and, for reference, the
absolute cap the recipe had before (``max_per_user=25``: each sample of an uploader with n > 25 used
with chance 25/n, the rest read and passed over), expressed as the same per-uploader uses (all ≤ 1).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from im2vec.data.loader import train_loader
from im2vec.data.memory import MemoryBatches, decode_split, store_side, uploader_weights
from im2vec.data.shards import expand_shards, user_counts, user_uses
from im2vec.data.vocab import Vocabulary
from im2vec.errors import ArgumentParser, NotFound, run_cli

DATA = {"4 uploaders (emoji/random)": "emoji/random", "~440 uploaders (openclipart/random)": "openclipart/random"}
CAP = 25  # the old recipe's data.max_per_user


def settings(counts, tau: float) -> dict[str, dict[str, float]]:
    n = sum(counts.values())
    return {"no balance": {}, f"τ = {tau:g}": user_uses(counts, tau),
            f"old cap ({CAP} a pass)": {u: min(1.0, CAP / c) for u, c in counts.items()},
            "_cap_pass": {"samples": sum(min(c, CAP) for c in counts.values()), "of": n}}


def stream_rate(shards: list[str], vocab: Vocabulary, uses: dict, batches: int, batch: int, workers: int) -> float:
    loader = train_loader(shards, vocab, 64, batch, batches, workers, seed=0, shuffle_buffer=1000, min_scale=0.7,
                          rank=0, world_size=1, user_uses=uses)
    t = time.perf_counter()
    n = sum(len(b["keys"]) for b in loader)
    return n / (time.perf_counter() - t)


def memory_rate(data, uses: dict, batches: int, batch: int) -> float:
    t = time.perf_counter()
    n = sum(len(b["keys"]) for b in MemoryBatches(data, batch, batches, 64, 0.7, 0, uploader_weights(data, uses)))
    return n / (time.perf_counter() - t)


def loader_table(data_dir: Path, tau: float, batches: int, batch: int, rounds: int, workers: int) -> dict:
    out = {}
    for label, name in DATA.items():
        root = data_dir / name
        shards = expand_shards(str(root / "train" / "shard-*.tar"))
        if not shards:
            raise NotFound(f"balance: no shards under {root}/train", f"build it: python -m im2vec.bench.{name.split('/')[0]}")
        vocab = Vocabulary.load(root / "vocab.tsv")
        counts = user_counts(shards)
        sets = settings(counts, tau)
        cap = sets.pop("_cap_pass")
        decoded = decode_split(shards, vocab, store_side(64, 0.7), workers, 0, 1)
        best = {k: {"stream": 0.0, "memory": 0.0} for k in sets}
        for _ in range(rounds):
            for k, uses in sets.items():
                best[k]["stream"] = max(best[k]["stream"], stream_rate(shards, vocab, uses, batches, batch, workers))
                best[k]["memory"] = max(best[k]["memory"], memory_rate(decoded, uses, batches * 4, batch))
        out[label] = {"uploaders": len(counts), "images": sum(counts.values()), "images_per_s": best,
                      "old_cap_pass": cap}
        print(f"balance: {label}: {json.dumps(best)}", file=sys.stderr)
    return out


def batch_mix(batches: list[list[str]], shares: dict[str, float]) -> float:
    """Mean total-variation distance of each batch's uploader shares from the collection's (0: every batch mixes
    uploaders as the collection does; 1: each batch is of uploaders the collection hardly has)."""
    tv = []
    for users in batches:
        n, got = len(users), Counter(users)
        tv.append(0.5 * sum(abs(got.get(u, 0) / n - shares.get(u, 0.0)) for u in shares.keys() | got.keys()))
    return sum(tv) / len(tv)


def mix_table(folders: dict[str, Path], batches: int, batch: int) -> dict:
    """How well batches mix uploaders, for shards in their written order: streamed with the default shuffle buffer
    (1,000), with a buffer as large as the largest shard, and decoded once into memory."""
    out = {}
    for label, root in folders.items():
        shards = expand_shards(str(root / "train" / "shard-*.tar"))
        vocab = Vocabulary.load(root / "vocab.tsv")
        counts = user_counts(shards)
        total = sum(counts.values())
        shares = {u: n / total for u, n in counts.items()}
        biggest = max(json.loads((Path(s[:-4] + ".stats.json")).read_text())["written"] for s in shards)
        row = {}
        for name, buffer in (("stream, buffer 1,000", 1000), (f"stream, buffer {biggest:,}", biggest)):
            loader = train_loader(shards, vocab, 32, batch, batches, 0, seed=0, shuffle_buffer=buffer, rank=0,
                                  world_size=1)
            row[name] = batch_mix([b["users"] for b in loader], shares)
        data = decode_split(shards, vocab, 32, 0, 0, 1)
        row["in memory"] = batch_mix([b["users"] for b in MemoryBatches(data, batch, batches, 32, 0.7, 0)], shares)
        out[label] = row
        print(f"balance: mix {label}: {json.dumps(row)}", file=sys.stderr)
    return out


def train_times(data_dir: Path, batches: int) -> dict:
    """The recipe (python train.py +experiment=<collection>) on both collections, the same number of samples
    used: its whole-run seconds (data, training, validation, test figures)."""
    from im2vec.bench.quality import run_one

    out = {}
    for label, name in DATA.items():
        m = run_one(name, str(data_dir), ["data.batches_per_epoch=" + str(batches), "trainer.max_epochs=3",
                                        "train_samples=null"], 0,
                    Path("outputs/bench-balance") / name.replace("/", "_"))
        out[label] = {"seconds": m["info/seconds"], "batches": 3 * batches}
    return out


def report(r: dict) -> str:
    lines = ["| collection | uploaders | images/s | no balance | τ balance | old cap | τ / none | cap / none |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, d in r["loader"].items():
        rates = d["images_per_s"]
        names = list(rates)
        for where in ("stream", "memory"):
            none, tau, cap = (rates[k][where] for k in names)
            lines.append(f"| {label} | {d['uploaders']} | {where} | {none:.0f} | {tau:.0f} | {cap:.0f} | "
                         f"{tau / none:.2f} | {cap / none:.2f} |")
    if "train" in r:
        t = list(r["train"].values())
        lines.append("")
        lines.append("recipe, same samples used: " + ", ".join(f"{k}: {v['seconds']:.0f} s" for k, v in r["train"].items())
                     + f" (ratio {max(x['seconds'] for x in t) / min(x['seconds'] for x in t):.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.balance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("IM2VEC_DATA", "data"))
    ap.add_argument("--tau", type=float, default=0.5, help="the balance's temperature (the recipe's)")
    ap.add_argument("--batches", type=int, default=40, help="batches a streamed measurement reads")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="loader worker processes of the stream")
    ap.add_argument("--train", action="store_true", help="also time the recipe on both collections")
    ap.add_argument("--train-batches", type=int, default=100, help="batches an epoch of those runs (3 epochs)")
    ap.add_argument("--mix", nargs="+", default=None, metavar="FOLDER",
                    help="instead: how well batches mix uploaders, for the shards of these folders (FOLDER/train/, "
                         "FOLDER/vocab.tsv) in their written order, streamed and in memory")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.mix:
        r = {"mix": mix_table({f: Path(f) for f in a.mix}, a.batches * 5, a.batch)}
        print("| shards | " + " | ".join(next(iter(r["mix"].values()))) + " |")
        for label, row in r["mix"].items():
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
        return r
    r = {"loader": loader_table(Path(a.data_dir), a.tau, a.batches, a.batch, a.rounds, a.workers)}
    if a.train:
        r["train"] = train_times(Path(a.data_dir), a.train_batches)
    print(report(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    run_cli(main)
