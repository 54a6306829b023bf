"""A web demo of a trained checkpoint: tag an image, search an indexed folder by tag, find similar tags.

    python -m im2vec.use.serve CKPT [--index index.pt] [--port 8000] [--host 127.0.0.1] [--device cpu]
                                [--max-upload-mb 20] [--threads N] [--user-prior FILE] [--user-lambda λ]
                                [--visual-tags FILE]

then open http://127.0.0.1:8000/ (the index is written by ``python -m im2vec.use.predict index``). The page,
im2vec/static/index.html, is plain HTML and JavaScript (no build step; it fetches nothing but this
server's own API, which its Content-Security-Policy enforces):

    POST /api/tag?k=10&gamma=0.2&user=NAME&hide=1
                                   multipart file field ``image`` (k, gamma, user, hide may also be form fields)
                                   -> {"tags": [[tag, score], ...], "gamma": γ, "k": k, "user": NAME or null,
                                       "user_seen": bool, "lambda": λ, "user_note": why the score is the plain one,
                                       "hide": bool, "hidden": how many non-visual tags were skipped to fill k}
    GET  /api/users?prefix=P&k=20  -> {"prefix": P, "users": [≤ 20 of the prior's uploaders starting with P],
                                       "more": bool}
    GET  /api/search?tag=T&k=24    -> {"tag": T, "images": [{"path": rel, "url": "/images/rel", "score": s}, ...]}
    GET  /api/similar?tag=T&k=10   -> {"tag": T, "tags": [[tag, cos], ...]}
    GET  /api/info                 -> the checkpoint, its vocabulary, γ, image size, the index and the limits
    GET  /images/REL               an image of the index

The uploader (``user``): with a per-uploader prior (``--user-prior FILE``; default user_prior.pt beside the
checkpoint, where there is one) the score adds λ·b(user, t) (README, "Each uploader's own habits"); a user not
seen in training gets b = 0, the plain score, and the answer says so. Without a prior, a request naming a user
is refused (400): it would change nothing, and silently ignoring it would look like it had. Non-visual tags:
with a file of ``python -m im2vec.visualness`` (``--visual-tags FILE``; default visual_tags.tsv beside the
checkpoint, where there is one), the tags it marks 0 are hidden unless a request says ``hide=0``; ``hidden``
counts those that scored above the last tag shown. ``none`` for either option loads nothing.

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
import contextlib
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from im2vec.errors import ArgumentParser, BadValue, NotFound, positive_int, run_cli
from im2vec.use.app import create_app
from im2vec.use.browser import screenshot
from im2vec.use.demo import usable_cores
from im2vec.use.predict import Tagger, load_index


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


# ---- the command
def _positive_float(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
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
    p.add_argument("--user-prior", metavar="FILE", default=None,
                   help="each uploader's tag counts (python -m im2vec.eval.user_prior build): the page takes an "
                        "uploader's name (default: user_prior.pt beside the checkpoint if there is one; "
                        "none: no prior)")
    p.add_argument("--user-lambda", type=_finite_float, default=None, help="λ of the per-uploader term (default: the file's, "
                   "chosen on validation)")
    p.add_argument("--visual-tags", metavar="FILE", default=None,
                   help="python -m im2vec.visualness's TSV: the page can hide the tags it marks 0 (default: "
                        "visual_tags.tsv beside the checkpoint if there is one; none: no file)")
    p.add_argument("--screenshot", metavar="OUT.png", default=None,
                   help="instead of serving: open the page in headless Chromium, tag --upload, search --query "
                        "(default: its top tag), save a screenshot and exit")
    p.add_argument("--upload", metavar="IMAGE", default=None, help="the image --screenshot tags")
    p.add_argument("--query", metavar="TAG", default=None, help="the tag --screenshot searches")
    return p


def beside(given: str | None, checkpoint: str, name: str) -> str | None:
    """The file an option names (``none``: no file), else ``name`` beside the checkpoint if it is there."""
    if given is not None:
        return None if given.lower() == "none" else given
    default = Path(checkpoint).with_name(name)
    return str(default) if default.is_file() else None


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
    torch.set_num_threads(args.threads or usable_cores())
    tagger = Tagger.from_checkpoint(args.checkpoint, args.device)
    index = load_index(args.index, tagger) if args.index else None
    if prior := beside(args.user_prior, args.checkpoint, "user_prior.pt"):
        tagger.use_user_prior(prior, args.user_lambda)
    elif args.user_lambda is not None:
        raise BadValue("--user-lambda without a user prior", "give --user-prior FILE (or put user_prior.pt beside "
                       "the checkpoint)")
    if visual := beside(args.visual_tags, args.checkpoint, "visual_tags.tsv"):
        tagger.use_visual_tags(visual)
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
    users = (f"{len(tagger.user_prior.users):,} uploaders of {prior} (λ = {tagger.user_lam:g})" if prior
             else "no user prior (--user-prior)")
    hides = (f"{tagger.num_hidden:,} non-visual tags of {visual} hidden by default" if visual
             else "no visual tags file (--visual-tags)")
    print(f"im2vec.use.serve: {tagger!r}; {what}; {users}; {hides}; open http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")).run()


if __name__ == "__main__":
    sys.exit(main())
