"""The demo, Tagger and `predict tag` with an uploader and with non-visual tags hidden (issue 25): a known uploader
ranks by v·u + γ·log c + λ·b as brute force does, an unknown one equals no uploader bit for bit, a tag marked 0
in a visualness file is never returned while k is still filled (against a brute-force filtered ranking), the
uploader suggestions stay bounded, and bad inputs are clear one-line errors."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from im2vec.eval.user_prior import UserPrior
from im2vec.use.predict import Tagger
from im2vec.use.predict import main as predict_main
from im2vec.use.visualness import TagRow, write_tsv

pytest.importorskip("starlette", reason="the demo needs the serve extra: pip install -e '.[serve]'")
from starlette.testclient import TestClient  # noqa: E402

from im2vec.use import serve  # noqa: E402
from im2vec.use.demo import MAX_USER_CHARS, MAX_USERS  # noqa: E402
from im2vec.use.serve import create_app  # noqa: E402

LAM = 3.0  # large enough that a known uploader's own tags move the tiny model's lists


def write_visual_tags(path: Path, tags: list[str], nonvisual: set[str]) -> Path:
    """A file as python -m im2vec.visualness writes it (its own writer): ``nonvisual`` marked 0, every third other
    tag 1, the rest NA, and a tag the vocabulary lacks marked 0 (ignored)."""
    rows = [TagRow("not-in-the-vocabulary", 9, 9, 0.1, 0.2, -0.1, False)]
    for i, t in enumerate(tags):
        if t in nonvisual:
            rows.append(TagRow(t, 7, 9, 0.1, 0.2, -0.1, False))
        elif i % 3 == 0:
            rows.append(TagRow(t, 7, 9, 0.6, 0.2, 0.3, True))
        else:
            rows.append(TagRow(t, 2, 9))  # NA: not tested
    return write_tsv(rows, path, ["tag visualness of a test checkpoint", "threshold 0"])


@pytest.fixture(scope="module")
def setup(tiny_run, tmp_path_factory):
    """The tiny run's checkpoint, a prior of its training shards, held-out photos, their vectors, and a visual tags
    file that marks 0 each photo's top 3 plain tags (so hiding has something to skip) and a tenth of the rest."""
    base = tmp_path_factory.mktemp("demo-user")
    tagger = Tagger.from_checkpoint(tiny_run.ckpt)
    prior = UserPrior.build(tiny_run.datamodule.train_shards, list(tagger.tags))
    prior.save(base / "user_prior.pt")
    photos = []
    for i, data in enumerate(tiny_run.jpegs[:6]):
        photos.append(base / f"{i}.jpg")
        photos[-1].write_bytes(data)
    u = tagger.embed(photos)  # (6, d)
    top = {t for row in tagger.tag_vectors(u, k=3) for t, _ in row}
    nonvisual = top | {t for i, t in enumerate(tagger.tags) if i % 10 == 1}
    visual = write_visual_tags(base / "visual_tags.tsv", list(tagger.tags), nonvisual)
    # the uploader with the most tagged images: the one whose habits move the lists most
    known = max(prior.users, key=lambda name: prior.row(name)[2])
    return SimpleNamespace(ckpt=tiny_run.ckpt, base=base, prior_path=base / "user_prior.pt", prior=prior,
                           photos=photos, u=u, visual=visual, nonvisual=nonvisual, known=known)


def brute(tagger: Tagger, u: torch.Tensor, k: int, gamma: float, prior=None, user=None, lam=0.0,
          hidden: set[str] = frozenset()) -> list[list[tuple[str, float]]]:
    """The k best tags by the dense score v·u + γ·log c (+ λ·b(user)), tags in ``hidden`` left out."""
    s = u @ tagger.table.t() + gamma * tagger.log_counts  # (N, V)
    if prior is not None and user is not None:
        s = s + lam * prior.term(user)
    keep = torch.tensor([t not in hidden for t in tagger.tags])
    s = torch.where(keep, s, -torch.inf)
    order = s.argsort(dim=1, descending=True, stable=True)[:, : min(k, int(keep.sum()))]
    return [[(tagger.tags[j], s[i, j].item()) for j in row] for i, row in enumerate(order.tolist())]


def same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        assert [s for _, s in g] == pytest.approx([s for _, s in w], abs=1e-5)


# ---- Tagger and predict
def test_tagger_hides_the_tags_marked_nonvisual(setup):
    tagger = Tagger.from_checkpoint(setup.ckpt)
    plain = tagger.tag_vectors(setup.u, k=10)
    tagger.use_visual_tags(setup.visual)
    assert tagger.num_hidden == len(setup.nonvisual) and tagger.visual_path == str(setup.visual)
    for gamma in (0.0, tagger.gamma, 2.0):
        got = tagger.tag_vectors(setup.u, k=10, gamma=gamma)
        assert all(len(row) == 10 and not {t for t, _ in row} & setup.nonvisual for row in got)  # k still filled
        same(got, brute(tagger, setup.u, 10, gamma, hidden=setup.nonvisual))
    got = tagger.tag_vectors(setup.u, k=10)
    for row, plain_row in zip(got, plain):  # a kept tag's score is the one it has without hiding, to the bit
        plain_scores = dict(plain_row)
        assert all(s == plain_scores[t] for t, s in row if t in plain_scores)
        assert any(t in setup.nonvisual for t, _ in plain_row)  # the file did hide something here
    # how many hidden tags scored above the last one shown: the brute-force count
    floors = [row[-1][1] for row in got]
    s = setup.u @ tagger.table.t() + tagger.gamma * tagger.log_counts
    hidden = torch.tensor([t in setup.nonvisual for t in tagger.tags])
    assert tagger.hidden_above(setup.u, floors) == ((s > torch.tensor(floors)[:, None]) & hidden).sum(1).tolist()
    assert tagger.tag_vectors(setup.u, k=10, hide=False) == plain  # hide=False: the plain lists, bit for bit
    visible = len(tagger.tags) - tagger.num_hidden
    assert [len(r) for r in tagger.tag_vectors(setup.u[:1], k=len(tagger.tags))] == [visible]  # all that is left
    # with an uploader: hidden tags stay hidden, the rest ranked by the user's score
    tagger.use_user_prior(setup.prior_path, lam=LAM)
    same(tagger.tag_vectors(setup.u, k=8, user=setup.known),
         brute(tagger, setup.u, 8, tagger.gamma, setup.prior, setup.known, LAM, setup.nonvisual))
    # an open vocabulary: hidden by name too
    vocab = [*sorted(setup.nonvisual)[:3], *tagger.tags[:20]]
    assert not {t for row in tagger.tag_vectors(setup.u, k=5, vocabulary=vocab) for t, _ in row} & setup.nonvisual
    tagger.use_visual_tags(None)
    assert tagger.tag_vectors(setup.u, k=10) == plain and tagger.num_hidden == 0


def test_bad_visual_tags_files_are_refused(setup, tmp_path):
    tagger = Tagger.from_checkpoint(setup.ckpt)
    (tmp_path / "garbage.tsv").write_text("just some words\nno columns here\n")
    (tmp_path / "binary.tsv").write_bytes(b"\xff\xfe\x00\x81" * 50)
    (tmp_path / "bad-value.tsv").write_text("tag\tvisual\nsky\tmaybe\n")
    (tmp_path / "other.tsv").write_text("# another checkpoint's\ntag\tvisual\nzzz-unknown\t0\n")
    for name, what in [("nope.tsv", "no file"), ("garbage.tsv", "not a tag visualness file"),
                       ("binary.tsv", "not a tag visualness file"), ("bad-value.tsv", "not 1, 0 or NA"),
                       ("other.tsv", "no tag of")]:
        with pytest.raises(ValueError if name != "nope.tsv" else FileNotFoundError, match=what):
            tagger.use_visual_tags(tmp_path / name)
    assert tagger.num_hidden == 0  # a refused file changes nothing


def test_predict_tag_visual_tags(setup, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in setup.photos:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "tags.jsonl"
    assert predict_main(["tag", str(setup.ckpt), str(folder), "--out", str(out), "--k", "6",
                         "--visual-tags", str(setup.visual)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tagger = Tagger.from_checkpoint(setup.ckpt)
    u = tagger.embed([folder / r["image"] for r in lines])
    same([[tuple(p) for p in r["tags"]] for r in lines], brute(tagger, u, 6, tagger.gamma, hidden=setup.nonvisual))
    capsys.readouterr()
    assert predict_main(["tag", str(setup.ckpt), str(folder), "--out", str(out), "--visual-tags",
                         str(tmp_path / "nope.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("im2vec: error: visual tags: no file") and err.count("\n") == 1, err


# ---- the demo's API
@pytest.fixture(scope="module")
def apps(setup):
    """Test clients: ``plain`` (no prior, no file), ``user`` (the prior, λ = LAM), ``both`` (and the visual file)."""
    plain = Tagger.from_checkpoint(setup.ckpt)
    user = Tagger.from_checkpoint(setup.ckpt)
    user.use_user_prior(setup.prior_path, lam=LAM)
    both = Tagger.from_checkpoint(setup.ckpt)
    both.use_user_prior(setup.prior_path, lam=LAM)
    both.use_visual_tags(setup.visual)
    return SimpleNamespace(**{name: TestClient(create_app(t)) for name, t in
                              (("plain", plain), ("user", user), ("both", both))}, tagger=plain)


def tag(client, path: Path, *, params=None, fields=None):
    return client.post("/api/tag", params={"k": 8, **(params or {})}, data=fields or {},
                       files={"image": (path.name, path.read_bytes())})


def test_the_api_takes_an_uploader(apps, setup):
    tagger, moved = apps.tagger, 0
    for i, photo in enumerate(setup.photos):
        none = tag(apps.user, photo).json()
        assert none["user"] is None
        same([none["tags"]], brute(tagger, setup.u[i : i + 1], 8, tagger.gamma))
        known = tag(apps.user, photo, params={"user": setup.known}).json()
        assert known["user"] == setup.known and known["user_seen"] is True and known["lambda"] == LAM
        assert "user_note" not in known
        same([known["tags"]], brute(tagger, setup.u[i : i + 1], 8, tagger.gamma, setup.prior, setup.known, LAM))
        moved += [t for t, _ in known["tags"]] != [t for t, _ in none["tags"]]
        # an uploader never seen in training: b = 0, the plain answer bit for bit, and it says so
        stranger = tag(apps.user, photo, fields={"user": "never-seen-uploader"}).json()
        assert stranger["tags"] == none["tags"] and stranger["user_seen"] is False
        assert "not seen in training" in stranger["user_note"]
        assert tag(apps.user, photo, params={"user": "  "}).json() == none  # blank: no user
    assert moved >= 1  # the known uploader's habits did change a ranking
    info = apps.user.get("/api/info").json()
    assert info["user_prior"] == {"path": str(setup.prior_path), "users": len(setup.prior.users), "lambda": LAM,
                                  "max_user_chars": MAX_USER_CHARS}
    assert info["visual_tags"] is None


def test_a_known_uploader_with_lambda_0_changes_nothing_and_says_so(setup):
    tagger = Tagger.from_checkpoint(setup.ckpt)
    tagger.use_user_prior(setup.prior_path, lam=0.0)
    client = TestClient(create_app(tagger))
    r = tag(client, setup.photos[0], params={"user": setup.known}).json()
    assert r["user_seen"] is True and r["lambda"] == 0.0 and "λ = 0" in r["user_note"]
    assert r["tags"] == tag(client, setup.photos[0]).json()["tags"]


def test_the_api_hides_nonvisual_tags(apps, setup):
    tagger = apps.tagger
    s = setup.u @ tagger.table.t() + tagger.gamma * tagger.log_counts  # (N, V)
    hidden_rows = torch.tensor([t in setup.nonvisual for t in tagger.tags])
    for i, photo in enumerate(setup.photos):
        r = tag(apps.both, photo).json()  # hidden by default
        assert r["hide"] is True and len(r["tags"]) == 8 and not {t for t, _ in r["tags"]} & setup.nonvisual
        same([r["tags"]], brute(tagger, setup.u[i : i + 1], 8, tagger.gamma, hidden=setup.nonvisual))
        assert r["hidden"] == int(((s[i] > r["tags"][-1][1]) & hidden_rows).sum()) >= 1  # its top 3 at least
        shown = tag(apps.both, photo, params={"hide": "0"}).json()  # the toggle off: the plain answer
        assert shown["hide"] is False and shown["hidden"] == 0
        assert shown["tags"] == tag(apps.plain, photo).json()["tags"]
        assert tag(apps.both, photo, fields={"hide": "false"}).json()["tags"] == shown["tags"]
        # with an uploader, too
        r = tag(apps.both, photo, params={"user": setup.known}).json()
        same([r["tags"]], brute(tagger, setup.u[i : i + 1], 8, tagger.gamma, setup.prior, setup.known, LAM,
                                setup.nonvisual))
    info = apps.both.get("/api/info").json()["visual_tags"]
    assert info == {"path": str(setup.visual), "nonvisual": len(setup.nonvisual) + 1, "hidden": len(setup.nonvisual)}
    plain = tag(apps.plain, setup.photos[0], params={"hide": "1"}).json()  # no file: nothing to hide
    assert plain["hide"] is False and plain["hidden"] == 0 and apps.plain.get("/api/info").json()["visual_tags"] is None


def test_user_suggestions_are_bounded(setup, tmp_path):
    tagger = Tagger.from_checkpoint(setup.ckpt)
    names = sorted(f"user{i:05d}" for i in range(5000))  # a large prior: 5,000 uploaders, no counts needed here
    UserPrior(names, torch.zeros(len(names) + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32),
              torch.zeros(0, dtype=torch.int32), torch.zeros(len(names), dtype=torch.int64),
              tagger.log_counts.exp().round().long(), lam=1.0).save(tmp_path / "many.pt")
    tagger.use_user_prior(tmp_path / "many.pt")
    client = TestClient(create_app(tagger))
    r = client.get("/api/users", params={"prefix": "user0"}).json()
    assert r == {"prefix": "user0", "users": names[:MAX_USERS], "more": True}
    assert client.get("/api/users", params={"prefix": "user0012"}).json() == {
        "prefix": "user0012", "users": [f"user0012{i}" for i in range(10)], "more": False}
    assert client.get("/api/users", params={"prefix": "user04999"}).json()["users"] == ["user04999"]
    assert client.get("/api/users", params={"prefix": "USER0012"}).json()["users"] == [f"user0012{i}" for i in range(10)]
    assert client.get("/api/users", params={"prefix": "zz"}).json()["users"] == []
    assert len(client.get("/api/users", params={"prefix": "", "k": 100}).json()["users"]) == MAX_USERS  # capped
    assert len(client.get("/api/users", params={"prefix": "u", "k": 3}).json()["users"]) == 3
    assert client.get("/api/users", params={"prefix": "x" * (MAX_USER_CHARS + 1)}).status_code == 400


def test_bad_user_requests_are_clear(apps, setup):
    photo = setup.photos[0]
    for client in (apps.user, apps.plain):
        for where in ("params", "fields"):
            r = tag(client, photo, **{where: {"user": "x" * (MAX_USER_CHARS + 1)}})
            assert r.status_code == 400 and f"at most {MAX_USER_CHARS} characters" in r.json()["error"]
    # no prior loaded: a user would change nothing, so it is refused rather than ignored
    for where in ("params", "fields"):
        r = tag(apps.plain, photo, **{where: {"user": setup.known}})
        assert r.status_code == 400 and "--user-prior" in r.json()["error"] and "\n" not in r.json()["error"]
    r = apps.plain.get("/api/users", params={"prefix": "a"})
    assert r.status_code == 404 and "--user-prior" in r.json()["error"]
    assert apps.plain.get("/api/info").json()["user_prior"] is None
    r = tag(apps.both, photo, params={"hide": "perhaps"})
    assert r.status_code == 400 and "hide must be 1 or 0" in r.json()["error"]


# ---- the command's options
def test_serve_options_and_their_defaults(setup, tmp_path, monkeypatch, capsys):
    """--user-prior and --visual-tags, their defaults beside the checkpoint, and refused files as one line."""
    import uvicorn

    made = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)  # build the app, serve nothing
    monkeypatch.setattr(serve, "create_app", lambda tagger, *a, **k: made.append(tagger))
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(setup.ckpt.read_bytes())
    assert serve.main([str(ckpt)]) == 0  # nothing beside it: no prior, no file
    assert made[-1].user_prior is None and made[-1].visual_path is None
    assert "no user prior" in capsys.readouterr().err
    (ckpt.parent / "user_prior.pt").write_bytes(setup.prior_path.read_bytes())
    (ckpt.parent / "visual_tags.tsv").write_bytes(setup.visual.read_bytes())
    assert serve.main([str(ckpt)]) == 0  # both found beside the checkpoint
    t = made[-1]
    assert t.user_prior_path == str(ckpt.parent / "user_prior.pt")
    assert t.visual_path == str(ckpt.parent / "visual_tags.tsv")
    assert t.num_hidden == len(setup.nonvisual) and t.user_lam == (setup.prior.lam or 0.0)
    err = capsys.readouterr().err
    assert f"{len(setup.prior.users):,} uploaders" in err and f"{len(setup.nonvisual):,} non-visual tags" in err
    assert serve.main([str(ckpt), "--user-prior", "none", "--visual-tags", "NONE"]) == 0
    assert made[-1].user_prior is None and made[-1].visual_path is None
    assert serve.main([str(setup.ckpt), "--user-prior", str(setup.prior_path), "--user-lambda", "2.5",
                       "--visual-tags", str(setup.visual)]) == 0
    assert made[-1].user_lam == 2.5 and made[-1].num_hidden == len(setup.nonvisual)
    capsys.readouterr()
    garbage = tmp_path / "garbage.tsv"
    garbage.write_text("not a visualness file\n")
    for argv, what in [
        ([str(setup.ckpt), "--user-prior", str(tmp_path / "nope.pt")], "no file"),
        ([str(setup.ckpt), "--visual-tags", str(tmp_path / "nope.tsv")], "no file"),
        ([str(setup.ckpt), "--visual-tags", str(garbage)], "not a tag visualness file"),
        ([str(setup.ckpt), "--user-prior", str(setup.visual)], "user prior"),
        ([str(setup.ckpt), "--user-prior", "none", "--user-lambda", "1"], "--user-lambda without a user prior"),
    ]:
        assert serve.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("im2vec: error: ") and err.count("\n") == 1 and what in err, err
