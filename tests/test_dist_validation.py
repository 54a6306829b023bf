"""Validation over a table sharded by rows on W gloo ranks, without assembling it (each rank scores its own rows,
rank 0 merges the top-k lists: im2vec/eval/shard_scoring.py), equals one process's figures exactly."""

from __future__ import annotations

import math

import dist_validation_workers as w
import pytest
import torch
from test_dist import spawn

from im2vec.eval.shard_scoring import first_k, merge_to_rank0


def one_process(ties: bool, tag_vectors: bool, world: int, empty_rank: int):
    """The report one device computes on the same images (those of the ranks that had any) and whole table."""
    counts, table, tag_map, u, obs, clean, keys, images = w.problem(ties, tag_vectors)
    vectors = table if tag_map is None else tag_map.full(table)
    r = w.report(counts)
    for rank in range(world):
        for sl in w.batches(rank, world, empty_rank):
            r.add(u[sl], obs[sl], clean[sl], keys[sl], images[sl])
    m = r.compute(vectors, counts.double().clamp_min(1).log().float(), 0, w.MAX_IMAGES)
    return r, m, vectors


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("ties,tag_vectors,world,empty_rank", [
    (True, False, 2, 1),  # many equal scores; rank 1 without a validation image
    pytest.param(False, True, 2, -1, marks=pytest.mark.slow),  # word vectors: each rank maps its own rows' A·w
    pytest.param(True, False, 3, -1, marks=pytest.mark.slow),  # W = 3: one rank merges twice
    pytest.param(False, False, 5, 2, marks=pytest.mark.slow),  # W = 5: a three-level tree
])
def test_sharded_validation_equals_one_process_exactly(tmp_path, ties, tag_vectors, world, empty_rank):
    out = tmp_path / "val.pt"
    spawn(w.sharded_validation, world, str(out), ties, tag_vectors, empty_rank)
    got = torch.load(out, weights_only=False)
    r, want, vectors = one_process(ties, tag_vectors, world, empty_rank)
    if ties:  # the test is about ties: make sure there are some at the 10th place
        s = w.problem(ties, False)[3] @ vectors.t()
        kth = torch.topk(s, 10).values[:, -1:]
        assert int(((s == kth).sum(1) > 1).sum()) > 10
    for rank, g in enumerate(got):  # the same figures and γ on every rank
        assert g["gamma"] == r.gamma and g["size"] == r.size, rank
        assert set(g["metrics"]) == set(want), rank
        bad = [k for k in want if not same(g["metrics"][k], want[k])]
        assert not bad, f"rank {rank}: {bad}"
    assert torch.equal(got[0]["top"], r._top)  # the top-10 lists themselves, equal scores in the same order
    assert sorted(got[0]["grid"]) == sorted(r.image_keys)
    # with word vectors a shard's A·w may differ from the whole table's by an ulp (the BLAS's order of summation
    # depends on the number of rows); the table's own rows are the same floats
    torch.testing.assert_close(got[0]["projector"], vectors[: w.PROJECTOR], rtol=0, atol=1e-6 if tag_vectors else 0)


def test_merge_keeps_the_k_best_with_equal_scores_in_tag_id_order():
    """first_k on two ranks' lists (the tree's one merge), beside a stable sort of everything."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 4, (6, 40), generator=g).float()  # (N, V): many ties
    parts = []
    for r in range(2):
        ids = torch.arange(r, 40, 2)
        srt = torch.sort(s[:, ids], dim=1, descending=True, stable=True)
        parts.append((srt.values[:, :5], ids[srt.indices[:, :5]]))
    got = first_k(torch.cat([parts[0][0], parts[1][0]], 1), torch.cat([parts[0][1], parts[1][1]], 1), 5)
    want = torch.sort(s, dim=1, descending=True, stable=True)
    assert torch.equal(got[1], want.indices[:, :5]) and torch.equal(got[0], want.values[:, :5])


def test_one_rank_merge_is_the_identity():
    s, i = torch.rand(2, 3, 4), torch.arange(24).view(2, 3, 4)
    got = merge_to_rank0(s, i, None, 0, 1)
    assert got[0] is s and got[1] is i


def test_a_shards_word_vector_rows_are_those_of_the_whole_table():
    """TagVectorMap.full on a rank's rows with their ids (what each rank scores with) = the whole table's rows."""
    _, table, tag_map, *_ = w.problem(False, True)
    whole = tag_map.full(table)
    for world in (2, 3):
        for rank in range(world):
            part = tag_map.full(table[rank::world].clone(), chunk=50, ids=torch.arange(rank, w.V, world))
            torch.testing.assert_close(part, whole[rank::world], rtol=0, atol=1e-6)


@pytest.mark.parametrize("ties,world", [(True, 2), pytest.param(False, 3, marks=pytest.mark.slow)])
def test_sharded_closing_test_figures_equal_one_process_exactly(tmp_path, ties, world):
    """training's closing test figures (tagging with mAP and ties, retrieval, the prior, the γ sweep) with every
    rank scoring its own rows: rank 0's equal one process's, key for key; the other ranks return none."""
    out = tmp_path / "test.pt"
    spawn(w.sharded_closing_figures, world, str(out), ties)
    got = torch.load(out, weights_only=False)
    counts, table = w.problem(ties, False)[:2]
    want = w.closing_figures(table, counts, ties)
    assert all(g == {} for g in got[1:])
    assert set(got[0]) == set(want) and len(want) > 100
    bad = [k for k in want if not same(got[0][k], want[k])]
    assert not bad, bad
    assert want["test/tagging/map"] > want["test/prior/tagging/map"] or ties  # a real model: not all ties or zeros
