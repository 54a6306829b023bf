"""The web demo (im2vec.use.serve): its answers against Tagger's own, every kind of bad request answered
4xx (never 500), /images/ confined to the index's files, the command's one-line errors, and 200
concurrent requests against the real server."""

import http.client
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, png_bomb
from PIL import Image

pytest.importorskip("starlette", reason="the demo needs the serve extra: pip install -e '.[serve]'")
from starlette.testclient import TestClient  # noqa: E402

from im2vec.bench.serve_load import Client, Job, fire, mixed_jobs, multipart, search_job  # noqa: E402
from im2vec.use.demo import MB  # noqa: E402
from im2vec.use.predict import Tagger, load_index  # noqa: E402
from im2vec.use.predict import main as predict_main  # noqa: E402
from im2vec.use.serve import create_app, running  # noqa: E402
from im2vec.use.serve import main as serve_main  # noqa: E402

SECRET = b"outside the indexed folder"


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny training run (conftest.tiny_run): its checkpoint, a Tagger on it, held-out JPEGs."""
    return SimpleNamespace(ckpt=tiny_run.ckpt, jpegs=tiny_run.jpegs, tagger=Tagger.from_checkpoint(tiny_run.ckpt))


@pytest.fixture(scope="module")
def photos(trained, tmp_path_factory):
    """An indexed folder (nested, three formats, names that need quoting in a URL), with files beside the
    index's: one it skipped, one with no image suffix, and a symlink to an image outside the folder."""
    base = tmp_path_factory.mktemp("serve-photos")
    root, outside = base / "photos", base / "outside"
    (root / "trip" / "day 2").mkdir(parents=True)
    outside.mkdir()
    names = ["a.jpg", "b.jpg", "trip/c.jpg", "trip/day 2/d #1%.jpg", "e.png", "f.bmp", "g.jpg", "h.jpg"]
    for name, data in zip(names, trained.jpegs):
        if name.endswith((".png", ".bmp")):
            Image.open(io.BytesIO(data)).save(root / name)
        else:
            (root / name).write_bytes(data)
    (outside / "secret.jpg").write_bytes(trained.jpegs[9])
    (outside / "passwd").write_bytes(SECRET)
    (root / "link.jpg").symlink_to(outside / "secret.jpg")  # indexed (it reads as an image), never served
    (root / "cut.jpg").write_bytes(trained.jpegs[10][:300])  # unreadable: skipped by the index
    (root / "notes.txt").write_bytes(SECRET)
    index_path = base / "index.pt"
    assert predict_main(["index", str(trained.ckpt), str(root), "--out", str(index_path)]) == 0
    index = load_index(index_path, trained.tagger)
    assert sorted(index["paths"]) == sorted([*names, "link.jpg"])
    return SimpleNamespace(root=root, outside=outside, names=names, index=index, index_path=index_path)


@pytest.fixture(scope="module")
def app(trained, photos):
    return create_app(trained.tagger, photos.index, str(photos.index_path))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def server(app):
    """The same app served by uvicorn on a free loopback port."""
    with running(app) as url:
        yield url


def upload(client, data: bytes, *, k=None, gamma=None, fields=None, filename="x.jpg"):
    params = {key: v for key, v in (("k", k), ("gamma", gamma)) if v is not None}
    return client.post("/api/tag", params=params, data=fields or {}, files={"image": (filename, data)})


def same_tags(got: list, want: list[tuple[str, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_info_and_page(client, trained, photos):
    info = client.get("/api/info").json()
    t = trained.tagger
    assert info == {**info, "checkpoint": str(trained.ckpt), "tags": len(t.tags), "dim": t.dim, "gamma": t.gamma,
                    "image_size": t.image_size, "index": True, "index_size": len(photos.index["paths"]),
                    "index_root": str(photos.root.resolve()), "max_upload_mb": 20.0}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for needed in ('id="file"', 'id="gamma"', 'id="tags"', 'id="tag"', 'id="grid"', "No index is loaded"):
        assert needed in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.post("/").status_code == 405


def test_tag_answers_what_tagger_does(client, trained, photos):
    tagger = trained.tagger
    for name in photos.names[:5]:
        path = photos.root / name
        data = path.read_bytes()
        r = upload(client, data, filename=Path(name).name)
        assert r.status_code == 200
        assert r.json()["gamma"] == tagger.gamma and r.json()["k"] == 10
        same_tags(r.json()["tags"], tagger.tag(path, k=10)[0])
        for gamma in (0.0, 2.5):
            same_tags(upload(client, data, k=7, gamma=gamma).json()["tags"], tagger.tag(path, k=7, gamma=gamma)[0])
        # k and gamma as form fields, as a plain HTML form would send them
        r = upload(client, data, fields={"k": "3", "gamma": "1.5"})
        assert r.json()["gamma"] == 1.5
        same_tags(r.json()["tags"], tagger.tag(path, k=3, gamma=1.5)[0])
    r = upload(client, photos.root.joinpath("a.jpg").read_bytes(), k=100)  # more than the vocabulary has
    assert r.status_code == 200 and len(r.json()["tags"]) == min(100, len(tagger.tags))


def test_search_and_similar_answer_what_tagger_does(client, trained, photos):
    tagger, paths = trained.tagger, photos.index["paths"]
    tags = [tagger.tags[0], tagger.tags[7], *(t for t, _ in tagger.tag(photos.root / "a.jpg", k=3)[0])]
    for tag in tags:
        r = client.get("/api/search", params={"tag": tag, "k": 5})
        assert r.status_code == 200 and r.json()["tag"] == tag
        want = tagger.search(photos.index["vectors"], tag, 5)
        assert [h["path"] for h in r.json()["images"]] == [paths[i] for i, _ in want]
        assert [h["score"] for h in r.json()["images"]] == pytest.approx([s for _, s in want], abs=1e-5)
        assert len(client.get("/api/search", params={"tag": tag}).json()["images"]) == len(paths)  # k=24 > 9 images
        r = client.get("/api/similar", params={"tag": tag, "k": 6})
        assert r.status_code == 200
        same_tags(r.json()["tags"], tagger.similar_tags(tag, 6))
    for hit in client.get("/api/search", params={"tag": tags[0], "k": 20}).json()["images"]:
        if hit["path"] == "link.jpg":
            continue  # listed, but it leads out of the folder: refused (test_images_stay_inside_the_index)
        r = client.get(hit["url"])  # the URLs are quoted: "trip/day 2/d #1%.jpg" comes back whole
        assert r.status_code == 200 and r.content == (photos.root / hit["path"]).read_bytes()
        assert r.headers["x-content-type-options"] == "nosniff"


def test_unknown_tags_get_suggestions(client, trained):
    known = next(t for t in trained.tagger.tags if len(t) >= 6 and t.isalpha())
    misspelled = known[:2] + known[3:]  # one letter dropped
    for endpoint in ("/api/similar", "/api/search"):
        r = client.get(endpoint, params={"tag": misspelled})
        assert r.status_code == 404
        assert "unknown tag" in r.json()["error"] and known in r.json()["suggestions"]
    assert known in client.get("/api/similar", params={"tag": known.upper()}).json()["suggestions"]
    starting = [t for t in sorted(trained.tagger.tags) if t.startswith(known[:3])][:4]  # the first 4 by bisection
    suggestions = client.get("/api/similar", params={"tag": known[:3]}).json()["suggestions"]
    assert known[:3] not in trained.tagger.tags and suggestions[: len(starting)] == starting
    assert client.get("/api/similar", params={"tag": "§§§"}).json()["suggestions"] == []
    for bad in ({}, {"tag": ""}, {"tag": "   "}, {"tag": "x" * 201}):
        r = client.get("/api/similar", params=bad)
        assert r.status_code == 400 and r.json()["error"]


def test_without_an_index(trained):
    client = TestClient(create_app(trained.tagger))
    assert client.get("/api/info").json()["index"] is False
    r = client.get("/api/search", params={"tag": trained.tagger.tags[0]})
    assert r.status_code == 404 and r.json()["no_index"] is True and "--index" in r.json()["error"]
    assert client.get("/images/a.jpg").status_code == 404
    assert client.get("/api/similar", params={"tag": trained.tagger.tags[0]}).status_code == 200


def test_bad_uploads_are_4xx_with_a_reason(client, trained):
    jpeg = trained.jpegs[0]
    cases = {
        "empty file": (upload(client, b""), 400),
        "text": (upload(client, b"hello, not an image"), 422),
        "truncated jpeg": (upload(client, jpeg[: len(jpeg) // 3]), 422),
        "png header only": (upload(client, png_bomb(64, 64)[:40]), 422),
        "decompression bomb": (upload(client, png_bomb(30000, 30000)), 413),
        "no image field": (client.post("/api/tag", files={"picture": ("x.jpg", jpeg)}), 400),
        "image as text": (client.post("/api/tag", data={"image": "not a file"}, files={"k": ("k", b"3")}), 400),
        "not multipart": (client.post("/api/tag", json={"image": "x"}), 415),
        "no body": (client.post("/api/tag"), 415),
        "bad boundary": (client.post("/api/tag", content=b"garbage",
                                     headers={"content-type": "multipart/form-data; boundary=zzz"}), 400),
        "GET": (client.get("/api/tag"), 405),
    }
    for what, (r, status) in cases.items():
        assert (what, r.status_code) == (what, status), r.text
        assert isinstance(r.json()["error"], str) and r.json()["error"], what
    assert "too large" in cases["decompression bomb"][0].json()["error"]


def test_uploads_over_the_limit_are_413(client, trained):
    big = trained.jpegs[0] + b"\0" * (20 * MB)  # a readable JPEG with trailing bytes: only its size is wrong
    r = upload(client, big)
    assert r.status_code == 413 and "20 MB" in r.json()["error"]
    body, content_type = multipart(big)

    def chunks():  # no Content-Length: the server must count
        for i in range(0, len(body), MB):
            yield body[i : i + MB]

    r = client.post("/api/tag", content=chunks(), headers={"content-type": content_type})
    assert "content-length" not in r.request.headers and r.status_code == 413
    r = client.post("/api/tag", content=body[:100], headers={"content-type": content_type, "content-length": "1e9"})
    assert r.status_code == 400
    small = TestClient(create_app(trained.tagger, max_upload_mb=0.01))  # 10 KiB: the JPEGs are smaller
    assert upload(small, trained.jpegs[0]).status_code == 200
    assert upload(small, trained.jpegs[0] + b"\0" * 20_000).status_code == 413


@pytest.mark.parametrize("k", ["0", "-1", "abc", "nan", "2.5", "101", "1000000000", "1e3"])
def test_bad_k_is_400(client, trained, k):
    tag = trained.tagger.tags[0]
    for r in (upload(client, trained.jpegs[0], k=k), client.get("/api/search", params={"tag": tag, "k": k}),
              client.get("/api/similar", params={"tag": tag, "k": k})):
        assert r.status_code == 400 and "k must be" in r.json()["error"]


@pytest.mark.parametrize("gamma", ["abc", "nan", "-1", "inf", "-inf", "1e9", "11"])
def test_bad_gamma_is_400(client, trained, gamma):
    for r in (upload(client, trained.jpegs[0], gamma=gamma),
              upload(client, trained.jpegs[0], fields={"gamma": gamma})):
        assert r.status_code == 400 and "gamma must be" in r.json()["error"]


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written: no client normalizes its dots or its escapes on the way."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


TRAVERSALS = [
    "../outside/passwd", "../../etc/passwd", "trip/../../outside/passwd", "..%2foutside%2fpasswd",
    "%2e%2e/outside/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%252e%252e%252foutside%252fpasswd",
    "..%252foutside%252fpasswd", "..\\outside\\passwd", "..%5coutside%5cpasswd", "/etc/passwd", "%2fetc%2fpasswd",
    "//etc/passwd", str(ROOT / "README.md"), "%2F" + str(ROOT / "README.md").lstrip("/"),
    "link.jpg",  # in the index, but a symlink out of the folder
    "cut.jpg", "notes.txt",  # in the folder, not in the index
    "./a.jpg", "trip/./c.jpg", "trip//c.jpg", "A.JPG", "a.jpg%00", "a.jpg/", "trip", "trip/", "", "%20a.jpg",
]


@pytest.mark.parametrize("rel", TRAVERSALS)
def test_images_stay_inside_the_index(server, rel):
    status, body = raw_get(server, "/images/" + rel)
    assert status == 404 and "error" in json.loads(body)
    assert SECRET not in body and b"root:" not in body


def test_images_of_the_index_are_served(server, photos):
    for name in photos.names:
        status, body = raw_get(server, "/images/" + name.replace(" ", "%20").replace("#", "%23").replace("%.", "%25."))
        assert status == 200 and body == (photos.root / name).read_bytes()


def test_a_tampered_index_cannot_lead_out(trained, photos):
    """Membership in the index is not enough: the file, symlinks resolved, must lie inside the folder."""
    index = {**photos.index, "paths": ["../outside/passwd", str(photos.outside / "passwd"), "link.jpg", "a.jpg"]}
    client = TestClient(create_app(trained.tagger, index))
    for rel in index["paths"][:3]:
        assert client.get("/images/" + rel).status_code == 404
    assert client.get("/images/a.jpg").status_code == 200


def test_missing_files_are_one_line_errors(capsys, trained, tmp_path):
    for argv, what in [
        ([str(tmp_path / "nope.ckpt")], "nope.ckpt"),
        ([str(trained.ckpt), "--index", str(tmp_path / "nope.pt")], "nope.pt"),
        ([str(trained.ckpt), "--max-upload-mb", "0"], "--max-upload-mb"),
        ([str(trained.ckpt), "--port", "70000"], "--port"),
    ]:
        assert serve_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("im2vec: error: ") and err.count("\n") == 1 and what in err, err


def test_200_concurrent_requests_answer_right(server, trained, photos):
    """8 clients, 200 requests, half uploads and half searches, on the real server: every answer 200 and
    the one Tagger gives (the same tags for the same image every time). Bounded in count, not timed."""
    tagger, index = trained.tagger, photos.index
    files = [photos.root / n for n in photos.names[:4]]
    tags = [tagger.tag(f, k=1)[0][0][0] for f in files]
    answers, _ = fire(server, mixed_jobs([f.read_bytes() for f in files], tags, 200), concurrency=8)
    assert len(answers) == 200
    for i, a in enumerate(answers):  # mixed_jobs: uploads at even i, searches at odd i, each cycling
        assert a.status == 200, a.body
        if i % 2 == 0:
            same_tags(a.body["tags"], tagger.tag(files[i // 2 % len(files)], k=5)[0])
        else:
            tag = tags[i // 2 % len(tags)]
            assert a.body["tag"] == tag
            assert [h["path"] for h in a.body["images"]] == [index["paths"][j] for j, _ in
                                                             tagger.search(index["vectors"], tag, 10)]


def test_chunked_upload_to_the_real_server(server, trained):
    """Through uvicorn: a chunked upload under the limit is tagged, one over it is refused with 413."""
    host, port = server.removeprefix("http://").split(":")
    body, content_type = multipart(trained.jpegs[0])
    for payload, status in ((body, 200), (body + b"\0" * (21 * MB), 413)):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.putrequest("POST", "/api/tag")
            conn.putheader("Content-Type", content_type)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            try:
                for i in range(0, len(payload), MB):
                    chunk = payload[i : i + MB]
                    conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered 413 and closed while we were still sending
            r = conn.getresponse()
            assert r.status == status and ("error" in json.loads(r.read())) == (status != 200)
        finally:
            conn.close()


def test_one_client_keeps_its_connection(server, trained):
    """Keep-alive: the second request goes over the first one's socket (the same local port). The
    HTTPConnection object alone proves nothing: http.client reopens a closed connection inside it."""
    c = Client(server)
    try:
        first = c.send(search_job(trained.tagger.tags[0]))
        sock = c.conn.sock
        assert sock is not None, "the server closed the connection after the first answer"
        port = sock.getsockname()[1]
        second = c.send(Job("info", "GET", "/api/info"))
        assert first.status == second.status == 200 and second.body["index"] is True
        assert c.conn.sock is sock and c.conn.sock.getsockname()[1] == port
    finally:
        c.close()
