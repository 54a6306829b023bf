"""The real Hydra config, composed once per test with CPU-only, tiny settings and a tiny corpus."""

import hashlib
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "data.corpus.num_train=192", "data.corpus.num_val=64", "data.corpus.num_test=48", "data.corpus.num_users=12",
    "data.corpus.tail_size=300", "data.corpus.shard_size=64", "data.vocab_min_count=1",
    "data.batch_size=16", "data.batches_per_epoch=3", "data.num_workers=0", "data.val_batch_size=32",
    "data.shuffle_buffer=50", "model.dim=16", "trainer.accelerator=cpu", "trainer.max_epochs=2",
    "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "optim.warmup_batches=2", "validation.projector_tags=50",
    "validation.grid_images=4",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("im2vec-cache")


@pytest.fixture
def make_cfg(cache_dir, tmp_path):
    """make_cfg(*overrides, out=None) -> the composed train config, writing into tmp_path (or out)."""
    def make(*overrides: str, out: Path | None = None):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            return compose("train", overrides=[*TINY, f"paths.cache_dir={cache_dir}",
                                               f"paths.output_dir={out or tmp_path}", *overrides])
    return make


@pytest.fixture(scope="session")
def tiny_run(cache_dir, tmp_path_factory):
    """The tiny default run (TINY: 2 epochs, validation with the γ sweep at each), trained once per session for
    every test that needs a trained checkpoint and not a training of its own (predict, serve, browser, evaluate,
    the γ and test-split checks, ...): cfg, out (its output folder), ckpt, metrics, module, datamodule, trainer,
    jpegs (12 validation JPEGs). Read it, never write into it: its checkpoint's bytes are checked at the end."""
    from im2vec.train.training import train

    out = tmp_path_factory.mktemp("tiny-run")
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}"])
    metrics, objs = train(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    with tarfile.open(objs["datamodule"].val_shards[0]) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:12]
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    yield SimpleNamespace(cfg=cfg, out=out, ckpt=ckpt, metrics=metrics, objs=objs, module=objs["module"],
                          datamodule=objs["datamodule"], trainer=objs["trainer"], jpegs=jpegs)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest, "a test wrote into the shared tiny_run checkpoint"


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and avoids oversubscribing a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels (a decompression bomb), with almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
