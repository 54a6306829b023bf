"""A web demo of a trained checkpoint: tag an image, search an indexed folder by tag, find similar tags.

    python -m im2vec.use.serve CKPT [--index index.pt] [--port 8000] [--host 127.0.0.1] [--device cpu]
                                [--max-upload-mb 20] [--threads N]

then open http://127.0.0.1:8000/ (the index is written by ``python -m im2vec.use.predict index``). The page,
im2vec/static/index.html, is plain HTML and JavaScript (no build step; it fetches nothing but this
server's own API, which its Content-Security-Policy enforces):

    POST /api/tag?k=10&gamma=0.2   multipart file field ``image`` (k, gamma may also be form fields)
                                   -> {"tags": [[tag, score], ...], "gamma": γ, "k": k}
    GET  /api/search?tag=T&k=24    -> {"tag": T, "images": [{"path": rel, "url": "/images/rel", "score": s}, ...]}
    GET  /api/similar?tag=T&k=10   -> {"tag": T, "tags": [[tag, cos], ...]}
    GET  /api/info                 -> the checkpoint, its vocabulary, γ, image size, the index and the limits
    GET  /images/REL               an image of the index

The scores are Tagger's (im2vec/use/predict.py): an upload goes through the evaluation preprocessing as a
file would (``read_image``), so /api/tag answers exactly what ``Tagger.tag`` does on that file.

Every mistake in a request is a 4xx with {"error": "..."}, never a 500: a body over --max-upload-mb
(by Content-Length, and by the bytes counted while reading, for uploads without one) is 413, and so is
a decompression bomb; an empty upload or a missing ``image`` field is 400, a body that is not
multipart 415, bytes that are not a readable image (a truncated JPEG too) 422, a bad k or γ 400. An
unknown tag is 404 with ``suggestions``: known tags that start like it or are spelled like it.
/images/ serves only the paths the index lists, and only while the file, symlinks resolved, lies inside
the index's folder: anything else (``..``, absolute or encoded paths, a symlink leading out) is 404.

``--screenshot OUT.png --upload IMAGE [--query TAG]`` serves nothing: it opens the page in headless
Chromium (Debian's /usr/bin/chromium through Playwright), tags IMAGE, searches TAG (default: its top tag)
and saves the picture; docs/demo.png was made so.

The model is loaded once. Requests run concurrently, but every torch call (encoder, scoring, search)
holds one lock: the encoder already uses every core through torch's intra-op threads, so two at once
would only fight over them; image decoding runs outside the lock, a few at a time.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import difflib
import functools
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from torch import Tensor

from im2vec.data.images import MAX_PIXELS, TooLarge, open_image
from im2vec.data.samples import eval_view, to_uint8_tensor
from im2vec.errors import ArgumentParser, BadValue, NotFound, positive_int, run_cli
from im2vec.use.predict import Tagger, UnknownTag, load_index

STATIC = Path(__file__).resolve().parent / "static"
MB = 1 << 20
MAX_K = 100  # tags or images per answer: enough for a page, small enough that no request is expensive
MAX_GAMMA = 10.0  # the page's slider goes to 4; validation sweeps 0..4
MAX_TAG_CHARS = 200
DEFAULT_K = {"tag": 10, "search": 24, "similar": 10}
# the page may talk to this server only: no script, style, image or request goes anywhere else
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
NOSNIFF = {"X-Content-Type-Options": "nosniff"}


class ApiError(Exception):
    """A request the server refuses: answered ``status`` with {"error": message, **extra}."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class Demo:
    """What the app serves: a Tagger, optionally an index of a folder, and the limits."""

    def __init__(self, tagger: Tagger, index: dict | None = None, index_path: str | None = None,
                 max_upload_mb: float = 20.0, max_pixels: int = MAX_PIXELS):
        self.tagger, self.index, self.index_path = tagger, index, index_path
        self.max_upload = int(max_upload_mb * MB)
        self.max_pixels = max_pixels
        self.lock = threading.Lock()  # one torch call at a time (see the module docstring)
        # decoding a large image takes memory (up to max_pixels × 3 bytes): a few at a time
        self.decoding = threading.BoundedSemaphore(max(2, _cores()))
        self.sorted_tags = sorted(tagger.tags)  # prefix suggestions by bisection
        self.by_length: dict[int, list[str]] = {}  # close spellings are of about the same length
        for t in tagger.tags:
            self.by_length.setdefault(len(t), []).append(t)
        # about a second per unknown tag at 600k tags (difflib): a typo asked again is answered from here
        self.suggestions = functools.lru_cache(maxsize=1024)(self._suggestions)
        if index is not None:
            self.root = Path(index["root"]).resolve()
            self.paths = frozenset(index["paths"])  # /images/ serves these and nothing else
            self.vectors = index["vectors"].float()

    # ---- the torch calls, each under the lock (run in the threadpool, never on the event loop)
    def tag_pixels(self, pixels: Tensor, k: int, gamma: float) -> list[tuple[str, float]]:
        with self.lock:
            return self.tagger.tag_vectors(self.tagger.embed(pixels[None]), k, gamma)[0]

    def search(self, tag: str, k: int) -> list[dict]:
        with self.lock:
            hits = self.tagger.search(self.vectors, tag, k)
        return [{"path": self.index["paths"][i], "url": "/images/" + _quote(self.index["paths"][i]), "score": s}
                for i, s in hits]

    def similar(self, tag: str, k: int) -> list[tuple[str, float]]:
        with self.lock:
            return self.tagger.similar_tags(tag, k)

    # ---- requests -> checked values
    def decode(self, data: bytes) -> Tensor:
        """Uploaded bytes -> (3, S, S) uint8, as ``read_image`` reads a file."""
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        with self.decoding:
            try:
                return to_uint8_tensor(eval_view(open_image(data, self.max_pixels), self.tagger.image_size))
            except TooLarge as e:
                raise ApiError(413, f"the image is too large to decode ({e})") from None
            except UnidentifiedImageError:  # its message names a BytesIO object: nothing the user can act on
                raise ApiError(422, "not an image (no image format this server reads)") from None
            except Exception as e:  # noqa: BLE001 -- PIL raises many kinds on bad bytes (a truncated JPEG: OSError)
                raise ApiError(422, f"not a readable image ({type(e).__name__}: {e})") from None

    def known_tag(self, tag: str | None) -> str:
        """``tag`` if the vocabulary has it; else 404 with the tags nearest by spelling."""
        if tag is None or not tag.strip():
            raise ApiError(400, "give a tag: ?tag=...")
        if len(tag) > MAX_TAG_CHARS:
            raise ApiError(400, f"a tag is at most {MAX_TAG_CHARS} characters")
        try:
            self.tagger.row(tag)
            return tag
        except UnknownTag as e:
            raise ApiError(404, str(e), tag=tag, suggestions=list(self.suggestions(tag))) from None

    def _suggestions(self, tag: str, n: int = 8) -> tuple[str, ...]:
        """Known tags for an unknown one: its normalized spelling, tags it begins, then close spellings."""
        q = tag.strip().lower()
        out = [q] if q in self.tagger.rows else []
        i = bisect.bisect_left(self.sorted_tags, q)
        while i < len(self.sorted_tags) and len(out) < n // 2 and self.sorted_tags[i].startswith(q):
            out.append(self.sorted_tags[i])
            i += 1
        # difflib compares with every candidate: only tags of about the same length can be close anyway
        w = max(2, len(q) // 3)
        near = [t for length in range(len(q) - w, len(q) + w + 1) for t in self.by_length.get(length, ())]
        out += difflib.get_close_matches(q, near, n=n, cutoff=0.6)
        return tuple(dict.fromkeys(out))[:n]  # cached: not to be changed by a caller

    def index_file(self, rel: str) -> Path:
        """The file behind /images/REL, or 404: REL must be listed in the index, and the file, once
        symlinks are resolved, must lie inside the index's folder."""
        if self.index is None or rel not in self.paths:
            raise ApiError(404, "no such image in the index")
        try:
            path = (self.root / rel).resolve(strict=True)
        except (OSError, RuntimeError):  # missing since the index was built, or a symlink loop
            raise ApiError(404, "no such image in the index") from None
        if not path.is_relative_to(self.root) or not path.is_file():
            raise ApiError(404, "no such image in the index")
        return path

    def info(self) -> dict:
        t = self.tagger
        return {"checkpoint": str(t.path), "tags": len(t.tags), "dim": t.dim, "gamma": t.gamma,
                "image_size": t.image_size, "device": str(t.device), "index": self.index is not None,
                "index_path": self.index_path, "index_root": str(self.root) if self.index else None,
                "index_size": len(self.index["paths"]) if self.index else 0,
                "max_upload_mb": self.max_upload / MB, "max_k": MAX_K, "max_gamma": MAX_GAMMA}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _quote(rel: str) -> str:
    from urllib.parse import quote

    return quote(rel, safe="/")


def int_param(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number, got {value[:40]!r}") from None
    if not 1 <= k <= MAX_K:
        raise ApiError(400, f"{name} must be between 1 and {MAX_K}, got {k}")
    return k


def gamma_param(value: str | None, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        g = float(value)
    except ValueError:
        raise ApiError(400, f"gamma must be a number, got {value[:40]!r}") from None
    if not (math.isfinite(g) and 0.0 <= g <= MAX_GAMMA):
        raise ApiError(400, f"gamma must be between 0 and {MAX_GAMMA:g}, got {value[:40]!r}")
    return g


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes: by its
    Content-Length before anything is read, else by counting (a chunked upload has no length)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, f"bad Content-Length {length[:40]!r}")
        if int(length) > limit:
            raise ApiError(413, f"the upload ({int(length) / MB:.1f} MB) is over the limit of {limit / MB:g} MB")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the upload is over the limit of {limit / MB:g} MB")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client went away during the upload") from None
    return b"".join(chunks)


async def uploaded_image(request: Request, limit: int) -> tuple[bytes, dict]:
    """The bytes of the multipart field ``image``, and the other form fields."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the image as multipart/form-data, in a file field named 'image'")
    body = await read_body(request, limit)

    async def replay() -> dict:  # the body, read and counted above, for Starlette's multipart parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except HTTPException as e:  # python-multipart's complaints: a malformed body
        raise ApiError(400, f"bad multipart body: {e.detail}") from None
    upload = form.get("image")
    if upload is None:
        raise ApiError(400, "no file field named 'image' in the upload")
    if isinstance(upload, str):
        raise ApiError(400, "the field 'image' must be a file, not text")
    data = await upload.read()
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    await form.close()
    return data, fields


# ---- the routes
async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP, **NOSNIFF,
                                                        "Cache-Control": "no-cache"})


async def api_info(request: Request) -> Response:
    return JSONResponse(request.app.state.demo.info())


async def api_tag(request: Request) -> Response:
    demo: Demo = request.app.state.demo
    k = int_param(request.query_params.get("k"), "k", DEFAULT_K["tag"])  # checked before reading the upload
    gamma = gamma_param(request.query_params.get("gamma"), demo.tagger.gamma)
    data, fields = await uploaded_image(request, demo.max_upload)
    if "k" in fields:
        k = int_param(fields["k"], "k", k)
    if "gamma" in fields:
        gamma = gamma_param(fields["gamma"], gamma)
    pixels = await run_in_threadpool(demo.decode, data)
    tags = await run_in_threadpool(demo.tag_pixels, pixels, min(k, len(demo.tagger.tags)), gamma)
    return JSONResponse({"tags": [[t, s] for t, s in tags], "gamma": gamma, "k": k})


async def api_search(request: Request) -> Response:
    demo: Demo = request.app.state.demo
    k = int_param(request.query_params.get("k"), "k", DEFAULT_K["search"])
    if demo.index is None:
        raise ApiError(404, "no index is loaded: start the server with --index INDEX "
                            "(written by `python -m im2vec.use.predict index CKPT FOLDER --out INDEX`)", no_index=True)
    tag = await run_in_threadpool(demo.known_tag, request.query_params.get("tag"))
    return JSONResponse({"tag": tag, "images": await run_in_threadpool(demo.search, tag, k)})


async def api_similar(request: Request) -> Response:
    demo: Demo = request.app.state.demo
    k = int_param(request.query_params.get("k"), "k", DEFAULT_K["similar"])
    tag = await run_in_threadpool(demo.known_tag, request.query_params.get("tag"))
    tags = await run_in_threadpool(demo.similar, tag, k)
    return JSONResponse({"tag": tag, "tags": [[t, s] for t, s in tags]})


async def index_image(request: Request) -> Response:
    path = request.app.state.demo.index_file(request.path_params["path"])
    return FileResponse(path, headers={**NOSNIFF, "Cache-Control": "max-age=3600"})


async def refused(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)
    if isinstance(exc, HTTPException):  # Starlette's own: an unknown route (404), a wrong method (405)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    # a bug: still JSON, so that the page can say something (Starlette re-raises it: uvicorn logs the traceback)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def create_app(tagger: Tagger, index: dict | None = None, index_path: str | None = None,
               max_upload_mb: float = 20.0, max_pixels: int = MAX_PIXELS) -> Starlette:
    """The demo's ASGI app around an already loaded Tagger (and index, from ``load_index``)."""
    routes = [
        Route("/", page), Route("/api/info", api_info), Route("/api/tag", api_tag, methods=["POST"]),
        Route("/api/search", api_search), Route("/api/similar", api_similar),
        Route("/images/{path:path}", index_image),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: refused, HTTPException: refused, Exception: refused})
    app.state.demo = Demo(tagger, index, index_path, max_upload_mb, max_pixels)
    return app


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """``app`` served by uvicorn from a thread of this process; yields its base URL. The socket is bound
    here (port 0: a free one, no race with another process picking the same) and closed on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="im2vec-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# ---- the page in a headless browser (the README's picture; tests/test_browser.py drives it the same way)
CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright drives it, nothing downloaded (no `playwright install`)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ALL_LOADED = "() => [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"


def wait_until(page, js: str, timeout: float = 10.0) -> None:
    """Poll ``js`` (a function) in the page until it is true. Not ``page.wait_for_function``: that evaluates
    a string inside the page, which the page's Content-Security-Policy (no 'unsafe-eval') refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never made this true: {js}")
        time.sleep(0.05)


def screenshot(url: str, out: str | os.PathLike, image: str | os.PathLike, tag: str | None = None,
               size: tuple[int, int] = (1200, 800)) -> None:
    """Open the page at ``url``, upload ``image``, search ``tag`` (default: the image's top tag), save a PNG."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(url)
            page.wait_for_selector("body[data-ready]")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#tags li")
            page.fill("#tag", tag or page.get_attribute("#tags li", "data-tag"))
            page.press("#tag", "Enter")
            page.wait_for_selector("#grid img, #noindex:not([hidden]), #suggest:not([hidden])")
            wait_until(page, ALL_LOADED)
            page.screenshot(path=str(out))
        finally:
            browser.close()


# ---- the command
def _positive_float(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m im2vec.use.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a training checkpoint (e.g. outputs/.../checkpoints/last.ckpt)")
    p.add_argument("--index", default=None, help="an index of a folder (python -m im2vec.use.predict index), for search")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="where the encoder runs (cpu, cuda, ...)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=20.0, help="largest upload accepted (MB)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch's intra-op threads (default: every core "
                                                              "this process may use)")
    p.add_argument("--screenshot", metavar="OUT.png", default=None,
                   help="instead of serving: open the page in headless Chromium, tag --upload, search --query "
                        "(default: its top tag), save a screenshot and exit")
    p.add_argument("--upload", metavar="IMAGE", default=None, help="the image --screenshot tags")
    p.add_argument("--query", metavar="TAG", default=None, help="the tag --screenshot searches")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; a missing or refused checkpoint or index is one line `im2vec: error: …`, status 2."""
    return run_cli(_run, argv, exit=False)


def _run(argv: list[str]) -> None:
    import uvicorn

    args = parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise BadValue(f"--port {args.port}", "give a port between 0 and 65535")
    if args.screenshot and not (args.upload and Path(args.upload).is_file()):
        raise NotFound(f"--upload {args.upload}: not a file", "--screenshot needs an image to tag: --upload IMAGE")
    # one request's encoder call at a time (the lock): it may use every core
    torch.set_num_threads(args.threads or _cores())
    tagger = Tagger.from_checkpoint(args.checkpoint, args.device)
    index = load_index(args.index, tagger) if args.index else None
    if index is not None and not Path(index["root"]).is_dir():
        print(f"im2vec.use.serve: warning: the index's folder {index['root']} is missing: search works, its images "
              "will not show", file=sys.stderr)
    app = create_app(tagger, index, args.index, args.max_upload_mb)
    if args.screenshot:
        with running(app, args.host, 0) as url:
            screenshot(url + "/", args.screenshot, args.upload, args.query)
        print(f"im2vec.use.serve: screenshot -> {args.screenshot}", file=sys.stderr)
        return
    what = f"{len(index['paths']):,} images of {index['root']}" if index else "no index (--index for search)"
    print(f"im2vec.use.serve: {tagger!r}; {what}; open http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")).run()


if __name__ == "__main__":
    sys.exit(main())
