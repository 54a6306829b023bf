"""The CPU tag table (im2vec/wide/tag_table.py) inside Im2VecModule (im2vec/train/module.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from im2vec.deep.encoder import ImageEncoder
from im2vec.train.module import Im2VecModule, SamplerConfig
from im2vec.wide.sampler import PAD
from im2vec.wide.tag_table import (
    CPUTagTable,
    RowAdagrad,
    SparseAdam,
    make_table_optimizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(v: int = 40, dim: int = 16, sampler: SamplerConfig | None = None, seed: int = 0) -> Im2VecModule:
    torch.manual_seed(seed)
    counts = torch.randint(1, 500, (v,), generator=torch.Generator().manual_seed(seed))
    tags = [f"tag{i}" for i in range(v)]
    encoder = ImageEncoder("small_cnn", dim=dim)
    return Im2VecModule(encoder, tags, counts, total_batches=10, sampler=sampler)


# ---------------------------------------------------------------- placement and dtype


def test_table_stays_cpu_fp32_when_module_is_moved_or_cast():
    module = _module()
    weight0 = module.table.weight.detach().clone()
    log_counts0 = module.table.log_counts.clone()
    assert weight0.dtype == torch.float32 and weight0.device.type == "cpu"

    sd = module.state_dict()
    assert "table.embedding.weight" in sd and "table.log_counts" in sd
    assert torch.equal(sd["table.embedding.weight"], weight0)

    def check_table():
        t = module.table
        assert t.weight.device.type == "cpu" and t.weight.dtype == torch.float32
        assert t.log_counts.device.type == "cpu" and t.log_counts.dtype == torch.float32
        assert isinstance(t.weight, nn.Parameter) and t.weight.requires_grad
        assert torch.equal(t.weight.detach(), weight0)
        assert torch.equal(t.log_counts, log_counts0)
        assert "table.embedding.weight" in module.state_dict()

    for cast, dtype in [(lambda m: m.double(), torch.float64), (lambda m: m.half(), torch.float16),
                        (lambda m: m.to(torch.bfloat16), torch.bfloat16)]:
        out = cast(module)
        assert out is module
        enc = list(module.encoder.parameters())
        assert enc and all(p.dtype == dtype and p.device.type == "cpu" for p in enc)
        check_table()

    module.to("meta")
    assert all(p.device.type == "meta" for p in module.encoder.parameters())
    check_table()
    assert module.state_dict()["table.embedding.weight"].device.type == "cpu"


@pytest.mark.parametrize("negatives", ["per_example", "shared"])
def test_head_loss_after_casting_module_to_bf16(negatives):
    module = _module(sampler=SamplerConfig(negatives=negatives, num_negatives=4))
    module.to(torch.bfloat16)
    images, tags = _images_and_tags(2, 40, seed=4)
    u = module.encoder(images.to(torch.bfloat16))
    loss, _, _ = module.head.loss(u, module.head.prepare(tags, u.device))
    loss.backward()
    grad = module.table.weight.grad
    assert grad.is_sparse and grad.dtype == torch.float32 and grad.device.type == "cpu"


def test_table_log_counts_brute_force():
    counts = torch.tensor([0, 1, 2, 10, 12345])
    table = CPUTagTable(counts, dim=3, init_std=0.5)
    ref = [math.log(max(c, 1)) for c in counts.tolist()]
    assert table.log_counts.tolist() == pytest.approx(ref, rel=1e-6)
    assert (table.num_tags, table.dim) == (5, 3)
    assert table.weight.shape == (5, 3)
    assert table.embedding.sparse


# ---------------------------------------------------------------- one optimizer step through the tag head


def _images_and_tags(b: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    tags = torch.full((b, 4), PAD, dtype=torch.long)
    for i in range(b):
        n = 1 + i % 4
        tags[i, :n] = torch.randperm(v, generator=g)[:n]
    return images, tags


@pytest.mark.parametrize("negatives", ["per_example", "shared"])
@pytest.mark.parametrize("optimizer", ["sparse_adam", "row_adagrad"])
def test_table_step_leaves_unsampled_rows_untouched(negatives, optimizer):
    v, b, p, k = 500, 4, 2, 6
    cfg = SamplerConfig(negatives=negatives, num_negatives=k, num_positives=p)
    module = _module(v=v, sampler=cfg, seed=1)
    images, tags = _images_and_tags(b, v, seed=2)
    before = module.table.weight.detach().clone()

    u = module.encoder(images)  # (B, d)
    loss, _, _ = module.head.loss(u, module.head.prepare(tags, u.device))
    assert torch.isfinite(loss)
    loss.backward()

    grad = module.table.weight.grad
    assert grad is not None and grad.is_sparse
    grad = grad.coalesce()
    touched = grad.indices()[0]
    max_rows = b * p + (k if negatives == "shared" else b * k)
    assert 0 < touched.numel() <= max_rows
    assert ((touched >= 0) & (touched < v)).all()
    # every image's positives are among its own tags, so some own tag must be touched
    own = {t for t in tags.flatten().tolist() if t != PAD}
    assert own & set(touched.tolist())
    nonzero = touched[(grad.values() != 0).any(1)]
    assert nonzero.numel() > 0

    # the encoder got a dense gradient as usual
    assert any(q.grad is not None and not q.grad.is_sparse for q in module.encoder.parameters())

    rows = module.table.weight.grad._indices()[0]
    assert (rows[1:] > rows[:-1]).all()  # gather deduplicated and sorted the ids: nothing to coalesce
    opt = make_table_optimizer(optimizer, [module.table.weight], lr=0.01)
    assert isinstance(opt, {"sparse_adam": SparseAdam, "row_adagrad": RowAdagrad}[optimizer])
    opt.step()

    after = module.table.weight.detach()
    untouched = torch.ones(v, dtype=torch.bool)
    untouched[touched] = False
    assert untouched.sum() >= v - max_rows
    assert torch.equal(after[untouched], before[untouched])
    for r in nonzero.tolist():
        assert not torch.equal(after[r], before[r]), f"row {r} had a gradient but did not move"


# ---------------------------------------------------------------- RowAdagrad vs a brute-force reference


def _sparse_grad(rows: list[int], values: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)  # uncoalesced


@pytest.mark.parametrize("init_acc", [0.0, 0.1])
def test_row_adagrad_matches_brute_force(init_acc):
    v, d, lr, eps = 9, 4, 0.3, 1e-10
    g = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(v, d, generator=g, dtype=torch.float64))
    opt = RowAdagrad([w], lr=lr, eps=eps, initial_accumulator_value=init_acc)

    ref_w = w.detach().clone().tolist()
    ref_acc = [init_acc] * v
    steps = [[1, 3, 1, 5], [0, 3, 3, 3], [8, 1], [5, 5, 2, 1, 0]]  # duplicates in every step but one
    for rows in steps:
        values = torch.randn(len(rows), d, generator=g, dtype=torch.float64)
        w_before = w.detach().clone()
        acc_before = opt.state[w]["sum"].clone() if opt.state[w] else None
        w.grad = _sparse_grad(rows, values, (v, d))
        opt.step()

        # brute force: duplicate rows are summed, then G_i += mean(g_i^2); w_i -= lr g_i / (sqrt(G_i) + eps)
        summed: dict[int, list[float]] = {}
        for r, val in zip(rows, values.tolist()):
            cur = summed.setdefault(r, [0.0] * d)
            for j in range(d):
                cur[j] += val[j]
        for r, gi in summed.items():
            ref_acc[r] += math.fsum(x * x for x in gi) / d
            for j in range(d):
                ref_w[r][j] -= lr * gi[j] / (math.sqrt(ref_acc[r]) + eps)

        torch.testing.assert_close(w.detach(), torch.tensor(ref_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[w]["sum"], torch.tensor(ref_acc, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
        untouched = [r for r in range(v) if r not in summed]
        assert torch.equal(w.detach()[untouched], w_before[untouched])
        if acc_before is not None:
            assert torch.equal(opt.state[w]["sum"][untouched], acc_before[untouched])
        else:
            assert (opt.state[w]["sum"][untouched] == init_acc).all()


def test_row_adagrad_rejects_dense_gradients():
    w = nn.Parameter(torch.randn(3, 2))
    opt = RowAdagrad([w], lr=0.1)
    w.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError):
        opt.step()


def test_make_table_optimizer():
    w = nn.Parameter(torch.randn(4, 2))
    adam = make_table_optimizer("sparse_adam", [w], lr=0.05)
    assert isinstance(adam, SparseAdam) and adam.param_groups[0]["lr"] == 0.05
    stock = make_table_optimizer("torch_sparse_adam", [w], lr=0.05)
    assert type(stock) is torch.optim.SparseAdam and stock.param_groups[0]["lr"] == 0.05
    ada = make_table_optimizer("row_adagrad", [w], lr=0.2)
    assert isinstance(ada, RowAdagrad) and ada.param_groups[0]["lr"] == 0.2
    with pytest.raises(ValueError):
        make_table_optimizer("adam", [w], lr=0.1)


# ---------------------------------------------------------------- bf16-mixed, checkpoint guards


@pytest.mark.parametrize("negatives", ["per_example", "shared"])
def test_head_loss_under_bf16_autocast_keeps_table_fp32(negatives):
    """What bf16-mixed does: fp32 weights, bf16 compute. The table's gradient must come back fp32, sparse, CPU."""
    module = _module(sampler=SamplerConfig(negatives=negatives, num_negatives=4))
    images, tags = _images_and_tags(3, 40, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = module.encoder(images)
        assert u.dtype == torch.bfloat16
        loss, _, _ = module.head.loss(u, module.head.prepare(tags, u.device))
    loss.backward()
    grad = module.table.weight.grad
    assert grad.is_sparse and grad.dtype == torch.float32 and grad.device.type == "cpu"
    assert torch.isfinite(grad.coalesce().values()).all() and grad.coalesce().values().abs().sum() > 0


def test_checkpoint_with_other_tags_of_the_same_size_is_refused():
    module = _module()
    module.fingerprint = "abc"
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    other = _module()
    other.fingerprint = "xyz"  # same V and d, other tag list
    with pytest.raises(ValueError, match="another vocabulary"):
        other.on_load_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)  # the same vocabulary loads
