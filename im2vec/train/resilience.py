"""Runs that survive being killed: atomic checkpoints, checkpoints every N batches, and a clean stop
on SIGTERM (or SLURM's pre-emption signal) that writes a checkpoint first.

- ``AtomicCheckpointIO`` writes a checkpoint straight to ``<name>.tmp-<pid>`` (no in-memory copy of
  it), fsyncs it, renames it over ``<name>`` and fsyncs the folder: a crash during a save leaves the
  previous file whole. It reads checkpoints memory-mapped, so W ranks on one host reading one file
  share its pages and each copies only its own rows of the table.
- A sharded table (``trainer=ddp``: ``RowShardedDDP``) is saved as a DCP folder instead, which every rank
  writes its own rows of (im2vec/wide/row_checkpoint.py: written as ``<name>.tmp-dcp``, metadata last, then
  exchanged with ``<name>`` in one rename); each rank reads back only what it needs, for any world size.
- ``Checkpoints`` is Lightning's ``ModelCheckpoint`` counting in batches (``every_n_batches``; the
  trainer's global step counts two optimizer steps per batch) as well as at every epoch's end.
- ``Preemption`` turns SIGTERM (and the signals in ``signals``, e.g. SIGUSR1 for ``sbatch
  --signal=USR1@120``) into a flag. After the batch in progress, every rank sees it (the module
  all-reduces it with the batch's skip counts), the checkpoint is written and ``Preempted`` ends the
  run: ``train.py`` then says where the checkpoint is and exits with status 143 (128 + SIGTERM), and
  the same command with ``ckpt_path=<that file>`` continues. The signal handler itself only sets the
  flag: no collective or file I/O runs inside a signal handler.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy

from im2vec.train.checkpoint import with_recorded_gamma
from im2vec.wide.row_checkpoint import ROW_SHARDS, is_sharded_checkpoint, read_sharded, save_sharded

EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped before the end, checkpoint written


class Preempted(Exception):
    """The run stopped on a signal after writing ``path``."""

    def __init__(self, path: str, batches: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after {batches:,} batches; checkpoint: {path}")
        self.path, self.batches, self.signum = path, batches, signum


def fsync_replace(tmp: str | Path, path: str | Path) -> None:
    """fsync ``tmp``, rename it over ``path`` and fsync the folder (the rename survives a power cut)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name, fsynced and renamed; read memory-mapped. A checkpoint whose
    table is sharded (``ROW_SHARDS``) is a DCP folder: every rank calls this, each writes its own rows."""

    def __init__(self):
        super().__init__()
        self._group = None  # a gloo group for DCP's planning (the default group may be NCCL): made at the first save

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        if ROW_SHARDS in checkpoint:
            spec = checkpoint[ROW_SHARDS]
            if spec["world"] > 1 and self._group is None:  # every rank is here: a collective
                self._group = dist.new_group(backend="gloo")
            save_sharded(checkpoint, path, spec["rank"], spec["world"], self._group)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)  # streamed to the file: no second copy of the checkpoint in memory
            fsync_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if is_sharded_checkpoint(path):  # the table's rows stay on disk (SavedRows): each rank reads its own
            ckpt = read_sharded(path, rank=None)
            ckpt.pop(ROW_SHARDS)
            return with_recorded_gamma(ckpt, path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        # mmap: pages are read when used and shared between ranks; the tensors are copy-on-write
        return torch.load(path, map_location="cpu", mmap=True, weights_only=bool(weights_only))


class RowShardedDDP(DDPStrategy):
    """Lightning's DDP, except that a checkpoint of a sharded table is written by every rank (its own rows, through
    ``AtomicCheckpointIO``), not assembled on rank 0 and written by it alone."""

    row_shards = True  # read by Im2VecModule.on_save_checkpoint

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if ROW_SHARDS in checkpoint:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        else:
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)


class Checkpoints(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves every ``every_n_batches`` training batches (0: only at epoch ends)."""

    def __init__(self, every_n_batches: int = 0, **kwargs):
        if every_n_batches < 0:
            raise ValueError(f"every_n_batches={every_n_batches} must be ≥ 0")
        super().__init__(every_n_train_steps=2 * every_n_batches or None, **kwargs)  # two optimizer steps a batch
        self.every_n_batches = every_n_batches
        if every_n_batches and kwargs.get("every_n_epochs") is None:
            self._every_n_epochs = 1  # Lightning takes one trigger or the other; this saves at both


class Preemption(Callback):
    """SIGTERM (and ``signals``): checkpoint after the current batch, then stop with ``Preempted``."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), filename: str = "preempted.ckpt"):
        self.signals = [getattr(signal, s) if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.filename = filename
        self.received: int | None = None
        self._module = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:  # only a flag: the training step's thread acts on it
        self.received = signum
        if self._module is not None:
            self._module.signal_pending = True

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning installed its own SIGTERM handler (after on_fit_start): ours replaces it for the fit.
        # Lightning's broadcasts from inside the handler, which meets whatever collective the other rank is
        # in at that moment and hangs a run whose table exchange has collectives of its own.
        self._module = pl_module
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not getattr(pl_module, "stop_now", False):  # all ranks agree: the module all-reduced the flag
            return
        ckpt = trainer.checkpoint_callback
        has_dir = ckpt is not None and ckpt.dirpath
        folder = Path(ckpt.dirpath) if has_dir else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / self.filename
        trainer.save_checkpoint(path)  # a collective when the table is sharded: every rank is here
        batches = trainer.global_step // 2  # two optimizer steps a batch
        raise Preempted(str(path), batches, self.received or signal.SIGTERM)
