"""Callbacks the signal, kill and reshard tests add to real `python train.py` runs
(`+callbacks.x._target_=run_callbacks.SignalAt`, with tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch

from im2vec.wide.sharded_table import ROW_STATE


class SignalAt(pl.Callback):
    """Send ``sig`` to this very process when batch ``batch`` (counted over the run) starts, on rank ``rank``."""

    def __init__(self, batch: int, sig: str = "SIGTERM", rank: int = 0):
        self.batch, self.sig, self.rank = batch, getattr(signal, sig), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.fit_loop.epoch_loop._batches_that_stepped == self.batch:
            os.kill(os.getpid(), self.sig)


class DumpAtStart(pl.Callback):
    """Before the first batch of the (resumed) run: the whole table and table-optimizer state as restored
    (assembled from every rank's shard) and the batch count, to ``path`` (written by rank 0)."""

    def __init__(self, path: str):
        self.path, self.done = Path(path), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.done:
            return
        self.done = True
        state = pl_module.optimizers()[1].optimizer.state[pl_module.table.weight]
        whole = {"table": pl_module.full_table(), "world": trainer.world_size,
                 "batches": trainer.fit_loop.epoch_loop._batches_that_stepped}
        for k, v in state.items():
            if k in ROW_STATE:
                whole[k] = pl_module.table.assemble(v) if pl_module.sharded else v.clone()
            elif k == "step":
                whole[k] = int(v)
        if trainer.global_rank == 0:
            torch.save(whole, self.path)


class TagMapAtStart(pl.Callback):
    """Before the first batch of the (resumed) run: the word-vector map A (module.tag_map) as restored, to
    ``path``."""

    def __init__(self, path: str):
        self.path, self.done = Path(path), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.done:
            self.done = True
            torch.save(pl_module.tag_map.proj.weight.detach().cpu().clone(), self.path)
