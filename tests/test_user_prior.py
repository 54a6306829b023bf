"""The per-uploader prior (im2vec/eval/user_prior.py) and its benchmark (im2vec/bench/user_prior.py): the counts
against a brute-force pass over the shards, the smoothing formula, the unknown-user fallback, λ = 0, the bound
per user, and the exact ranking against brute force."""

import json
import math
import tarfile
from collections import Counter

import pytest
import torch

from im2vec.eval.metrics import precision_at_k
from im2vec.eval.ranking import KS, rank_tags, tagging_metrics
from im2vec.eval.user_prior import UserPrior, main, rank_with_users, user_scores


def brute_counts(shards, tags):
    """{user: Counter(tag id)} and Counter(tag id) over every image, read the plainest way."""
    index = {t: i for i, t in enumerate(tags)}
    per_user, glob = {}, Counter()
    for url in shards:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    ids = {index[t] for t in meta["tags"] if t in index}
                    glob.update(ids)
                    if meta.get("user") and ids:
                        per_user.setdefault(meta["user"], Counter()).update(ids)
    return per_user, glob


@pytest.fixture(scope="module")
def shards_tags(tiny_run):
    return tiny_run.datamodule.train_shards, list(tiny_run.datamodule.vocab.tags)


@pytest.fixture(scope="module")
def prior(shards_tags):
    return UserPrior.build(*shards_tags)


def test_counts_equal_a_brute_force_count_over_the_shards(prior, shards_tags):
    per_user, glob = brute_counts(*shards_tags)
    assert prior.users == sorted(per_user) and len(prior.users) > 1
    assert prior.tag_ids.dtype == torch.int32 and prior.counts.dtype == torch.int32
    for i, user in enumerate(prior.users):
        ids, n, n_u = prior.row(user)
        assert ids.tolist() == sorted(per_user[user])  # ascending ids
        assert dict(zip(ids.tolist(), n.tolist())) == dict(per_user[user])
        assert n_u == sum(per_user[user].values())
    assert prior.global_counts.tolist() == [glob[t] for t in range(len(shards_tags[1]))]


def test_the_term_is_the_smoothed_log_ratio(prior):
    user, mu = prior.users[0], 7.0
    ids, n, n_u = prior.row(user)
    own = dict(zip(ids.tolist(), n.tolist()))
    g = prior.global_counts.double()
    p = g / g.sum()
    b = prior.term(user, mu)
    p_user = torch.zeros(len(p), dtype=torch.float64)
    for t in range(len(p)):
        p_user[t] = (own.get(t, 0) + mu * p[t]) / (n_u + mu)
        if p[t] > 0:
            assert b[t].item() == pytest.approx(math.log(p_user[t]) - math.log(p[t]), abs=1e-5)
        else:  # no training count: the limit, log μ − log(n_u + μ)
            assert b[t].item() == pytest.approx(math.log(mu / (n_u + mu)), abs=1e-5)
    assert p_user.sum().item() == pytest.approx(1.0, abs=1e-9)  # a distribution (no tag cut here)
    assert int((b > b.min() + 1e-6).sum()) == len(own)  # only the user's own tags stand out


def test_an_unknown_user_adds_exactly_zero(prior, tiny_run):
    assert torch.equal(prior.term("nobody-at-all"), torch.zeros(prior.num_tags))
    assert torch.equal(prior.term(""), torch.zeros(prior.num_tags))
    m = tiny_run.module
    table, lc = m.table.embedding.weight.detach().float(), m.table.log_counts.float()
    u = torch.randn(5, table.shape[1])
    plain = user_scores(u, table, lc, 0.5)
    assert torch.equal(user_scores(u, table, lc, 0.5, ["x"] * 5, prior, lam=2.0), plain)


def test_lambda_zero_reproduces_the_plain_scores_and_ranking(prior, tiny_run):
    m = tiny_run.module
    table, lc = m.table.embedding.weight.detach().float(), m.table.log_counts.float()
    torch.manual_seed(0)
    u, users = torch.randn(40, table.shape[1]), [prior.users[i % len(prior.users)] for i in range(40)]
    obs = torch.randint(0, table.shape[0], (40, 3))
    plain = u @ table.t() + 0.5 * lc
    assert torch.equal(user_scores(u, table, lc, 0.5, users, prior, lam=0.0), plain)
    a, b = rank_with_users(u, table, lc, 0.5, [obs], users, prior, 0.0), rank_tags(u, table, lc, 0.5, [obs])
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.n_ge[0], b.n_ge[0])
    assert tagging_metrics(a, 0, KS) == tagging_metrics(b, 0, KS)


def test_the_exact_ranking_with_the_term_equals_brute_force(prior, tiny_run):
    m = tiny_run.module
    table, lc = m.table.embedding.weight.detach().float(), m.table.log_counts.float()
    torch.manual_seed(1)
    n = 30
    users = [prior.users[i % 3] if i % 4 else "stranger" for i in range(n)]
    u = torch.randn(n, table.shape[1])
    dense = user_scores(u, table, lc, 0.5, users, prior, lam=1.0, mu=10.0)
    top = torch.argsort(dense, 1, descending=True)[:, :10]
    obs = top[:, [0, 7]].clone()  # true tags at known ranks: precision@5 = 0.2 for every image
    obs[::3, 1] = -1
    r = rank_with_users(u, table, lc, 0.5, [obs], users, prior, 1.0, mu=10.0)
    assert torch.equal(r.top_ids, top)
    fig = tagging_metrics(r, 0, KS)
    for k in KS:
        assert fig[f"precision@{k}"] == pytest.approx(precision_at_k(top, obs, k), abs=1e-6)  # float32 means
    # by hand: AP of an image with true tags at ranks 1 and 8 is (1/1 + 2/8) / 2; with one at rank 1: 1
    assert fig["map"] == pytest.approx((10 * 1.0 + 20 * (1 + 2 / 8) / 2) / 30, abs=1e-6)


def test_the_file_keeps_the_most_frequent_tags_within_the_bound(shards_tags, tmp_path):
    per_user, _ = brute_counts(*shards_tags)
    small = UserPrior.build(*shards_tags, max_tags_per_user=3)
    for user in small.users:
        ids, n, n_u = small.row(user)
        assert len(ids) <= 3 and small.nbytes(user) <= 3 * 8 + 16
        ranked = sorted(per_user[user].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        assert dict(zip(ids.tolist(), n.tolist())) == dict(ranked) and ids.tolist() == sorted(ids.tolist())
        assert n_u == sum(per_user[user].values())  # the cut tags still count in n_u
    small.save(tmp_path / "small.pt")
    empty = UserPrior([], torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32),
                      torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64), small.global_counts)
    empty.save(tmp_path / "empty.pt")
    per_user_bytes = 3 * 8 + 16 + 64  # pairs, offset, total, and the name with pickling's slack
    extra = (tmp_path / "small.pt").stat().st_size - (tmp_path / "empty.pt").stat().st_size
    assert extra <= len(small.users) * per_user_bytes + 4096  # 4 KiB: the zip's records for the tensors
    back = UserPrior.load(tmp_path / "small.pt")
    assert back.users == small.users and torch.equal(back.tag_ids, small.tag_ids)


def test_build_from_a_checkpoint_finds_its_own_training_shards(tiny_run, shards_tags, tmp_path, capsys):
    assert main(["build", str(tiny_run.ckpt), "--out", str(tmp_path / "p.pt"), "--mu", "20"]) == 0
    p = UserPrior.load(tmp_path / "p.pt")
    assert p.mu == 20.0 and p.users == UserPrior.build(*shards_tags).users
    assert main(["build", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "q.pt")]) == 2


def test_the_benchmark_on_unseen_uploaders_falls_back_to_the_plain_figures(tiny_run, tmp_path):
    from im2vec.bench.user_prior import measure, table

    import shutil

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"  # a copy: the prior is written beside it
    ckpt.parent.mkdir(parents=True)
    shutil.copy(tiny_run.ckpt, ckpt)
    res = measure(str(ckpt), tmp_path / "out", lambdas=(0.0, 1.0), mus=(10.0,), log=lambda *a: 0, beside=True)
    assert UserPrior.load(ckpt.with_name("user_prior.pt")).lam == 0.0  # auto: recorded, off
    assert res["test_known"] == 0 and res["val_known"] == 0  # the corpus holds its uploaders out
    assert res["lam"] == 0.0 and res["auto_lam"] == 0.0  # every λ ties: the smaller wins
    assert res["with"] == res["without"]
    assert res["without"]["precision@5"] == pytest.approx(tiny_run.metrics["test/tagging/precision@5"], abs=1e-9)
    assert f"| {res['label']} | 1 | 0% | 0/10 | 0 |" in table([res])


def test_images_without_an_uploader_count_in_the_global_prior_only(tmp_path):
    import io

    samples = [({"tags": ["a", "b"], "user": "ann"}), ({"tags": ["a", "zz"], "user": ""}), ({"tags": ["b", "b", "c"]}),
               ({"tags": ["c"], "user": "bob"}), ({"tags": "not a list", "user": "bob"}), ({"tags": ["a"], "user": "ann"})]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i, meta in enumerate(samples):
            raw = json.dumps(meta).encode()
            info = tarfile.TarInfo(f"k{i}.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    p = UserPrior.build([str(shard)], ["a", "b", "c"], max_tags_per_user=1)
    assert p.global_counts.tolist() == [3, 2, 2]  # a tag once an image; images of no uploader counted here only
    assert p.users == ["ann", "bob"] and p.totals.tolist() == [3, 1]
    assert p.row("ann")[0].tolist() == [0] and p.row("ann")[1].tolist() == [2]  # its most frequent tag, a (2)
    assert torch.equal(p.term(""), torch.zeros(3))


def test_tagger_and_predict_take_the_uploader(tiny_run, shards_tags, tmp_path):
    from im2vec.use.predict import Tagger
    from im2vec.use.predict import main as predict

    UserPrior.build(*shards_tags).save(tmp_path / "prior.pt")
    tagger = Tagger.from_checkpoint(tiny_run.ckpt)
    u = tagger.embed(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    plain = tagger.tag_vectors(u, k=5)
    with pytest.raises(Exception, match="user prior"):
        tagger.tag_vectors(u, k=5, user="x")
    tagger.use_user_prior(tmp_path / "prior.pt", lam=3.0)
    known = tagger.user_prior.users[0]
    assert tagger.tag_vectors(u, k=5, user="stranger") == plain  # b = 0: the plain scores, bit for bit
    dense = user_scores(u, tagger.table, tagger.log_counts, tagger.gamma, [known] * 4, tagger.user_prior, lam=3.0)
    got = tagger.tag_vectors(u, k=5, user=known)
    assert [[tagger.tags.index(t) for t, _ in row] for row in got] == torch.topk(dense, 5).indices.tolist()
    tagger.use_user_prior(tmp_path / "prior.pt", lam=0.0)
    assert tagger.tag_vectors(u, k=5, user=known) == plain
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, jpg in enumerate(tiny_run.jpegs[:3]):
        (folder / f"{i}.jpg").write_bytes(jpg)
    args = ["tag", str(tiny_run.ckpt), str(folder), "--user-prior", str(tmp_path / "prior.pt")]
    assert predict([*args, "--out", str(tmp_path / "a.jsonl"), "--user", known, "--user-lambda", "3"]) == 0
    assert predict([*args, "--out", str(tmp_path / "b.jsonl")]) == 0
    a, b = (tmp_path / "a.jsonl").read_text().splitlines(), (tmp_path / "b.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 3 and a != b  # λ = 3 on a known uploader moves the lists
