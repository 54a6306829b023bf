"""The web demo's ASGI app (im2vec.use.serve): its routes (the page, /api/tag, /api/search, /api/similar,
/api/users, /api/info, /images/), the checks of a request's parameters and upload (its size counted while
reading), and every refusal answered as JSON {"error": ...} with its 4xx status. The work behind the routes is
``Demo``'s (im2vec.use.demo)."""

from __future__ import annotations

import math
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from im2vec.data.images import MAX_PIXELS
from im2vec.use.demo import MAX_GAMMA, MAX_K, MAX_USERS, MB, ApiError, Demo
from im2vec.use.predict import Tagger

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_K = {"tag": 10, "search": 24, "similar": 10}
# the page may talk to this server only: no script, style, image or request goes anywhere else
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
NOSNIFF = {"X-Content-Type-Options": "nosniff"}


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


def bool_param(value: str | None, name: str, default: bool) -> bool:
    if value is None or value == "":
        return default
    v = value.strip().lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    raise ApiError(400, f"{name} must be 1 or 0 (true or false), got {value[:40]!r}")


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
    q = request.query_params
    k = int_param(q.get("k"), "k", DEFAULT_K["tag"])  # checked before reading the upload
    gamma = gamma_param(q.get("gamma"), demo.tagger.gamma)
    user = demo.known_user(q.get("user"))
    hide = bool_param(q.get("hide"), "hide", True)
    data, fields = await uploaded_image(request, demo.max_upload)
    if "k" in fields:
        k = int_param(fields["k"], "k", k)
    if "gamma" in fields:
        gamma = gamma_param(fields["gamma"], gamma)
    if "user" in fields:
        user = demo.known_user(fields["user"])
    if "hide" in fields:
        hide = bool_param(fields["hide"], "hide", hide)
    pixels = await run_in_threadpool(demo.decode, data)
    tags, hidden = await run_in_threadpool(demo.tag_pixels, pixels, min(k, len(demo.tagger.tags)), gamma, user, hide)
    return JSONResponse({"tags": [[t, s] for t, s in tags], "gamma": gamma, "k": k,
                         **user_answer(demo, user), **hide_answer(demo, hide, hidden)})


def user_answer(demo: Demo, user: str | None) -> dict:
    """What the answer says of the uploader: seen in training or not, the λ applied, and a note where the term
    did not change the score."""
    if user is None:
        return {"user": None}
    seen, lam = demo.tagger.knows_user(user), demo.tagger.user_lam
    out = {"user": user, "user_seen": seen, "lambda": lam}
    if not seen:
        out["user_note"] = f"{user!r} was not seen in training: the plain score (b = 0)"
    elif lam == 0:
        out["user_note"] = ("λ = 0 (the prior file's: not chosen, or chosen on validation where the term did not "
                            "help): the uploader's habits change nothing; serve --user-lambda sets another")
    return out


def hide_answer(demo: Demo, hide: bool, hidden: int) -> dict:
    """Whether non-visual tags were hidden, and how many of them scored above the last tag shown."""
    if demo.tagger.visual_path is None:
        return {"hide": False, "hidden": 0}
    return {"hide": hide, "hidden": hidden}


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


async def api_users(request: Request) -> Response:
    """The prior's uploaders starting with ?prefix= (at most ?k=, ≤ 20): suggestions for the page's user field."""
    demo: Demo = request.app.state.demo
    k = min(int_param(request.query_params.get("k"), "k", MAX_USERS), MAX_USERS)
    return JSONResponse(demo.users(request.query_params.get("prefix", ""), k))


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
        Route("/api/search", api_search), Route("/api/similar", api_similar), Route("/api/users", api_users),
        Route("/images/{path:path}", index_image),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: refused, HTTPException: refused, Exception: refused})
    app.state.demo = Demo(tagger, index, index_path, max_upload_mb, max_pixels)
    return app
