"""The zero-shot benchmark's dry run: both variants train and evaluate, the table has every row."""

import json

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


def test_held_out_tags_are_a_stable_fifth_of_the_frequent_ones(tmp_path):
    (tmp_path / "v.tsv").write_text("".join(f"t{i}\t{100 - i}\n" for i in range(100)))
    got = held_out(tmp_path / "v.tsv", min_count=10)
    assert got == held_out(tmp_path / "v.tsv", min_count=10) and 8 <= len(got) <= 30
    assert all(100 - int(t[1:]) >= 10 for t in got)
