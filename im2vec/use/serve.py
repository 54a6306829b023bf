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
    torch.set_num_threads(args.threads or usable_cores())
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
