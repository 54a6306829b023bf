"""Load benchmark of the web demo (im2vec.use.serve): latency and throughput under concurrent clients.

    python -m im2vec.bench.serve_load CKPT --index INDEX --requests 200 --concurrency 8
    python -m im2vec.bench.serve_load --url http://127.0.0.1:8000 --images FOLDER   # a server already running

Starts ``python -m im2vec.use.serve CKPT --index INDEX`` in a child process on a free loopback port (its own
process: the clients' threads must not share the server's interpreter lock), or uses ``--url``. Then
``--concurrency`` client threads, each with its own keep-alive connection, send ``--requests`` requests
between them: every other one an upload to /api/tag of one of ``--distinct`` images (from the index's
folder, or ``--images``), the others /api/search for a tag those images were given. Every answer must be
200 and the same as the first answer to the same request (the same image gets the same tags); the run
fails otherwise. Prints p50 / p99 latency per kind and overall and requests per second (wall clock, from
the first request sent to the last answer).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from im2vec.errors import ArgumentParser, BadValue, NotFound, run_cli

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")  # use.image_files.IMAGE_SUFFIXES, without torch


@dataclass(frozen=True)
class Job:
    kind: str  # "tag" or "search": what the figures are grouped by
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class Answer:
    job: Job
    status: int
    body: dict
    seconds: float


def multipart(data: bytes, filename: str = "image.jpg", field: str = "image",
              fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field (and text fields): (body, its Content-Type)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in (fields or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def tag_job(data: bytes, k: int = 5, gamma: float | None = None) -> Job:
    body, content_type = multipart(data)
    query = f"k={k}" + (f"&gamma={gamma}" if gamma is not None else "")
    return Job("tag", "POST", f"/api/tag?{query}", body, content_type)


def search_job(tag: str, k: int = 10) -> Job:
    return Job("search", "GET", f"/api/search?{urllib.parse.urlencode({'tag': tag, 'k': k})}")


class Client:
    """One keep-alive HTTP connection (one per thread: http.client connections are not thread-safe)."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def send(self, job: Job) -> Answer:
        headers = {"Content-Type": job.content_type} if job.content_type else {}
        for attempt in (0, 1):  # a keep-alive connection the server closed meanwhile: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            t0 = time.perf_counter()
            try:
                self.conn.request(job.method, job.path, body=job.body, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            seconds = time.perf_counter() - t0
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": raw[:200].decode("utf-8", "replace")}
            return Answer(job, r.status, body, seconds)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def fire(url: str, jobs: Sequence[Job], concurrency: int) -> tuple[list[Answer], float]:
    """Send ``jobs`` from ``concurrency`` threads; the answers in the jobs' order, and the wall seconds."""
    local, clients, lock = threading.local(), [], threading.Lock()

    def send(job: Job) -> Answer:
        if not hasattr(local, "client"):
            local.client = Client(url)
            with lock:
                clients.append(local.client)
        return local.client.send(job)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(send, jobs))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return answers, wall


def mixed_jobs(images: Sequence[bytes], tags: Sequence[str], n: int) -> list[Job]:
    """n requests, alternately an upload (cycling through ``images``) and a search (through ``tags``)."""
    return [tag_job(images[i // 2 % len(images)]) if i % 2 == 0 else search_job(tags[i // 2 % len(tags)])
            for i in range(n)]


def wrong_answers(answers: Sequence[Answer]) -> list[str]:
    """Every answer that is not 200, or differs from the first answer to the same request."""
    first, wrong = {}, []
    for a in answers:
        key = (a.job.method, a.job.path, a.job.body)
        if a.status != 200:
            wrong.append(f"{a.job.kind} {a.job.path}: {a.status} {a.body.get('error')}")
        elif first.setdefault(key, a.body) != a.body:
            wrong.append(f"{a.job.kind} {a.job.path}: answered differently ({a.body} vs {first[key]})")
    return wrong


def percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]  # nearest rank


def figures(answers: Sequence[Answer], wall: float) -> dict:
    out = {"requests": len(answers), "wall_s": wall, "requests_per_s": len(answers) / wall}
    for kind in ("all", "tag", "search"):
        ms = [a.seconds * 1e3 for a in answers if kind in ("all", a.job.kind)]
        if ms:
            out[kind] = {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
                         "max_ms": max(ms)}
    return out


# ---- the server under test
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> dict:
    """/api/info once the server answers it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = Client(url, timeout=5).send(Job("info", "GET", "/api/info"))
            if answer.status == 200:
                return answer.body
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise BadValue(f"the server exited with status {proc.returncode} before answering",
                           "see its messages above")
        if time.monotonic() > deadline:
            raise BadValue(f"{url} did not answer /api/info within {timeout:.0f} s")
        time.sleep(0.2)


def image_files(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NotFound(f"{folder}: no images", "give --images FOLDER (or an --index whose folder still exists)")
    return files[:n]


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m im2vec.bench.serve_load", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="the checkpoint to serve (not with --url)")
    ap.add_argument("--index", default=None, help="the index to serve (python -m im2vec.use.predict index)")
    ap.add_argument("--url", default=None, help="benchmark a server already running here instead")
    ap.add_argument("--images", default=None, help="the folder to upload images from (default: the index's)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--distinct", type=int, default=8, help="distinct images uploaded (and tags searched)")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (--threads of serve)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if (a.checkpoint is None) == (a.url is None):
        raise BadValue("give a checkpoint to serve, or --url of a running server", "not both")
    if a.requests < 1 or a.concurrency < 1 or a.distinct < 1:
        raise BadValue("--requests, --concurrency and --distinct must be ≥ 1")
    proc, url, log = None, a.url, tempfile.TemporaryFile()
    if url is None:
        if a.index is None:
            raise BadValue("the benchmark searches: give --index INDEX too")
        url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "im2vec.use.serve", a.checkpoint, "--index", a.index,
               "--port", url.rsplit(":", 1)[1], *(["--threads", str(a.threads)] if a.threads else [])]
        # its messages are shown only if it fails: the figures are what this prints
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log)
    try:
        info = wait_ready(url, proc)
        if not info["index"]:
            raise BadValue(f"{url} has no index loaded", "the benchmark searches: serve one with --index")
        folder = Path(a.images or info["index_root"])
        images = [p.read_bytes() for p in image_files(folder, a.distinct)]
        # one untimed request per image: its top tag is what the searches ask for, and the model is warm
        warm, _ = fire(url, [tag_job(data) for data in images], 1)
        if wrong := wrong_answers(warm):
            raise BadValue(f"the server refused an image: {wrong[0]}")
        tags = list(dict.fromkeys(w.body["tags"][0][0] for w in warm))
        answers, wall = fire(url, mixed_jobs(images, tags, a.requests), a.concurrency)
    except BaseException:
        if proc is not None:
            log.seek(0)
            sys.stderr.write(log.read().decode("utf-8", "replace"))
        raise
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        log.close()
    out = {"url": url, "concurrency": a.concurrency, "distinct_images": len(images), "checkpoint": info["checkpoint"],
           "index_size": info["index_size"], "cpu_cores": os.cpu_count(), **figures(answers, wall)}
    print(f"{len(answers)} requests ({out['tag']['n']} uploads to /api/tag, {out['search']['n']} /api/search) "
          f"from {a.concurrency} clients in {wall:.2f} s: {out['requests_per_s']:.1f} requests/s")
    for kind in ("all", "tag", "search"):
        f = out[kind]
        print(f"  {kind:<7} p50 {f['p50_ms']:7.1f} ms   p99 {f['p99_ms']:7.1f} ms   max {f['max_ms']:7.1f} ms")
    wrong = wrong_answers(answers)
    out["wrong"] = len(wrong)
    first = f" (first: {wrong[0]})" if wrong else ""
    print(f"  answers: {len(answers) - len(wrong)} right, {len(wrong)} wrong{first}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    if wrong:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    run_cli(main)
