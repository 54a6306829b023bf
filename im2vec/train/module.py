"""The LightningModule: the training loop of a deep-and-wide model, read top to bottom in ``training_step``:
the batch's tag ids to the tag head, the images through the encoder (u = W·f on the trunk's device), the head's
loss, backward, the trunk's AdamW step and the table's own step, logging. The wide part (table, samplers, loss,
the table's optimizer step, its worker thread and the sharded exchange) is ``TagHead`` (im2vec/wide/tag_head.py):
the module never sees which of its variants runs.

Manual optimization (two optimizers): AdamW for the trunk + W on the trunk's device, SparseAdam (or row-wise
Adagrad) for the CPU tag table. Lightning's ``global_step`` then counts optimizer steps (two per batch), so every
schedule here counts batches instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from im2vec.data.gpu_decode import batch_to_trunk
from im2vec.data.samples import SKIP_REASONS
from im2vec.errors import BadValue
from im2vec.eval.validation import ValidationReport
from im2vec.train.checkpoint import check_resume
from im2vec.train.optim import OptimConfig, check_precision, dense_optimizer, warmup_cosine
from im2vec.wide.head import SamplerConfig
from im2vec.wide.tag_head import TagHead
from im2vec.wide.tag_vectors import TagVectorMap

__all__ = ["Im2VecModule", "OptimConfig", "SamplerConfig"]  # the configs' _target_s and train() build these


def _rows(batch: dict) -> int:
    """Samples in a batch of images, or of stored trunk features (frozen-trunk mode, im2vec/train/features.py)."""
    return (batch["features"] if "features" in batch else batch["image"]).shape[0]


def _fresh_log_window() -> dict:
    """What the step accumulates between two log steps."""
    return {"images": 0, "batches": 0}


class Im2VecModule(pl.LightningModule):
    head_class = TagHead  # a subclass may put another head behind the same face (the benchmarks, the DDP test)

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
        self.head = self.head_class(counts, encoder.dim, self.sampler_cfg, self.optim_cfg.table_init_std, seed,
                                    self.optim_cfg.overlap, shard, tag_map, hot_rows=self.optim_cfg.hot_rows)
        # the head's table and word-vector map are registered here: their state-dict keys and device moves
        self.table, self.tag_map = self.head.table, tag_map
        # DDP syncs the trunk only: the table (sharded across ranks) and its CPU buffers are the head's business
        self._ddp_params_and_buffers_to_ignore = ["table.embedding.weight", "table.log_counts"]
        if tag_map is not None:
            self._ddp_params_and_buffers_to_ignore += ["tag_map.store.slot", "tag_map.store.vectors"]
        self.holdout_tags = list(holdout_tags)  # tags kept out of training (zero-shot evaluation), recorded
        self.data_config: dict | None = None  # the data settings trained with (train() sets it): evaluate.py's default
        self.tags, self.fingerprint, self.total_batches = tags, fingerprint, total_batches
        self.image_size = image_size  # what the trunk was trained on: prediction resizes to it
        # γ starts at sampler.gamma and, with choose_gamma, is chosen at every validation (ValidationReport)
        self.report = ValidationReport(tags, counts, noise_ids, self.sampler_cfg.gamma, list(val_gammas),
                                       projector_tags, grid_images, choose_gamma, gamma_by, gamma_rule)
        self.automatic_optimization = False
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # skipped samples this run (CPU)
        self.val_skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # the same, this validation
        self._said_no_val = False
        self.signal_pending = False  # set by im2vec.train.resilience.Preemption's handler; all ranks stop together
        self.stop_now = False
        self._since_log = _fresh_log_window()
        self._last_log_time: float | None = None

    # ---- data on the right device: images go to the trunk, tag ids stay on the CPU for sampling
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch_to_trunk(batch, device, self.image_size)

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
        return self.head.sharded

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            check_precision(getattr(self.trainer, "precision", "32-true"))
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1 and (not self.sharded or self.table.group is None):
            self.shard_table(self.trainer.global_rank, world, getattr(self.trainer.strategy, "_timeout", None))

    def shard_table(self, rank: int, world: int, timeout=None) -> None:
        """Keep only this rank's rows of the table (the head's ``shard``) and register them."""
        if not dist.is_available() or not dist.is_initialized():
            raise BadValue(f"{world} devices but torch.distributed is not initialized", "use trainer=ddp")
        self.head.shard(rank, world, timeout.total_seconds() if timeout is not None else 1800.0)
        self.table = self.head.table

    def full_table(self) -> Tensor | None:
        """The whole (V, d) tag vectors (assembled on rank 0 when sharded: every rank must call it)."""
        return self.head.full_table()

    # ---- the step
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        opt_dense, opt_table = self.optimizers()
        if _rows(batch) == 0 and not self.sharded:  # data.decode=gpu: not one decodable image left
            self.skipped += batch["skipped"]  # counted; no step (with a sharded table every rank must step)
            return None
        prep = self.head.prepare(batch["tags"], self.device)  # with overlap: the rows gathered while the trunk runs
        u = self.embed_batch(batch)  # (B, d)
        loss, s_pos, s_neg = self.head.loss(u, prep)
        opt_dense.zero_grad(set_to_none=True)
        opt_table.zero_grad(set_to_none=True)
        self.head.backward(loss, self.manual_backward)  # DDP all-reduces the trunk in manual_backward
        if self.optim_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_parameters(), self.optim_cfg.grad_clip)
        opt_dense.step()
        dense_sched, table_sched = self.lr_schedulers()
        self.head.step(opt_table, table_sched)
        dense_sched.step()
        self.skipped += self._all_ranks(batch["skipped"])
        self._log_step(loss, s_pos, s_neg, u.shape[0], opt_dense)
        return loss

    def _log_step(self, loss, s_pos, s_neg, batch_size: int, opt_dense) -> None:
        """Log every trainer.log_every_n_steps batches only, CPU tensors only: Lightning makes a device tensor of
        each logged Python float (a blocking copy) and reads logged device tensors back (a synchronization)."""
        acc = self._since_log
        acc["images"] += batch_size
        acc["batches"] += 1
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        now = time.perf_counter()
        # one read-back from the device for this log step; every value logged is a CPU tensor, which Lightning
        # keeps on the CPU (the progress bar reads the last values every batch: from a device tensor, a sync)
        loss, s_pos, s_neg = torch.stack([torch.as_tensor(x).detach().float().reshape(())
                                          for x in (loss, s_pos, s_neg)]).cpu()
        logs = {"train/loss": loss, "train/pos_score": s_pos, "train/neg_score": s_neg,
                "train/lr": opt_dense.param_groups[0]["lr"], **self.head.logs(acc["batches"])}
        if self._last_log_time is not None:
            logs["train/images_per_s"] = acc["images"] / (now - self._last_log_time)
        logs = {k: torch.tensor(float(v)) for k, v in logs.items()}
        for i, reason in enumerate(SKIP_REASONS):  # bad data is skipped, never fatal
            logs[f"data/skipped_{reason}"] = self.skipped[i].float()
        self._last_log_time = now
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
        dist.all_reduce(both, group=self.head.group)
        self.stop_now = bool(both[-1] > 0)
        return both[:-1]

    def on_train_epoch_start(self) -> None:
        self._last_log_time = None  # don't count the loader's restart as step time
        self._since_log = _fresh_log_window()

    def on_train_epoch_end(self) -> None:
        self.head.drain()

    def on_train_start(self) -> None:
        self.head.start(self.optimizers()[1].optimizer, self.device)

    def on_train_end(self) -> None:
        self.head.end(self.optimizers()[1].optimizer)

    def teardown(self, stage: str) -> None:
        self.head.close()

    def state_dict(self, *args, **kwargs):
        self.head.drain()  # a checkpoint (module state, then optimizer state) sees every queued update applied
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
        self.head.drain()
        self.report.reset()
        self.val_skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        max_images = getattr(self.trainer.datamodule, "val_max_images", None)  # a key-hash subset: data.eval_loader
        table, projector = self.head.own_vectors(self.report.projector_tags)  # sharded: this rank's rows, scored here
        rank, world = (self.table.rank, self.table.world) if self.sharded else (0, 1)
        metrics, size = self.report.compute_across(table, self.table.log_counts, self.global_step, max_images,
                                                   self.device, self.head.group, rank, world)
        if not metrics:  # not one usable image: say so (once), never a silent run without figures
            if not self._said_no_val:
                rank_zero_warn("validation: not one usable image in data.val_shards (every sample skipped: corrupt "
                               "images, bad json, or tags outside the vocabulary) — check data.val_shards and "
                               f"data.vocab_path; no held-out figures, γ stays {self.report.gamma:g}")
                self._said_no_val = True
            return
        skipped = self.val_skipped.clone()
        if self.sharded:
            dist.all_reduce(skipped, group=self.head.group)
        self.log_dict({k: v for k, v in metrics.items() if not math.isnan(v)}, batch_size=size)
        self.log_dict({f"data/val_skipped_{r}": skipped[i].float() for i, r in enumerate(SKIP_REASONS)},
                      batch_size=size)
        tb = getattr(self.logger, "experiment", None) if self.logger else None
        if tb is not None and hasattr(tb, "add_embedding") and self.trainer.is_global_zero:
            # the x-axis of the scalars: batches (global_step counts two optimizer steps per batch)
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            self.report.log_pictures(tb, projector, self.table.log_counts, step)

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
        opt_dense = dense_optimizer(self.dense_parameters(), o, self.device, undecayed=self.tag_map,
                                    say=self.trainer is None or self.trainer.is_global_zero,
                                    table=f"{o.table_optimizer} on the {self.table.num_tags:,}×{self.table.dim} tag table"
                                    + (f", sharded by rows over {self.table.world} ranks" if self.sharded else ""))
        opt_table = self.head.make_optimizer(o.table_optimizer, o.table_lr)
        f = warmup_cosine(o.warmup_batches, self.total_batches, o.min_lr_ratio)
        return [opt_dense, opt_table], [torch.optim.lr_scheduler.LambdaLR(opt, f) for opt in (opt_dense, opt_table)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        per_rank = getattr(self._trainer and self._trainer.strategy, "row_shards", False)  # RowShardedDDP: DCP
        streams = self.head.save_state(checkpoint, per_rank)  # sharded: each rank's rows, or all assembled on rank 0
        checkpoint["im2vec"] = {
            "tags": self.tags, "fingerprint": self.fingerprint, "num_tags": self.table.num_tags,
            "dim": self.table.dim, **streams, "torch_rng": torch.get_rng_state(),
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
        meta = check_resume(checkpoint, self.table.num_tags, self.table.dim, self.fingerprint)
        self.head.load_state(checkpoint, meta)  # this rank's rows and table optimizer state, the sampler streams
        self.report.gamma = float(meta.get("gamma", self.report.gamma))
        if meta["cuda_rng"] and torch.cuda.is_available() and len(meta["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(meta["cuda_rng"])
