"""What the GPU check (im2vec.bench.gpu) measures and checks inside a run: where the table, its optimizer's
state and the trunk live (``placement_failures``), and the callback that times windows of batches and reads the
module's logged breakdown (``Probe``; Hydra builds it by name from the run's overrides). The module without its
tag head (what the head costs) is im2vec.bench.trunk_only's ``TrunkOnly``."""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch
from pytorch_lightning import Callback

from im2vec.errors import one_line
from im2vec.train.module import Im2VecModule

BREAKDOWN = ("train/table_prepare_ms", "train/table_wait_ms", "train/table_update_ms")


def placement_failures(module: Im2VecModule, trunk_device: str, where: str, table_optimizer=None,
                       need_state: bool = False) -> list[str]:
    """One line per violation of where the tensors must live: the table (weight fp32, buffers) and every tensor
    of its optimizer's state on the CPU, the trunk's parameters on ``trunk_device``. ``table_optimizer``: the
    raw torch optimizer (default ``module.optimizers()[1].optimizer``); ``need_state``: its state must hold a
    tensor (after a run with the head), else the check of the state would pass on nothing."""
    bad = []
    weight = module.table.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        bad.append(f"{where}: module.table.weight is {weight.dtype} on {weight.device}, not torch.float32 on cpu")
    for name, t in [*module.table.named_parameters(), *module.table.named_buffers()]:
        if t.device.type != "cpu":
            bad.append(f"{where}: module.table.{name} is on {t.device}, not cpu")
    if table_optimizer is None:
        try:
            table_optimizer = module.optimizers()[1].optimizer
        except Exception as e:  # noqa: BLE001 -- no trainer attached, or not two optimizers: that is the finding
            bad.append(f"{where}: the table optimizer cannot be read ({type(e).__name__}: {one_line(e)})")
    if table_optimizer is not None:
        tensors = 0
        for state in table_optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors += 1
                    if value.device.type != "cpu":
                        bad.append(f"{where}: table optimizer state '{key}' ({tuple(value.shape)}) is on "
                                   f"{value.device}, not cpu")
        if need_state and tensors == 0:
            bad.append(f"{where}: the table optimizer's state holds no tensor after training with the head")
    devices = sorted({p.device.type for p in module.encoder.parameters()})
    if devices != [trunk_device]:
        bad.append(f"{where}: the trunk's parameters are on {', '.join(devices)}, not {trunk_device}")
    return bad


class Probe(Callback):
    """Windows of ``window`` batches timed between device synchronizations (none inside a window), the loader
    wait, the module's logged breakdown at each window's end, and the placement check at the first batch."""

    def __init__(self, window: int = 5, trunk_device: str = "cuda"):
        self.window, self.trunk_device = window, trunk_device
        self.windows: list[dict] = []
        self.first_batch: list[str] | None = None
        self.overlap = None
        self.module_class = ""
        self.batches, self._last_end, self._t = 0, None, 0.0
        self._reset()

    def _reset(self) -> None:
        self._images, self._batches, self._wait = 0, 0, 0.0

    def _sync(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        with contextlib.suppress(Exception):
            self.overlap = bool(pl_module.head.overlap)
        self.module_class = type(pl_module).__name__
        self.batches, self._last_end = 0, None
        self._reset()
        self._t = self._sync(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last_end is not None:
            self._wait += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self._batches += 1
        self._images += len(batch["keys"])
        if self.first_batch is None:  # after on_train_start put a resumed table optimizer state back
            self.first_batch = placement_failures(pl_module, self.trunk_device, "at the first batch")
        if self._batches == self.window:
            t = self._sync(pl_module)
            logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k in BREAKDOWN}
            self.windows.append({"seconds": t - self._t, "images": self._images, "batches": self._batches,
                                 "data_wait_s": self._wait, **logged})
            self._t = t
            self._reset()
        self._last_end = time.perf_counter()

    def summary(self, warm: int) -> dict:
        timed = self.windows[warm:] or self.windows[-1:]
        if not timed:
            return {}
        out = {"images_per_s": statistics.median(w["images"] / w["seconds"] for w in timed),
               "timed_windows": len(timed), "timed_batches": sum(w["batches"] for w in timed),
               "data_wait_ms": 1e3 * sum(w["data_wait_s"] for w in timed) / sum(w["batches"] for w in timed)}
        for k in BREAKDOWN:
            values = [w[k] for w in timed if k in w]
            out[k.split("/")[1]] = statistics.fmean(values) if values else math.nan
        return out

