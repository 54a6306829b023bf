"""Functions run in spawned gloo processes by tests/test_dist.py (spawn children import them by name)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from im2vec.wide.head import SamplerConfig, sampled_loss
from im2vec.wide.sharded_table import ROW_STATE, ShardedTagTable, assemble_rows
from im2vec.wide.tag_table import make_table_optimizer

V, D, B, P, K, STEPS = 401, 8, 5, 2, 6, 3
OPTIMIZERS = ("sparse_adam", "lazy_adam", "row_adagrad")


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def problem(world: int):
    """Counts, the initial table, and per step and rank: u (B, D), positives (B, P), negatives (B, K).
    Ids repeat within and across ranks (a small V), so duplicates are summed on both levels."""
    g = torch.Generator().manual_seed(123)
    counts = torch.randint(1, 1000, (V,), generator=g)
    table = torch.randn(V, D, generator=g) * 0.1
    steps = []
    for t in range(STEPS):
        per_rank = []
        for r in range(world):
            gr = torch.Generator().manual_seed(1000 * t + r)
            per_rank.append((torch.randn(B, D, generator=gr), torch.randint(0, V, (B, P), generator=gr),
                             torch.randint(0, V, (B, K), generator=gr)))
        steps.append(per_rank)
    return counts, table, steps


def hot_ids(step: int) -> torch.Tensor:
    """The rows replicated on every rank from ``step`` on (``head_steps(hot=True)``): none at step 0 (the state to
    sync at step 1 is then the sharded steps'), one set at step 1, another at step 2 (the first one flushed)."""
    if step == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.arange(0, V, 3) if step == 1 else torch.arange(1, V // 2)


def head_steps(rank: int, world: int, port: int, out: str, hot: bool = False) -> None:
    """W-rank steps of every table optimizer; rank 0 saves the assembled table and state. With ``hot``, rows are
    replicated on every rank (im2vec/wide/hot_rows.py) from step 1 on, another set from step 2."""
    init(rank, world, port)
    counts, full, steps = problem(world)
    group = dist.new_group(backend="gloo")
    s = SamplerConfig(num_negatives=K, num_positives=P)
    result = {}
    for name in OPTIMIZERS:
        table = ShardedTagTable(counts, D, 0.01, rank, world, group, full=full)
        opt = make_table_optimizer(name, [table.weight], 0.05)
        for t, per_rank in enumerate(steps):
            if hot:
                table.set_hot(hot_ids(t), opt)
            u, pos, neg = per_rank[rank]
            u = u.clone().requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            loss, _, _ = sampled_loss(s, table, u, pos, neg, None)
            loss.backward()
            table.reduce_grads()
            opt.step()
            table.step_hot(opt)
        table.flush_hot(opt)
        state = opt.state[table.weight]
        whole = {k: assemble_rows(v, V, rank, world, group) for k, v in state.items() if k in ROW_STATE}
        whole["weight"] = table.assemble()
        if "step" in state:
            whole["step"] = torch.tensor(float(state["step"]))
        result[name] = whole
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def reference(world: int) -> dict:
    """One process, one table, each step's batch the ranks' batches concatenated."""
    from im2vec.wide.tag_table import CPUTagTable

    counts, full, steps = problem(world)
    s = SamplerConfig(num_negatives=K, num_positives=P)
    result = {}
    for name in OPTIMIZERS:
        table = CPUTagTable(counts, D)
        table.weight.data.copy_(full)
        opt = make_table_optimizer(name, [table.weight], 0.05)
        for per_rank in steps:
            u, pos, neg = (torch.cat(x) for x in zip(*per_rank))
            u = u.clone().requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            loss, _, _ = sampled_loss(s, table, u, pos, neg, None)
            loss.backward()
            opt.step()
        state = opt.state[table.weight]
        whole = {k: v.clone() for k, v in state.items() if k in ROW_STATE}
        whole["weight"] = table.weight.detach().clone()
        if "step" in state:
            whole["step"] = torch.tensor(float(state["step"]))
        result[name] = whole
    return result


def validation_gather(rank: int, world: int, port: int, out: str, empty_rank: int = -1) -> None:
    """Rank r adds every world-th validation image (none on ``empty_rank``); rank 0 computes the figures."""
    from im2vec.eval.validation import ValidationReport

    init(rank, world, port)
    group = dist.new_group(backend="gloo")
    counts, table, u, obs, clean, keys, images = validation_problem()
    report = ValidationReport([f"t{i}" for i in range(V)], counts, torch.arange(0, V, 7), 0.2,
                              [0.0, 0.2, 0.5, 1.0], 10, 4)
    if rank != empty_rank:
        for lo in range(rank * 8, len(u), world * 8):  # batches of 8, dealt round-robin as shards are
            sl = slice(lo, lo + 8)
            report.add(u[sl], obs[sl], clean[sl], keys[sl], images[sl])
    report.gather(group, rank, world)
    if rank == 0:
        m = report.compute(table, counts.double().clamp_min(1).log().float(), 0, max_images=30)
        torch.save({"metrics": m, "gamma": report.gamma, "grid": report.image_keys}, out)
    dist.destroy_process_group()


def validation_problem():
    g = torch.Generator().manual_seed(7)
    n = 45
    counts = torch.randint(1, 500, (V,), generator=g)
    table = torch.randn(V, D, generator=g)
    u = torch.randn(n, D, generator=g)
    obs = torch.randint(0, V, (n, 3), generator=g)
    clean = torch.randint(0, V, (n, 2), generator=g)
    keys = [f"img{i:04d}" for i in range(n)]
    images = torch.rand(n, 3, 8, 8, generator=g)
    return counts, table, u, obs, clean, keys, images


def _tag_head_steps(head, opt, sched, batches, backward=lambda x: x.backward()) -> dict:
    """A TagHead's steps (prepare, loss, backward, step) on (u, tags) batches -> the losses and u's gradients."""
    losses, grads = [], []
    for u, tags in batches:
        u = u.clone().requires_grad_(True)
        loss, _, _ = head.loss(u, head.prepare(tags, torch.device("cpu")))
        opt.zero_grad(set_to_none=True)  # after loss, as the module's step: overlapped, the last update is done then
        head.backward(loss, backward)
        head.step(opt, sched)
        losses.append(loss.detach())
        grads.append(u.grad)
    return {"loss": torch.stack(losses), "u_grad": torch.cat(grads)}


def empty_rank_steps(rank: int, world: int, port: int, out: str, hot_rows: int = 0, overlap: bool = False) -> None:
    """Rank 1's batches hold no image (data.decode=gpu, every JPEG failed): TagHead steps on every rank (``hot_rows``
    of them replicated); rank 0 saves its losses, u's gradients and the assembled table and moments. Then, with a
    ShardedTagTable alone, rank 1's batches cut to 2 images: each rank's loss weighted by ``share``."""
    from im2vec.wide.tag_head import TagHead

    init(rank, world, port)
    counts, full, steps = problem(world)
    s = SamplerConfig(num_negatives=K, num_positives=P)
    head = TagHead(counts, D, s, 0.01, seed=3, hot_rows=hot_rows, overlap=overlap)
    head.table.weight.data.copy_(full)
    head.shard(rank, world, timeout_s=30)
    opt = make_table_optimizer("sparse_adam", [head.table.weight], 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    head.start(opt, torch.device("cpu"))  # (overlapped: the optimizer's step is the worker's)
    batches = [(u[:0], tags[:0]) if rank == 1 else (u, tags) for u, tags, _ in (x[rank] for x in steps)]  # rank 1 empty
    state = opt.state[head.table.weight]
    result = _tag_head_steps(head, opt, sched, batches)
    result["hot_rows"] = 0 if head.table.hot is None else head.table.hot.size
    head.end(opt)  # drained: the queued updates applied, the replicated rows back into their owners' shards
    result = {**result, "weight": head.table.assemble(),
              **{k: assemble_rows(state[k], V, rank, world, head.group) for k in ("exp_avg", "exp_avg_sq")}}

    table = ShardedTagTable(counts, D, 0.01, rank, world, head.group, full=full)
    opt = make_table_optimizer("sparse_adam", [table.weight], 0.05)
    for per_rank in steps:
        u, pos, neg = (x[:2] if rank == 1 else x for x in per_rank[rank])
        opt.zero_grad(set_to_none=True)
        loss, _, _ = sampled_loss(s, table, u.clone().requires_grad_(True), pos, neg, None)
        (loss * table.share(u.shape[0])).backward()
        table.reduce_grads()
        opt.step()
    result["uneven"] = table.assemble()
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def empty_rank_reference(world: int) -> dict:
    """One process: rank 0's batches alone through a one-device TagHead (the same seed: the same draws), and the
    ranks' uneven batches concatenated."""
    from im2vec.wide.tag_head import TagHead
    from im2vec.wide.tag_table import CPUTagTable

    counts, full, steps = problem(world)
    s = SamplerConfig(num_negatives=K, num_positives=P)
    head = TagHead(counts, D, s, 0.01, seed=3)
    head.table.weight.data.copy_(full)
    opt = make_table_optimizer("sparse_adam", [head.table.weight], 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = [(u, tags) for u, tags, _ in (x[0] for x in steps)]
    state = opt.state[head.table.weight]
    result = {**_tag_head_steps(head, opt, sched, batches), "weight": head.table.weight.detach().clone(),
              "exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}

    table = CPUTagTable(counts, D)
    table.weight.data.copy_(full)
    opt = make_table_optimizer("sparse_adam", [table.weight], 0.05)
    for per_rank in steps:
        u, pos, neg = (torch.cat([a, b[:2]]) for a, b in zip(*per_rank))
        opt.zero_grad(set_to_none=True)
        loss, _, _ = sampled_loss(s, table, u.clone().requires_grad_(True), pos, neg, None)
        loss.backward()
        opt.step()
    result["uneven"] = table.weight.detach().clone()
    return result


def overlap_steps(rank: int, world: int, port: int, out: str, overlap: bool, hot_rows: int, empty_rank: int) -> None:
    """TagHead's sharded steps, overlapped (the exchange on the worker thread, its own group) or serial, with a
    decaying table LR (the schedule's place in the queue matters) and, in backward, an all-reduce on the default
    group as DDP's; ``empty_rank``'s batches hold no image. Rank 0 saves losses, u's gradients, table and moments."""
    from im2vec.wide.tag_head import TagHead, _deferred_table_step

    init(rank, world, port)
    counts, full, steps = problem(world)
    head = TagHead(counts, D, SamplerConfig(num_negatives=K, num_positives=P), 0.01, seed=3, overlap=overlap,
                   hot_rows=hot_rows)
    head.table.weight.data.copy_(full)
    head.shard(rank, world, timeout_s=30)
    opt = head.make_optimizer("sparse_adam", 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    head.start(opt, torch.device("cpu"))
    deferred = vars(opt).get("step") is _deferred_table_step  # overlapped: the optimizer's own step is the worker's, opt.step() only Lightning's
    batches = [(u[:0], tags[:0]) if rank == empty_rank else (u, tags) for u, tags, _ in (x[rank] for x in steps)]

    def ddp_backward(loss):  # the trunk's all-reduce inside backward, on the default group; then, as the module's
        loss.backward()  # per-batch stop flag does, a collective on the table's group from this (the main) thread
        dist.all_reduce(torch.ones(3))
        dist.all_reduce(torch.ones(2), group=head.group)

    result = _tag_head_steps(head, opt, sched, batches, ddp_backward)
    head.end(opt)
    assert head.worker.overlap == overlap
    result["hot_rows"] = 0 if head.table.hot is None else head.table.hot.size
    result["deferred"] = deferred
    result["own_group"] = head.table.step_group is not head.table.group  # the worker's collectives apart
    state = opt.state[head.table.weight]
    result.update({"weight": head.table.assemble(),
                   **{k: assemble_rows(state[k], V, rank, world, head.group) for k in ("exp_avg", "exp_avg_sq")}})
    result["lr"] = torch.tensor(opt.param_groups[0]["lr"])
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()
