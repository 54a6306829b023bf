"""The zero-shot benchmark's dry run: both variants train and evaluate, the table has every row."""

import json
import os
import subprocess
import sys

from im2vec.bench.zeroshot import ROWS, held_out, main


def test_dry_run_prints_both_variants_beside_the_controls(tmp_path, cache_dir, capsys):
    """(The dry run's corpus is the tests' tiny one: generated once per session.)"""
    assert main(["--seeds", "0", "--dry-run", "--out", str(tmp_path), "--cache-dir", str(cache_dir)]) == 0
    table = capsys.readouterr().out
    for title, _ in ROWS:
        assert title in table
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in runs] == ["no vectors", "word vectors"]
    assert "zeroshot/clean/precision@5" in runs[1]["metrics"] and "zeroshot/precision@5" not in runs[0]["metrics"]
    assert runs[1]["metrics"]["zeroshot/info/unseen_tags"] == 18  # every Spanish name of the corpus's concepts


# held_out on t0..t99 counted 100..1, min_count=10: pinned, so that a change of the hash (or a per-process one,
# as Python's hash() of a str is) shows; a fifth of the 91 tags counted at least 10 times, give or take
PINNED = ["t0", "t5", "t12", "t25", "t32", "t35", "t36", "t37", "t45", "t64", "t69", "t71", "t74", "t80", "t84", "t87"]


def test_held_out_tags_are_a_stable_fifth_of_the_frequent_ones(tmp_path):
    vocab = tmp_path / "v.tsv"
    vocab.write_text("".join(f"t{i}\t{100 - i}\n" for i in range(100)))
    assert held_out(vocab, min_count=10) == PINNED
    assert all(100 - int(t[1:]) >= 10 for t in PINNED)
    # the same list in other processes, each with its own string hashing
    code = ("import json, sys; from pathlib import Path; from im2vec.bench.zeroshot import held_out; "
            "print(json.dumps(held_out(Path(sys.argv[1]), 10)))")
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", code, str(vocab)], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout) == PINNED, seed
