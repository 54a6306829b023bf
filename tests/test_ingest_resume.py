"""An interrupted ingest resumes to exactly the output of an uninterrupted one, and refuses inputs
whose content changed in between.

The kill test is deterministic without timing: the images are named pipes (FIFOs) that the test feeds
one by one, so the ingest (a subprocess) can only have read the first m images when it is killed
with SIGKILL, whatever the machine's speed; it may be anywhere after that (writing a shard, its stats,
or waiting for image m)."""

import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from im2vec.data.ingest import SPLITS, main, split_of
from im2vec.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, BAD = 16, {4, 11}  # images 4 and 11 are not images: skipped and counted (corrupt_image)


def _image(i: int) -> bytes:
    if i in BAD:
        return b"\xff\xd8\xff\xe0 not a jpeg %d" % i
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _collection(root: Path) -> Path:
    root.mkdir(parents=True)
    lines = [json.dumps({"image": f"img{i:02d}.jpg", "tags": [f"t{i % 5}", "all"], "user": f"u{i % 3}"})
             for i in range(N_IMAGES)]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    _real_images(root)
    return root / "manifest.jsonl"


def _real_images(root: Path) -> None:
    for i in range(N_IMAGES):
        p = root / f"img{i:02d}.jpg"
        p.unlink(missing_ok=True)
        p.write_bytes(_image(i))


def _args(manifest: Path, out: Path, workers: int) -> list[str]:
    return ["collection", str(manifest), "--out", str(out), "--shard-size", "3", "--max-side", "64",
            "--val-fraction", "0.2", "--test-fraction", "0.2", "--workers", str(workers), "--quiet"]


def _read_order() -> list[int]:
    """The order the ingest reads the images in: every split's samples at once (the 16 fit one shuffle
    window), each split's in the seeded random order of ingest.run, shard by shard."""
    buffers = {s: [] for s in SPLITS}
    for i in range(N_IMAGES):
        buffers[split_of(f"img{i:02d}.jpg", 0.2, 0.2)].append(i)
    for split, ids in buffers.items():
        random.Random(f"0/{split}/0").shuffle(ids)
    return [i for s in SPLITS for i in buffers[s]]


def _output(out: Path) -> dict:
    """Every shard and stats file by name -> its bytes' hash, and the summary's counts."""
    files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.glob("*/shard-*")) if p.is_file()}
    summary = json.loads((out / "summary.json").read_text())
    return {"files": files, "counts": {k: summary[k] for k in ("written", "shards", "skipped")}}


def _feed(fifo: Path, data: bytes, proc: subprocess.Popen, deadline: float) -> None:
    """Write ``data`` into a FIFO once the ingest opens it for reading (a non-blocking open fails with
    ENXIO until then); fail, never hang, if the ingest ends first."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            assert proc.poll() is None, f"the ingest ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the ingest never asked for the next image"
            time.sleep(0.002)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("fed,workers,pause", [(0, 0, 0.0), *(pytest.param(*p, marks=pytest.mark.slow) for p in [
    (1, 0, 0.05), (3, 0, 0.0), (7, 0, 0.3)]), (11, 2, 0.05), pytest.param(15, 0, 0.3, marks=pytest.mark.slow)])
def test_an_ingest_killed_at_any_point_resumes_to_the_uninterrupted_output(tmp_path, fed, workers, pause):
    manifest = _collection(tmp_path / "photos")
    assert main(_args(manifest, tmp_path / "reference", 0))["written"] is not None
    reference = _output(tmp_path / "reference")
    assert sum(reference["counts"]["written"].values()) == N_IMAGES - len(BAD)
    assert reference["counts"]["skipped"] == {"corrupt_image": len(BAD)}

    # the same collection, its images now pipes: the ingest reads image i only when the test feeds it
    for i in range(N_IMAGES):
        p = tmp_path / "photos" / f"img{i:02d}.jpg"
        p.unlink()
        os.mkfifo(p)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "im2vec.data.ingest", *_args(manifest, out, workers)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        for i in _read_order()[:fed]:
            _feed(tmp_path / "photos" / f"img{i:02d}.jpg", _image(i), proc, deadline)
        time.sleep(pause)  # let it get further (a shard, its stats file) or not
        assert proc.poll() is None, "the ingest cannot finish before every image is fed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its shard writers, as a machine that dies
        proc.wait()
    assert not (out / "summary.json").exists()

    _real_images(tmp_path / "photos")
    resumed = main(_args(manifest, out, 0))
    assert _output(out) == reference, f"killed after {fed} images"
    assert sum(resumed["written"].values()) == N_IMAGES - len(BAD)
    assert not list(out.glob("*/*.tmp*")), "a killed run's partial files are cleared"


def test_a_resumed_ingest_refuses_an_input_whose_content_changed(tmp_path):
    manifest = _collection(tmp_path / "photos")
    out = tmp_path / "out"
    args = _args(manifest, out, 0)
    first = main(args)
    stamps = json.loads((out / "ingest.json").read_text())["input_stamps"]
    assert stamps[0]["size"] == manifest.stat().st_size and "full" in stamps[0]

    os.utime(manifest, ns=(time.time_ns(), manifest.stat().st_mtime_ns + 10**9))  # touched, content unchanged
    assert main(args)["written"] == first["written"]

    original = manifest.read_bytes()
    with open(manifest, "a") as f:  # a line added between the interrupted run and its resume
        f.write(json.dumps({"image": "img00.jpg", "tags": ["late"]}) + "\n")
    with pytest.raises(UserError, match=r"changed since the ingest.*bytes then"):
        main(args)

    # the same size, the same first and last MiB, another middle: found by the full hash (the time changed)
    body = original.rstrip(b"\n") + b"\n" + b"#" * (3 << 20) + b"\n"
    manifest.write_bytes(body)
    fresh = tmp_path / "fresh"
    main(_args(manifest, fresh, 0))
    middle = bytearray(body)
    middle[len(original) + (1 << 20)] = ord("%")
    manifest.write_bytes(bytes(middle))
    with pytest.raises(UserError, match="content differs"):
        main(_args(manifest, fresh, 0))


def test_the_command_line_says_a_changed_input_in_one_line(tmp_path):
    manifest = _collection(tmp_path / "photos")
    main(_args(manifest, tmp_path / "out", 0))
    manifest.write_text(manifest.read_text() + json.dumps({"image": "img01.jpg", "tags": ["x"]}) + "\n")
    run = subprocess.run([sys.executable, "-m", "im2vec.data.ingest", *_args(manifest, tmp_path / "out", 0)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("im2vec: error: ingest: ") and run.stderr.count("\n") == 1
    assert "changed since the ingest" in run.stderr and "ingest into a fresh folder" in run.stderr
