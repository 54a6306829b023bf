"""The GPU step, checked on the CPU: the head in fp32 under bf16 autocast, fp16 refused, the table and its
optimizer state never routed through the trunk's device, pinned staging, and the overlapped step equal to
the serial one."""

from types import SimpleNamespace

import pytest
import torch

from im2vec.errors import BadValue
from im2vec.train.module import Im2VecModule
from im2vec.train.optim import check_precision
from im2vec.train.training import train
from im2vec.wide import pipeline
from im2vec.wide.head import SamplerConfig, draw_ids, sampled_loss
from im2vec.wide.sampler import NegativeSampler, PositiveSampler
from im2vec.wide.tag_head import Prepared, TagHead
from im2vec.wide.tag_table import CPUTagTable


def _counts(v: int = 500) -> torch.Tensor:
    return (1000.0 / torch.arange(1, v + 1)).round().clamp_min(1)


# ---- 1. the head runs in fp32 under bf16-mixed
def _table_grad_under_bf16(head_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    counts = _counts()
    table = CPUTagTable(counts, 32, init_std=0.3)
    s = SamplerConfig(num_negatives=60, negatives="shared", exclude_own=False)
    gen = torch.Generator().manual_seed(1)
    tags = torch.randint(0, 500, (64, 3))
    ids = draw_ids(s, PositiveSampler(counts, 0.0), NegativeSampler(counts, 0.75), tags, gen)
    lin = torch.nn.Linear(48, 32)
    x = torch.randn(64, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = lin(x)  # bf16, as a trunk's output under bf16-mixed
        assert u.dtype == torch.bfloat16
        if head_fp32:  # the tag head's own loss (serial: the drawn ids given), under the trunk's autocast
            head = TagHead(counts, 32, s, 0.3, seed=1)
            head.table = table
            loss = head.loss(u, Prepared(tags, ids=ids))[0]
        else:  # the head as the trunk's autocast leaves it: rows cast to bf16, repeated rows summed in bf16
            loss = sampled_loss(s, table, u, *ids)[0]
    loss.backward()
    # the fp32 reference on the same (bf16-rounded) image vectors
    ref_table = CPUTagTable(counts, 32)
    ref_table.embedding.weight.data.copy_(table.weight.detach())
    ref_loss = sampled_loss(s, ref_table, u.detach().float(), *ids)[0]
    ref_loss.backward()
    return table.weight.grad.coalesce().to_dense(), ref_table.weight.grad.coalesce().to_dense()


def test_bf16_head_gradient_differs_from_fp32():
    got, ref = _table_grad_under_bf16(head_fp32=False)
    assert (got - ref).abs().max() / ref.abs().max() > 1e-3  # the failure the fp32 head removes: bf16 sums


def test_module_head_is_fp32_under_bf16_autocast():
    got, ref = _table_grad_under_bf16(head_fp32=True)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_module_head_loss_under_autocast_equals_fp32(make_cfg):
    """The module's tag head on its default (pipelined) path: the loss and the table gradient under bf16
    autocast equal the fp32 head on the same image vectors."""
    from im2vec.deep.encoder import ImageEncoder

    counts = _counts()
    mods = [Im2VecModule(ImageEncoder("small_cnn", 16), [str(i) for i in range(500)], counts, 10,
                         SamplerConfig(num_negatives=60, negatives="shared", exclude_own=False)) for _ in range(2)]
    mods[1].table.embedding.weight.data.copy_(mods[0].table.weight.detach())
    u = torch.randn(32, 16).bfloat16()
    tags = torch.randint(0, 500, (32, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a = mods[0].head.loss(u, mods[0].head.prepare(tags, u.device))[0]
    loss_b = mods[1].head.loss(u.float(), mods[1].head.prepare(tags, u.device))[0]
    assert mods[0].head.variant == "pipelined"
    assert loss_a.dtype == torch.float32
    (loss_a + loss_b).backward()
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(mods[0].table.weight.grad.to_dense(), mods[1].table.weight.grad.to_dense(),
                               rtol=0, atol=0)


# ---- 2. fp16 is refused in one line
@pytest.mark.parametrize("precision", ["16-mixed", "16-true", 16])
def test_fp16_is_refused(precision):
    with pytest.raises(BadValue, match="bf16-mixed") as e:
        check_precision(precision)
    assert "\n" not in str(e.value)


def test_module_setup_refuses_fp16():
    from im2vec.deep.encoder import ImageEncoder

    mod = Im2VecModule(ImageEncoder("small_cnn", 16), [str(i) for i in range(500)], _counts(), 10)
    mod.trainer = SimpleNamespace(world_size=1, precision="16-mixed", global_rank=0)  # what setup reads
    with pytest.raises(BadValue, match="16-mixed"):
        Im2VecModule.setup(mod, "fit")
    for ok in ("bf16-mixed", "32-true", "bf16-true"):
        check_precision(ok)


# ---- 3. the table and its optimizer state stay in host memory
def test_resume_never_routes_table_state_through_the_trunks_device(tiny_run, make_cfg, tmp_path, monkeypatch):
    """Lightning's restore moves every optimizer state tensor to the root device: record what it is handed
    while resuming (the shared tiny run's 2 epochs, one more), and check the table's moments are not among them
    (they are restored on the CPU)."""
    import pytorch_lightning.strategies.strategy as strategy_mod

    ckpt = tiny_run.ckpt
    v, d = tiny_run.module.table.num_tags, tiny_run.module.table.dim
    moved = []
    real = strategy_mod._optimizer_to_device

    def record(optimizer, device):
        for state in optimizer.state.values():
            moved.extend(tuple(t.shape) for t in state.values() if isinstance(t, torch.Tensor))
        return real(optimizer, device)

    monkeypatch.setattr(strategy_mod, "_optimizer_to_device", record)
    _, objs2 = train(make_cfg("trainer.max_epochs=3", f"ckpt_path={ckpt}", out=tmp_path / "b"))
    assert moved, "the instrument saw nothing: Lightning's restore path changed"
    assert (v, d) not in moved
    state = objs2["module"].optimizers()[1].optimizer.state[objs2["module"].table.weight]
    assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].shape == (v, d)


def test_load_from_checkpoint_keeps_the_table_in_host_memory(tiny_run):
    """load_from_checkpoint(map_location=DEVICE) must not read the table onto DEVICE: the file is read to
    the CPU, then the module moved (the table stays). "meta" stands in for the GPU: a table read onto it
    would have no values. (The shared tiny run's checkpoint and module.)"""
    mod, ckpt = tiny_run.module, tiny_run.ckpt
    from im2vec.deep.encoder import ImageEncoder

    loaded = Im2VecModule.load_from_checkpoint(
        ckpt, map_location="meta", encoder=ImageEncoder("small_cnn", mod.table.dim), tags=mod.tags,
        counts=mod.head.counts, total_batches=mod.total_batches, fingerprint=mod.fingerprint)
    assert loaded.table.weight.device.type == "cpu"
    torch.testing.assert_close(loaded.table.weight.detach(), mod.table.weight.detach(), rtol=0, atol=0)
    assert next(loaded.encoder.parameters()).device.type == "meta"  # the rest went where it was asked


# ---- 5. pinned staging, non-blocking copies
def test_rows_and_grads_cross_through_pinned_buffers(monkeypatch):
    """With a GPU as the target every host->device copy of the head's inputs starts from a pinned buffer
    and does not block, and the rows' gradient comes back into a pinned buffer. Instrumented on the CPU:
    allocation and copy are recorded, the 'device' tensors stay on the CPU."""
    allocs, copies = [], []

    def alloc(numel, dtype, pin):
        allocs.append(pin)
        return torch.empty(numel, dtype=dtype)

    def to_device(host, device, stream=None):
        copies.append(id(host.untyped_storage()) in pinned or host.untyped_storage().data_ptr() in pinned_ptrs)
        return host.clone()

    pinned, pinned_ptrs = set(), set()
    real_get = pipeline.HostBuffers.get

    def get(self, name, shape, dtype):
        out = real_get(self, name, shape, dtype)
        pinned_ptrs.add(out.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(pipeline, "_alloc", alloc)
    monkeypatch.setattr(pipeline, "to_device", to_device)
    monkeypatch.setattr(pipeline.HostBuffers, "get", get)
    monkeypatch.setattr(pipeline.torch.cuda, "Stream", lambda *a, **k: None)
    monkeypatch.setattr(pipeline.torch.cuda, "Event", lambda *a, **k: SimpleNamespace(
        record=lambda *a: None, synchronize=lambda: None))
    w = pipeline.TableWorker(torch.device("cuda"), overlap=False)
    w.stream = None  # no CUDA here: the copies are recorded, not queued
    table = CPUTagTable(_counts(), 8)
    prep = w.prepare(table.weight, torch.randint(0, 500, (4, 1)), torch.randint(0, 500, (4, 5)),
                     {"weight": torch.ones(4, 5)})
    assert allocs and all(allocs)  # every staging buffer pinned
    assert copies == [True, True, True]  # rows, inverse, weight: all from the pinned buffers
    torch.testing.assert_close(prep.rows, table.weight.detach()[prep.uniq])
    host, _ = w.grad_to_host(torch.ones(prep.uniq.numel(), 8))
    assert host.untyped_storage().data_ptr() in pinned_ptrs


def test_loader_pins_for_a_gpu_trunk(make_cfg):
    from hydra.utils import instantiate

    def torch_loader(loader):  # webdataset's fluid wrappers keep the DataLoader in their pipeline
        while not isinstance(loader, torch.utils.data.DataLoader):
            loader = next(x for x in getattr(loader, "pipeline", None) or [loader.__dict__.get("source")]
                          if x is not None)
        return loader

    dm = instantiate(make_cfg().data, pin_memory=True)
    assert torch_loader(dm.train_dataloader()).pin_memory is True
    assert torch_loader(dm.val_dataloader()).pin_memory is True
    assert torch_loader(instantiate(make_cfg().data).train_dataloader()).pin_memory is False


def test_pinning_is_decided_by_the_trunks_device():
    """The decision itself: pinned batches for a trunk on a GPU, none on the CPU (a GPU run cannot happen here)."""
    from im2vec.train.training import pins_memory

    assert pins_memory(torch.device("cuda")) is True and pins_memory(torch.device("cuda", 1)) is True
    assert pins_memory("cuda:0") is True
    assert pins_memory(torch.device("cpu")) is False and pins_memory(torch.device("meta")) is False


def test_train_gives_the_loaders_the_decision_for_its_trunk(make_cfg, monkeypatch):
    """train() asks the decision with the trainer's root device and hands its answer to the data module: the
    decision is replaced by one answering True, and the run stopped when the module is set up."""
    import im2vec.train.training as training

    asked, seen = [], {}

    class Stop(Exception):
        pass

    def decide(device):
        asked.append(torch.device(device))
        return True

    def setup(self, stage):
        seen["pin"] = self.trainer.datamodule.pin_memory
        raise Stop

    monkeypatch.setattr(training, "pins_memory", decide)
    monkeypatch.setattr(Im2VecModule, "setup", setup)
    with pytest.raises(Stop):
        train(make_cfg("trainer.max_epochs=1"))
    assert [d.type for d in asked] == ["cpu"]  # the trunk's device here
    assert seen["pin"] is True  # the data module got the decision's answer, not a constant


# ---- 6. the overlapped step equals the serial step
def _fit(make_cfg, out, *overrides):
    # the same thread counts in every run (the plan gives the trunk one thread fewer with overlap): torch's conv
    # sums in another order with another thread count, which is not what these tests compare
    metrics, objs = train(make_cfg("trainer.max_epochs=2", "data.batches_per_epoch=4", "trainer.log_every_n_steps=3",
                                   "threads.trunk=1", "threads.table=1", *overrides, out=out))
    mod = objs["module"]
    opt = mod.optimizers()[1].optimizer
    state = opt.state[mod.table.weight]
    return mod, {"table": mod.table.weight.detach().clone(), "m": state["exp_avg"].clone(),
                 "v": state["exp_avg_sq"].clone(), "step": state["step"], "lr": opt.param_groups[0]["lr"],
                 "trunk": torch.cat([p.detach().flatten() for p in mod.encoder.parameters()]),
                 "gen": mod.head.gen.get_state()}, metrics


@pytest.mark.parametrize("sampler", [[], ["sampler.loss=softmax", "sampler.negatives=shared"]])
def test_overlapped_step_equals_serial_step(make_cfg, tmp_path, monkeypatch, sampler):
    _, serial, m_serial = _fit(make_cfg, tmp_path / "serial", "optim.overlap=false", *sampler)
    mod, over, m_over = _fit(make_cfg, tmp_path / "overlap", "optim.overlap=true", *sampler)
    assert mod.head.worker.overlap and mod.head._table_step is not None
    # the head as it was before the pipeline (sampled_loss through CPUTagTable.gather), serial

    def serial_prepare(self, tags, device):
        self.device = torch.device(device)
        return Prepared(tags, ids=self.draw(tags))

    monkeypatch.setattr(TagHead, "prepare", serial_prepare)
    _, old, _ = _fit(make_cfg, tmp_path / "old", "optim.overlap=false", *sampler)
    for name in serial:
        for other in (over, old):
            if isinstance(serial[name], torch.Tensor):
                torch.testing.assert_close(other[name], serial[name], rtol=1e-6, atol=1e-6, msg=name)
            else:
                assert other[name] == serial[name], name
    assert serial["step"] == 8  # every batch updated the table
    assert m_over["val/precision@5"] == pytest.approx(m_serial["val/precision@5"], abs=1e-6)


def test_overlap_worker_error_surfaces(make_cfg, tmp_path, monkeypatch):
    """An error on the worker thread (here: in the table update) stops the run with that error."""
    def boom(self, *a):
        raise RuntimeError("table update failed")

    monkeypatch.setattr(TagHead, "_update_table", boom)
    with pytest.raises(RuntimeError, match="table update failed"):
        train(make_cfg("optim.overlap=true", "trainer.max_epochs=1"))


def test_overlap_with_a_sharded_table_is_on_with_a_gpu_trunk_and_asked_for_on_the_cpu():
    """The decision a GPU run makes (no GPU here): optim.overlap=auto overlaps the sharded step when the trunk's
    device is a GPU, not on the CPU; true overlaps it anywhere (its arithmetic: tests/test_dist.py)."""
    from im2vec.deep.encoder import ImageEncoder
    from im2vec.train.module import OptimConfig

    with pytest.raises(BadValue, match="optim.overlap"):
        OptimConfig(overlap="sometimes")
    kw = dict(encoder=ImageEncoder("small_cnn", 16), tags=[str(i) for i in range(500)], counts=_counts(),
              total_batches=10, shard=(0, 2))  # rank 0 of 2: a sharded table
    assert Im2VecModule(optim=OptimConfig(overlap=True), **kw).head.overlap
    mod = Im2VecModule(optim=OptimConfig(overlap="auto"), **kw)
    assert mod.sharded and not mod.head.overlap and mod.head.variant == "sharded"
    mod.head.device = torch.device("cuda", 0)  # where the trunk would be
    assert mod.head.overlap
    assert not Im2VecModule(optim=OptimConfig(overlap=False), **kw).head.overlap


def test_train_with_decode_on_the_trunks_device(make_cfg):
    """data.decode=gpu end to end (the trunk's device is the CPU here): the loader leaves JPEGs encoded,
    the module decodes them in transfer_batch_to_device; figures come out, nothing is skipped."""
    metrics, objs = train(make_cfg("data.decode=gpu", "trainer.max_epochs=1"))
    assert 0.0 <= metrics["val/precision@5"] <= 1.0
    assert int(objs["module"].skipped.sum()) == 0


def test_logging_reads_the_device_only_on_log_steps(make_cfg, monkeypatch):
    """Lightning turns a logged Python float into a tensor on the module's device (a blocking copy) and reads
    logged device tensors back for the progress bar every batch: the step logs only every log_every_n_steps
    batches, and only CPU tensors."""
    calls = []
    real_log_dict, real_log = Im2VecModule.log_dict, Im2VecModule.log

    def log_dict(self, d, *a, **k):
        if self.trainer.training:
            calls.append((self.trainer.fit_loop.epoch_loop._batches_that_stepped, list(d.values())))
        return real_log_dict(self, d, *a, **k)

    def log(self, name, value, *a, **k):
        if self.trainer.training:
            calls.append((self.trainer.fit_loop.epoch_loop._batches_that_stepped, [value]))
        return real_log(self, name, value, *a, **k)

    monkeypatch.setattr(Im2VecModule, "log_dict", log_dict)
    monkeypatch.setattr(Im2VecModule, "log", log)
    train(make_cfg("trainer.max_epochs=1", "data.batches_per_epoch=9", "trainer.log_every_n_steps=4"))
    assert {b for b, _ in calls} == {3, 7}  # batches 4 and 8 (0-based counts before the step)
    values = [v for _, vs in calls for v in vs]
    assert values and all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in values)


def test_a_head_with_its_own_draw_is_used_and_stepped_with_overlap_on(make_cfg, monkeypatch):
    """A head with its own draw keeps it (the pipelined step's worker calls only the stock draw: this head runs
    serial), and its table gradient is stepped even with optim.overlap=true (no deferred step for a head that
    is not queued)."""
    import im2vec.train.training as training

    calls = []

    class OwnHead(TagHead):
        def draw(self, tags):
            calls.append(1)
            return super().draw(tags)

    class Own(Im2VecModule):
        head_class = OwnHead

    monkeypatch.setattr(training, "Im2VecModule", Own)
    _, objs = train(make_cfg("optim.overlap=true", "trainer.max_epochs=1"))
    mod = objs["module"]
    assert isinstance(mod, Own) and len(calls) == 3 and mod.head.variant == "serial"
    assert mod.optimizers()[1].optimizer.state[mod.table.weight]["step"] == 3  # every batch updated the table
