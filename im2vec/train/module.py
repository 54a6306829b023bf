"""The LightningModule: sampling, loss, both optimizers, validation and logging.

Manual optimization (two optimizers): AdamW for the trunk + W on the trunk's device, SparseAdam
(or row-wise Adagrad) for the CPU tag table. Lightning's ``global_step`` then counts optimizer
steps (two per batch), so every schedule here counts batches instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from im2vec.data.gpu_decode import finish_batch, is_encoded
from im2vec.data.samples import SKIP_REASONS, normalize
from im2vec.errors import BadValue
from im2vec.eval.validation import ValidationReport
from im2vec.wide.allocator import empty_hugepages
from im2vec.wide.head import (  # noqa: F401 (Hydra)
    SamplerConfig,
    draw_ids,
    head_extras,
    loss_on_rows,
    sampled_loss,
)
from im2vec.wide.loss import full_bce_loss, multi_hot
from im2vec.wide.pipeline import HeadInputs, TableWorker, attach_rows, sparse_grad
from im2vec.wide.sampler import NegativeSampler, PositiveSampler
from im2vec.wide.sharded_table import (
    ShardedTagTable,
    assemble_rows,
    exchange_group,
    map_row_state,
    rank_seed,
    shard_of,
)
from im2vec.wide.tag_table import CPUTagTable, make_table_optimizer
from im2vec.wide.tag_vectors import TagVectorMap


@dataclass
class OptimConfig:
    lr: float = 5e-3  # AdamW, trunk + W
    weight_decay: float = 0.05
    warmup_batches: int = 50
    min_lr_ratio: float = 0.05  # cosine floor, as a fraction of the peak
    grad_clip: float = 1.0  # max gradient norm of the trunk + W (0: off)
    table_optimizer: str = "sparse_adam"  # fused SparseAdam; "row_adagrad" when Adam's 2·V·d moments don't fit;
    # "torch_sparse_adam": the stock torch.optim.SparseAdam (same results, slower)
    table_lr: float = 0.02
    table_init_std: float = 0.01
    # the table's CPU work (draw, dedup, gather + copy of step i+1; update of step i) on a worker thread beside
    # the trunk, with the serial step's exact arithmetic (im2vec/wide/pipeline.py): "auto" = on when the trunk is on a
    # GPU and the table is not sharded; true / false
    overlap: str | bool = "auto"

    def __post_init__(self):
        if self.overlap not in ("auto", True, False):
            raise BadValue(f"optim.overlap={self.overlap!r}", "use auto, true or false")


FP16 = ("16", "16-mixed", "16-true", "fp16")


def check_precision(precision) -> None:
    """fp16 is refused: its loss scaler would unscale the table's gradient, stepped on its own (CPU) optimizer
    between the trunk's, with a scale that may change in between, and clip the trunk's scaled gradients."""
    if str(precision) in FP16:
        raise BadValue(f"trainer.precision={precision}: fp16 training needs a loss scaler, which im2vec's two "
                       "optimizers (the trunk's and the CPU table's) do not support",
                       "use trainer.precision=bf16-mixed on a GPU (same speed, no scaler) or 32-true")


def warmup_cosine(warmup: int, total: int, floor: float):
    """LR multiplier per batch: linear warmup, then cosine down to ``floor``."""
    def f(batch: int) -> float:
        if batch < warmup:
            return (batch + 1) / warmup
        t = min(1.0, (batch - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _deferred_table_step(closure=None, **kwargs):
    """The table optimizer's step while its updates are queued on the worker thread (Im2VecModule.on_train_start):
    only Lightning's hooks (the closure) run here."""
    if closure is not None:
        closure()
    return None


_deferred_table_step._wrapped_by_lr_sched = True  # torch's LR scheduler: the real (queued) step is still wrapped


def _rows(batch: dict) -> int:
    """Samples in a batch of images, or of stored trunk features (frozen-trunk mode, im2vec/train/features.py)."""
    return (batch["features"] if "features" in batch else batch["image"]).shape[0]


def _fresh_log_window() -> dict:
    """What the step accumulates between two log steps."""
    return {"images": 0, "prepare_ms": 0.0, "batches": 0}


class Im2VecModule(pl.LightningModule):
    def __init__(self, encoder: nn.Module, tags: list[str], counts: Tensor, total_batches: int,
                 sampler: SamplerConfig | None = None, optim: OptimConfig | None = None,
                 noise_ids: Tensor | None = None, fingerprint: str = "", seed: int = 0,
                 val_gammas: tuple[float, ...] = tuple(x / 4 for x in range(11)),
                 projector_tags: int = 2000, grid_images: int = 16, image_size: int = 224,
                 choose_gamma: bool = True, gamma_by: str = "auto", gamma_rule: str = "best",
                 shard: tuple[int, int] | None = None,
                 tag_map: TagVectorMap | None = None, holdout_tags: tuple[str, ...] = ()):
        super().__init__()
        self.encoder = encoder
        self.sampler_cfg, self.optim_cfg = sampler or SamplerConfig(), optim or OptimConfig()
        s, o = self.sampler_cfg, self.optim_cfg
        if shard is not None and shard[1] > 1:  # rank r of W (known from the Trainer): only this rank's rows,
            # the same values as one device's table, never the whole table in this process
            self.table = ShardedTagTable(counts, encoder.dim, o.table_init_std, *shard, single_device_rows=True)
        else:
            self.table = CPUTagTable(counts, encoder.dim, o.table_init_std)
        # DDP syncs the trunk only: the table (sharded across ranks) and its CPU buffers are this module's business
        self._ddp_params_and_buffers_to_ignore = ["table.embedding.weight", "table.log_counts"]
        # model.tag_vectors: v_t = r_t + A·w_t for tags with a word vector; A beside the trunk, the w in host memory
        self.tag_map = tag_map
        if tag_map is not None:
            self._ddp_params_and_buffers_to_ignore += ["tag_map.store.slot", "tag_map.store.vectors"]
        self.holdout_tags = list(holdout_tags)  # tags kept out of training (zero-shot evaluation), recorded
        self.data_config: dict | None = None  # the data settings trained with (train() sets it): evaluate.py's default
        self.counts, self.seed = counts, seed
        self.tags, self.fingerprint, self.total_batches = tags, fingerprint, total_batches
        self.image_size = image_size  # what the trunk was trained on: prediction resizes to it
        self.neg_sampler = NegativeSampler(counts, s.alpha)
        self.pos_sampler = PositiveSampler(counts, s.beta)
        self.gen = torch.Generator().manual_seed(seed)  # all sampling randomness; saved in checkpoints
        # γ starts at sampler.gamma and, with choose_gamma, is chosen at every validation (ValidationReport)
        self.report = ValidationReport(tags, counts, noise_ids, s.gamma, list(val_gammas), projector_tags, grid_images,
                                       choose_gamma, gamma_by, gamma_rule)
        self.automatic_optimization = False
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # skipped samples this run, on the CPU like the batch's counts
        self.val_skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # the same, this validation
        self._said_no_val = False
        self._table_opt_state = None  # the table optimizer's state read from a checkpoint, restored on the CPU
        self.signal_pending = False  # set by im2vec.train.resilience.Preemption's handler; all ranks stop together
        self.stop_now = False
        self._worker: TableWorker | None = None  # the table's CPU side of the step (im2vec/wide/pipeline.py)
        self._pending_prep = None  # the next step's HeadInputs being prepared (a Future)
        self._table_step = None  # the table optimizer's own step, called on the worker thread with overlap
        self._since_log = _fresh_log_window()
        self._last_log_time: float | None = None

    # ---- data on the right device: images go to the trunk, tag ids stay on the CPU for sampling
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # uint8 over the bus (a quarter of float32's bytes; pinned by the loader when the trunk is on a GPU),
        # normalized on the trunk's device; with data.decode=gpu the JPEGs themselves, decoded there
        if "features" in batch:  # frozen-trunk mode (im2vec/train/features.py): the trunk's stored outputs, fp16
            return {**batch, "features": batch["features"].to(device, non_blocking=True)}
        if is_encoded(batch):
            batch = finish_batch(batch, device, self.image_size)  # undecodable rows dropped and counted
            return {**batch, "image": normalize(batch["image"])}
        return {**batch, "image": normalize(batch["image"].to(device, non_blocking=True))}

    def embed_batch(self, batch: dict) -> Tensor:
        """u (B, d): the batch's images through the encoder, or (frozen-trunk mode, im2vec/train/features.py) its
        stored trunk features through the projection W alone."""
        if "features" in batch:
            return self.encoder.proj(batch["features"].float())
        return self.encoder(batch["image"])

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's, except that the file is always read into host memory and the module moved afterwards:
        ``map_location="cuda"`` would otherwise read the whole table (V·d·4 bytes) onto the GPU first. The table
        stays on the CPU (CPUTagTable ignores moves); everything else goes to ``map_location`` when it names a
        device (a callable or dict map_location leaves the module on the CPU)."""
        model = super().load_from_checkpoint(checkpoint_path, map_location="cpu", hparams_file=hparams_file,
                                             strict=strict, **kwargs)
        if isinstance(map_location, (str, torch.device)):
            model = model.to(torch.device(map_location))
        return model

    @property
    def sharded(self) -> bool:
        return isinstance(self.table, ShardedTagTable)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            check_precision(getattr(self.trainer, "precision", "32-true"))
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and (not self.sharded or self.table.group is None):
            self.shard_table(self.trainer.global_rank, world, getattr(self.trainer.strategy, "_timeout", None))

    def shard_table(self, rank: int, world: int, timeout=None) -> None:
        """Keep only this rank's rows of the table (id % world == rank) and draw from a (seed, rank) stream."""
        if not dist.is_available() or not dist.is_initialized():
            raise BadValue(f"{world} devices but torch.distributed is not initialized", "use trainer=ddp")
        if self.sampler_cfg.head == "full":
            raise BadValue("sampler.head=full scores all V rows on one device: it has no sharded form",
                           "use sampler.head=sampled with trainer=ddp, or train on one device")
        group = exchange_group(timeout.total_seconds() if timeout is not None else 1800.0)
        if self.sharded:  # built for this rank (shard=): the rows are there, the group was not yet
            if (self.table.rank, self.table.world) != (rank, world):
                raise BadValue(f"the table was built for rank {self.table.rank} of {self.table.world}, this is rank "
                               f"{rank} of {world}", "build the module with shard=(trainer.global_rank, "
                               "trainer.world_size)")
            self.table.group = group
        else:  # built whole: keep this rank's rows of the seeded initial table (the same on every rank)
            full = self.table.weight.detach()
            self.table = ShardedTagTable(self.counts, self.table.dim, self.optim_cfg.table_init_std, rank, world,
                                         group, full=full)
            del full
        self.gen = torch.Generator().manual_seed(rank_seed(self.seed, rank))

    def full_table(self) -> Tensor | None:
        """The whole (V, d) table: the table itself on one device; assembled on rank 0 when sharded (every
        rank must call it; None on the others)."""
        self.drain()
        table = self.table.assemble() if self.sharded else self.table.weight.detach()
        if table is not None and self.tag_map is not None:  # the tag vectors: r_t + A·w_t
            table = self.tag_map.full(table)
        return table

    # ---- the head: in fp32 whatever the trunk's precision (bf16 would sum a repeated row's gradient in bf16)
    def head_loss(self, u: Tensor, tags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u (B, d) on the trunk's device, tags (B, T) on the CPU -> (loss, mean pos score, mean neg score).
        The serial head (the pipelined step of an unsharded table is ``training_step``'s)."""
        s = self.sampler_cfg
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            if s.head == "full":
                every = torch.arange(self.table.num_tags)
                rows = self.table.lookup(every, u.device, torch.float32)  # (V, d)
                if self.tag_map is not None:
                    rows = self.tag_map(every, rows)
                return full_bce_loss(u, rows, multi_hot(tags, self.table.num_tags).to(u.device))
            ids = draw_ids(s, self.pos_sampler, self.neg_sampler, tags, self.gen)
            return sampled_loss(s, self.table, u, *ids, row_map=self.tag_map)

    @property
    def pipelined(self) -> bool:
        """Whether the step's head goes through the TableWorker: a one-device table's sampled head (a subclass's
        own head_loss is respected)."""
        return (not self.sharded and self.sampler_cfg.head == "sampled"
                and type(self).head_loss is Im2VecModule.head_loss)

    @property
    def overlap(self) -> bool:
        o = self.optim_cfg.overlap
        if o == "auto":
            return self.device.type == "cuda" and not self.sharded
        if o and self.sharded:
            raise BadValue("optim.overlap=true with a sharded table (DDP): its exchange runs on the step's thread",
                           "use optim.overlap=auto or false with trainer=ddp")
        return bool(o)

    @property
    def worker(self) -> TableWorker:
        if self._worker is None or self._worker.device != self.device:
            if self._worker is not None:
                self._worker.close()
            self._worker = TableWorker(self.device, self.overlap)
        return self._worker

    def drain(self) -> None:
        """Wait for the table's queued work (updates, schedule steps): before anything reads the table."""
        if self._worker is not None:
            self._worker.drain()

    def _prepare(self, tags: Tensor) -> HeadInputs:
        """The CPU side of a step (on the worker thread with overlap): draw the ids, dedup, gather, copy."""
        s, t0 = self.sampler_cfg, time.perf_counter()
        pos_ids, neg_ids, weight = draw_ids(s, self.pos_sampler, self.neg_sampler, tags, self.gen)
        extras = head_extras(s, self.table.log_counts, pos_ids, neg_ids, weight)
        prep = self.worker.prepare(self.table.weight, pos_ids, neg_ids, extras)
        prep.prepare_ms = (time.perf_counter() - t0) * 1e3  # the draw included
        return prep

    def _pipelined_loss(self, u: Tensor, tags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The sampled head of an unsharded table through the TableWorker (serial or overlapped)."""
        w = self.worker
        prep = w.result(self._pending_prep) if self._pending_prep is not None else self._prepare(tags)
        self._pending_prep = None
        self._since_log["prepare_ms"] += prep.prepare_ms
        weight = self.table.weight

        def sink(grad: Tensor):  # the rows' gradient, in backward
            host, event = w.grad_to_host(grad)
            if not w.overlap:  # serial: the table's sparse gradient, stepped by opt_table.step()
                if event is not None:
                    event.synchronize()
                return sparse_grad(prep.uniq, host, weight.shape)
            w.submit(self._update_table, prep.uniq, host, event)  # overlapped: the update starts now
            return None

        with torch.autocast(u.device.type, enabled=False):
            rows = attach_rows(weight, prep, sink)  # (n distinct, d)
            if self.tag_map is not None:
                rows = self.tag_map(prep.uniq, rows)
            rows = rows.index_select(0, prep.inverse)
            return loss_on_rows(self.sampler_cfg, u.float(), rows, prep.pos_shape, prep.neg_shape, prep.extras)

    def _update_table(self, uniq: Tensor, host: Tensor, event) -> None:
        """On the worker thread: one table update with the rows' gradient (the LR is the serial step's: the
        schedule steps in the same queue)."""
        if event is not None:
            event.synchronize()
        p = self.table.weight
        t0 = time.perf_counter()
        p.grad = sparse_grad(uniq, host, p.shape)
        try:
            self._table_step()
        finally:
            p.grad = None
        self.worker.update_ms += (time.perf_counter() - t0) * 1e3

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt_dense, opt_table = self.optimizers()
        if _rows(batch) == 0 and not self.sharded:  # data.decode=gpu: not one decodable image left
            self.skipped += batch["skipped"]  # counted; no step (with a sharded table every rank must step)
            return None
        pipelined = self.pipelined
        self._pending_prep = None
        if pipelined and self.overlap:  # draw, dedup, gather and copy on the worker while the trunk runs
            self._pending_prep = self.worker.submit(self._prepare, batch["tags"])
        u = self.embed_batch(batch)  # (B, d)
        if pipelined:
            loss, s_pos, s_neg = self._pipelined_loss(u, batch["tags"])
        else:
            loss, s_pos, s_neg = self.head_loss(u, batch["tags"])
        opt_dense.zero_grad(set_to_none=True)
        opt_table.zero_grad(set_to_none=True)
        table_logs = {}
        if self.sharded:
            sent, got, ex = (self.table.stats[k] for k in ("bytes_sent", "bytes_received", "exchange_s"))
            try:
                self.manual_backward(loss)  # DDP all-reduces the trunk (default group), done when it returns
            finally:
                self.table.reduce_grads()  # then the table's row gradients go to their owners (gloo group)
            st = self.table.stats
            table_logs = {"dist/bytes_sent": float(st["bytes_sent"] - sent),
                          "dist/bytes_received": float(st["bytes_received"] - got),
                          "dist/exchange_ms": (st["exchange_s"] - ex) * 1e3}
        else:
            self.manual_backward(loss)
        if self.optim_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_parameters(), self.optim_cfg.grad_clip)
        opt_dense.step()
        deferred = pipelined and self.overlap
        stepped = self.table.weight.grad is not None  # (a subclass's head may not touch the table)
        t0 = time.perf_counter()
        opt_table.step()  # with overlap: only Lightning's bookkeeping, the update itself is queued (_table_step)
        table_ms = (time.perf_counter() - t0) * 1e3
        dense_sched, table_sched = self.lr_schedulers()
        dense_sched.step()
        if deferred:
            self.worker.submit(table_sched.step)  # after this step's update, before the next one's
        else:
            table_sched.step()
            if stepped:
                self.worker.update_ms += table_ms
        self.skipped += self._all_ranks(batch["skipped"])
        self._log_step(loss, s_pos, s_neg, u.shape[0], opt_dense, table_logs)
        return loss

    def _log_step(self, loss, s_pos, s_neg, batch_size: int, opt_dense, table_logs: dict) -> None:
        """Log every trainer.log_every_n_steps batches only, CPU tensors only: Lightning makes a device tensor of
        each logged Python float (a blocking copy) and reads logged device tensors back (a synchronization)."""
        acc = self._since_log
        acc["images"] += batch_size
        acc["batches"] += 1
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        w, now, n = self.worker, time.perf_counter(), max(1, acc["batches"])
        # one read-back from the device for this log step; every value logged is a CPU tensor, which Lightning
        # keeps on the CPU (the progress bar reads the last values every batch: from a device tensor, a sync)
        loss, s_pos, s_neg = torch.stack([torch.as_tensor(x).detach().float().reshape(())
                                          for x in (loss, s_pos, s_neg)]).cpu()
        logs = {"train/loss": loss, "train/pos_score": s_pos, "train/neg_score": s_neg,
                "train/table_update_ms": w.update_ms / n, "train/table_prepare_ms": acc["prepare_ms"] / n,
                "train/table_wait_ms": w.wait_ms / n, "train/lr": opt_dense.param_groups[0]["lr"], **table_logs}
        if self._last_log_time is not None:
            logs["train/images_per_s"] = acc["images"] / (now - self._last_log_time)
        logs = {k: torch.tensor(float(v)) for k, v in logs.items()}
        for i, reason in enumerate(SKIP_REASONS):  # bad data is skipped, never fatal
            logs[f"data/skipped_{reason}"] = self.skipped[i].float()
        self._last_log_time = now
        w.update_ms = w.wait_ms = 0.0
        self._since_log = _fresh_log_window()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=batch_size)

    def _all_ranks(self, skipped: Tensor) -> Tensor:
        """This batch's skipped samples summed over the ranks; with them, whether any rank got a stop signal
        (one small all-reduce per batch: every rank then stops after the same batch)."""
        if not self.sharded:
            self.stop_now = self.signal_pending
            return skipped
        both = torch.cat([skipped.cpu().long(), torch.tensor([int(self.signal_pending)])])
        dist.all_reduce(both, group=self.table.group)
        self.stop_now = bool(both[-1] > 0)
        return both[:-1]

    def on_train_epoch_start(self) -> None:
        self._last_log_time = None  # don't count the loader's restart as step time
        self._since_log = _fresh_log_window()

    def on_train_epoch_end(self) -> None:
        self.drain()

    def on_train_end(self) -> None:
        self.drain()
        if self._table_step is not None:
            raw = self.optimizers()[1].optimizer
            if "step" in vars(raw) and raw.step == self._deferred_table_step:
                raw.step = self._table_step  # the optimizer steps itself again (outside fit)

    _deferred_table_step = staticmethod(_deferred_table_step)

    def teardown(self, stage: str) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def state_dict(self, *args, **kwargs):
        self.drain()  # a checkpoint (module state, then optimizer state) sees every queued update applied
        return super().state_dict(*args, **kwargs)

    # ---- validation: held-out precision@5 beside the frequency prior, γ sweep, pictures
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if _rows(batch) == 0:  # data.decode=gpu: every image of the batch undecodable
            self.val_skipped += batch["skipped"]
            return
        u = self.embed_batch(batch).float().cpu()  # (B, d)
        self.report.add(u, batch["tags"], batch["clean"], batch["keys"], batch.get("image"),  # features: no grid
                        batch.get("users"))
        self.val_skipped += batch["skipped"]

    def on_validation_epoch_start(self) -> None:
        self.drain()
        self.report.reset()
        self.val_skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        max_images = getattr(self.trainer.datamodule, "val_max_images", None)  # a key-hash subset: data.eval_loader
        table, zero = self.full_table(), True
        if self.sharded:  # every rank's images to rank 0, which scores them against the assembled table
            zero = self.table.rank == 0
            self.report.gather(self.table.group, self.table.rank, self.table.world)
        metrics = None
        if zero and self.report.size:
            metrics = self.report.compute(table, self.table.log_counts, self.global_step, max_images,
                                          device=self.device)
        if self.sharded:  # the same figures and γ on every rank (γ goes into every rank's checkpoint state)
            box = [metrics, self.report.gamma, self.report.step, self.report.size]
            dist.broadcast_object_list(box, src=0, group=self.table.group)
            metrics, self.report.gamma, self.report.step, size = box
            self.report.metrics = metrics or self.report.metrics
        else:
            size = self.report.size
        if not metrics:  # not one usable image: say so (once), never a silent run without figures
            if not self._said_no_val:
                rank_zero_warn("validation: not one usable image in data.val_shards (every sample skipped: corrupt "
                               "images, bad json, or tags outside the vocabulary) — check data.val_shards and "
                               f"data.vocab_path; no held-out figures, γ stays {self.report.gamma:g}")
                self._said_no_val = True
            return
        skipped = self.val_skipped.clone()
        if self.sharded:
            dist.all_reduce(skipped, group=self.table.group)
        self.log_dict({k: v for k, v in metrics.items() if not math.isnan(v)}, batch_size=size)
        self.log_dict({f"data/val_skipped_{r}": skipped[i].float() for i, r in enumerate(SKIP_REASONS)},
                      batch_size=size)
        tb = getattr(self.logger, "experiment", None) if self.logger else None
        if tb is not None and hasattr(tb, "add_embedding") and self.trainer.is_global_zero:
            # the x-axis of the scalars: batches (global_step counts two optimizer steps per batch)
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            self.report.log_pictures(tb, table, self.table.log_counts, step)

    @property
    def val_metrics(self) -> dict[str, float]:
        return self.report.metrics

    @property
    def gamma(self) -> float:
        """The tagging score's γ: chosen on validation, or sampler.gamma (no validation yet, or choose_gamma=false)."""
        return self.report.gamma

    # ---- optimizers, schedules, checkpoints
    def dense_parameters(self) -> list[nn.Parameter]:
        """What AdamW trains on the trunk's device: the encoder (trunk + W) and the word-vector map A."""
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        if self.tag_map is not None:
            params += list(self.tag_map.proj.parameters())
        return params

    def configure_optimizers(self):
        o = self.optim_cfg
        decay = [p for p in self.dense_parameters() if p.ndim >= 2]  # conv and linear weights
        no_decay = [p for p in self.dense_parameters() if p.ndim < 2]  # biases and norm scales
        if self.trainer is None or self.trainer.is_global_zero:
            print(f"im2vec: AdamW on {sum(p.numel() for p in decay):,} decayed + {sum(p.numel() for p in no_decay):,} "
                  f"undecayed trunk parameters; {o.table_optimizer} on the {self.table.num_tags:,}×{self.table.dim} "
                  "tag table"
                  + (f", sharded by rows over {self.table.world} ranks" if self.sharded else ""))
        # on a GPU the fused kernel: one launch for all parameters, no step counter read back to the host
        fused = {"fused": True} if self.device.type == "cuda" else {}
        opt_dense = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, **fused)
        opt_table = make_table_optimizer(o.table_optimizer, [self.table.weight], o.table_lr)
        f = warmup_cosine(o.warmup_batches, self.total_batches, o.min_lr_ratio)
        scheds = [torch.optim.lr_scheduler.LambdaLR(opt, f) for opt in (opt_dense, opt_table)]
        return [opt_dense, opt_table], scheds

    def on_train_start(self) -> None:
        raw = self.optimizers()[1].optimizer
        self._table_step = raw.step
        if self.pipelined and self.overlap:
            # Lightning's opt_table.step() runs its bookkeeping and hooks (the closure) on this thread; the update
            # itself was queued on the worker when the gradient arrived (_update_table)
            raw.step = self._deferred_table_step
        # The table optimizer's state from a checkpoint was kept out of Lightning's restore (which moves
        # every optimizer state tensor to the trunk's device): it goes in here, in host memory.
        if self._table_opt_state is not None:
            opt_table = raw
            opt_table.load_state_dict(self._table_opt_state)
            self._table_opt_state = None
            for state in opt_table.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.dim() > 0:
                        # an owned copy (the checkpoint is memory-mapped), where Linux may use huge pages
                        state[key] = empty_hugepages(like=value).copy_(value)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rngs = [(self.gen.get_state(), torch.get_rng_state())]
        if self.sharded:  # one checkpoint, as written by one device: the whole table and state, assembled on rank 0
            t = self.table
            checkpoint["state_dict"]["table.embedding.weight"] = t.assemble()
            opt = checkpoint["optimizer_states"][1]
            opt["state"] = map_row_state(opt["state"], lambda v: assemble_rows(v, t.num_tags, t.rank, t.world, t.group))
            rngs = [None] * t.world
            dist.all_gather_object(rngs, (self.gen.get_state(), torch.get_rng_state()), group=t.group)
        checkpoint["im2vec"] = {
            "tags": self.tags, "fingerprint": self.fingerprint, "num_tags": self.table.num_tags,
            "dim": self.table.dim, "sampler_rng": rngs[0][0], "world_size": len(rngs),
            # every rank's sampler stream (seeded by (seed, rank)) and global torch RNG (dropout, stochastic depth)
            "sampler_rngs": [g for g, _ in rngs], "torch_rngs": [r for _, r in rngs],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "sampler": asdict(self.sampler_cfg), "optim": asdict(self.optim_cfg),
            "encoder": getattr(self.encoder, "spec", {}), "image_size": self.image_size,
            "gamma": self.gamma,  # what evaluation and prediction score with
            "tag_vectors": None if self.tag_map is None else {
                "path": self.tag_map.path, "freeze": self.tag_map.freeze, "dim": self.tag_map.word_dim,
                "found": self.tag_map.found},
            "holdout_tags": self.holdout_tags,  # kept out of training: evaluate.py's unseen tags by default
            "data": self.data_config,  # evaluate.py scores the same held-out data unless told otherwise
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("im2vec")
        if meta is None:
            raise BadValue("ckpt_path: not an im2vec checkpoint (no 'im2vec' entry)", "resume from a checkpoint written by train.py")
        if (meta["num_tags"], meta["dim"]) != (self.table.num_tags, self.table.dim):
            raise BadValue(f"ckpt_path: the checkpoint has a {meta['num_tags']}×{meta['dim']} tag table, this run "
                           f"{self.table.num_tags}×{self.table.dim}", "resume with the vocabulary and model.dim it was trained with")
        if meta["fingerprint"] != self.fingerprint:
            raise BadValue("ckpt_path: the checkpoint was trained with another vocabulary (same size, other tags)",
                           "resume with the vocabulary file it was trained on")
        rank, world = (self.table.rank, self.table.world) if self.sharded else (0, 1)
        if self.sharded:  # a checkpoint holds the whole table, whatever world size wrote it: take this rank's rows
            sd = checkpoint["state_dict"]
            sd["table.embedding.weight"] = shard_of(sd["table.embedding.weight"], rank, world)
        states = checkpoint.get("optimizer_states") or []
        if len(states) == 2:  # the table's optimizer state: restored in on_train_start, on the CPU, this rank's rows
            opt = states[1]
            mine = map_row_state(opt["state"], lambda v: shard_of(v, rank, world)) if self.sharded else opt["state"]
            self._table_opt_state = {"param_groups": opt["param_groups"], "state": mine}
            states[1] = {"param_groups": opt["param_groups"], "state": {}}
        self.report.gamma = float(meta.get("gamma", self.report.gamma))
        saved_world = int(meta.get("world_size", 1))
        if saved_world == world:  # the same ranks: every stream continues exactly
            self.gen.set_state(meta.get("sampler_rngs", [meta["sampler_rng"]])[rank])
            torch.set_rng_state(meta.get("torch_rngs", [meta["torch_rng"]])[rank])
        else:  # another world size: new streams, seeded by (seed, rank, step) — statistically equivalent
            self.gen.manual_seed(rank_seed(self.seed, rank) + 7919 * int(checkpoint.get("global_step", 0)))
            torch.manual_seed(rank_seed(self.seed, rank) + 7919 * int(checkpoint.get("global_step", 0)) + 1)
            if rank == 0:
                print(f"im2vec: resuming a {saved_world}-rank checkpoint on {world} rank(s): table and optimizer state "
                      "are exact; the samplers' and data streams start anew from (seed, rank, step)")
        if meta["cuda_rng"] and torch.cuda.is_available() and len(meta["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(meta["cuda_rng"])
