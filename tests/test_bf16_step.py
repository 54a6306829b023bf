"""trainer.precision=bf16-mixed through a real Lightning training step on the CPU: the trunk's side runs under
bf16 autocast, the tag head's loss and the table's gradient stay fp32. The step goes through the default head
(pipelined: rows gathered by the TableWorker), and its table gradient equals the fp32 head's on the same image
vectors. Frozen-trunk batches (stored features through W) keep the step small."""

import copy
import types

import pytorch_lightning as pl
import torch

from im2vec.data.samples import SKIP_REASONS
from im2vec.deep.encoder import ImageEncoder
from im2vec.train.module import Im2VecModule
from im2vec.train.optim import OptimConfig
from im2vec.wide.head import SamplerConfig

V, D, B = 400, 16, 24


def _module() -> Im2VecModule:
    torch.manual_seed(0)
    counts = (2000.0 / torch.arange(1, V + 1)).round().clamp_min(1)
    return Im2VecModule(ImageEncoder("small_cnn", D), [f"t{i}" for i in range(V)], counts, total_batches=1,
                        sampler=SamplerConfig(num_negatives=40, negatives="shared", exclude_own=False),
                        optim=OptimConfig(warmup_batches=1, grad_clip=0.0), seed=3, image_size=32)


def test_a_bf16_mixed_step_gives_the_fp32_table_gradient(tmp_path):
    module = _module()
    reference = copy.deepcopy(module)  # before the step: the same table rows and sampler stream
    g = torch.Generator().manual_seed(1)
    tags = torch.randint(0, V, (B, 3), generator=g)
    batch = {"features": torch.randn(B, module.encoder.width, generator=g).half(), "tags": tags,
             "clean": torch.full((B, 1), -1), "skipped": torch.zeros(len(SKIP_REASONS), dtype=torch.long),
             "keys": [str(i) for i in range(B)], "users": [""] * B}
    seen = {}
    real_loss = module.head.loss

    def spy(self, u, prep):
        seen["u"], seen["variant"] = u.detach().clone(), self.variant
        return real_loss(u, prep)

    module.head.loss = types.MethodType(spy, module.head)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert seen["u"].dtype == torch.bfloat16  # the trunk's side ran under bf16 autocast
    assert seen["variant"] == "pipelined"  # the default one-device head
    got = module.table.weight.grad
    assert got is not None and got.dtype == torch.float32
    # the fp32 head, outside any autocast, on the same (bf16-rounded) image vectors and the same draws
    loss = reference.head.loss(seen["u"].float(), reference.head.prepare(tags, torch.device("cpu")))[0]
    loss.backward()
    want = reference.table.weight.grad
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-6, atol=1e-8)
    assert want.to_dense().abs().max() > 1e-4  # a gradient worth comparing
