"""python -m im2vec.bench.dist (the sharded table's exchange) at a tiny size, W = 1 and 2 spawned ranks, every arm:
the bytes it reports are exactly what ShardedTagTable's all-to-alls carry for the ids the ranks fetched (and, with
hot rows, what a ring all-reduce of the replica's gradient carries)."""

import json

from im2vec.bench.dist import main

D, STEPS = 16, 3
TINY = ["--tags", "5000", "--dim", str(D), "--batch", "16", "--negatives", "5", "--tags-per-image", "4",
        "--steps", str(STEPS), "--warmup", "1", "--worlds", "1,2", "--threads", "1", "--trunk-ms", "3",
        "--hot-rows", "40", "--arms", "serial,overlap_hot"]


def expected_bytes(ranks: list[dict], r: int, d: int, steps: int) -> tuple[int, int]:
    """(sent, received) by rank r over the timed steps, from every rank's distinct ids per owner M[q][o].

    Per step (sharded_table._all_to_all counts what leaves / reaches the rank, not its own share): the sizes
    (one int64 to each other rank), the ids it asks of others (8 B each) and the rows others ask of it, the
    rows it gets back (4·d B each), then the gradients of its remote rows out and of the rows it owns in."""
    w = len(ranks)
    mine_remote = sum(ranks[r]["owner_counts"][o] for o in range(w) if o != r)  # ids r fetches from others
    asked_of_me = sum(ranks[q]["owner_counts"][r] for q in range(w) if q != r)  # ids the others fetch from r
    sizes = 8 * (w - 1) * steps
    sent = sizes + 8 * mine_remote + 4 * d * asked_of_me + 4 * d * mine_remote
    received = sizes + 8 * asked_of_me + 4 * d * mine_remote + 4 * d * asked_of_me
    return sent, received


def test_dist_bench_bytes_and_memory(tmp_path):
    out = tmp_path / "dist.json"
    report = main([*TINY, "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["goals"] == report["goals"]
    assert {(r["arm"], r["W"]) for r in saved["results"]} == {(a, w) for a in ("serial", "overlap_hot") for w in (1, 2)}
    by_w = {r["W"]: r for r in saved["results"] if r["arm"] == "serial"}

    one = by_w[1]
    assert one["ranks"][0]["bytes_sent"] == one["ranks"][0]["bytes_received"] == 0
    assert one["sent_bytes"] == one["received_bytes"] == 0

    two = by_w[2]["ranks"]
    assert sum(r["bytes_sent"] for r in two) == sum(r["bytes_received"] for r in two) > 0
    for r, rank in enumerate(two):
        assert sum(rank["owner_counts"]) == rank["distinct_ids"] > 0
        assert (rank["bytes_sent"], rank["bytes_received"]) == expected_bytes(two, r, D, STEPS)
    assert by_w[2]["sent_bytes"] == sum(r["bytes_sent"] for r in two) / 2 / STEPS

    for res in by_w.values():  # sparse_adam: the shard and its two moments, nothing else
        for rank in res["ranks"]:
            assert rank["table_bytes"] == rank["rows"] * D * 4 * 3
        assert 1 / 1.1 <= res["memory_ratio"] <= 1.1
        assert abs(res["memory_ratio"] - 1) < 1e-9  # 5000 rows split evenly
    assert {(p["W"], p["from_W"]) for p in saved["projected"] if p["arm"] == "serial"} == {(8, 2), (64, 2)}

    for arm in ("overlap_hot",):  # the tail's all-to-alls as above, plus the replica's all-reduce
        res = next(r for r in saved["results"] if r["arm"] == arm and r["W"] == 2)
        assert res["hot_rows"] == 40
        ring = int(2 * (2 - 1) / 2 * 40 * (D + 1) * 4) * STEPS
        for r, rank in enumerate(res["ranks"]):
            sent, received = expected_bytes(res["ranks"], r, D, STEPS)
            assert (rank["bytes_sent"], rank["bytes_received"]) == (sent + ring, received + ring)
            assert rank["hot_bytes"] > 40 * D * 4
    for arm in ("overlap_hot",):  # overlapped: what the step waited for is the worker's rows
        res = next(r for r in saved["results"] if r["arm"] == arm and r["W"] == 2)
        assert res["exposed_ms"] == res["wait_ms"] and res["head_ms"] > 0
    assert [g["met"] for g in saved["goals"] if g["goal"].startswith("table")] == [True, True]
