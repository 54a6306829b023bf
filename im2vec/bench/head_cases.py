"""One case of the tag-head benchmark (im2vec.bench.head), run in a process of its own: the synthetic Zipf
vocabulary and batches, and the three kinds of case: tag-head steps with the training code's own sampling,
loss and table optimizers (``run_head``), the dense head one would otherwise write (``run_dense``) and a whole
training step beside the trunk alone (``run_whole``)."""

from __future__ import annotations

import statistics
import time

import torch

from im2vec.bench.machine import copy_bandwidth, peak_rss, reset_peak, rss

STATE_TENSORS = {"sparse_adam": 2, "torch_sparse_adam": 2, "shared": 2}  # full (V, d) state tensors


# ---------------------------------------------------------------- synthetic vocabulary and batches
def zipf_counts(v: int) -> torch.Tensor:
    """count(rank r) = ceil(V / r): Zipf's law, every tag seen at least once."""
    return torch.ceil(v / torch.arange(1, v + 1, dtype=torch.float64)).long()


def batch_tags(counts: torch.Tensor, b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) tag ids drawn ∝ count (frequent tags are on more photos), distinct within a row."""
    from im2vec.wide.sampler import PAD, NegativeSampler

    ids = NegativeSampler(counts, alpha=1.0).sample((b, t), gen)
    ids, _ = ids.sort(1)
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return torch.where(dup, torch.full_like(ids, PAD), ids).sort(1, descending=True).values  # PAD (-1) last


def estimate_bytes(case: dict) -> int:
    v, d, b = case["V"], case["d"], case["B"]
    if case["kind"] == "dense":
        return _dense_minimum(v, d) + 4 * b * v * 4  # + logits, targets and their gradients
    return _minimum(case["head"], v, d) + v * 40  # + counts and the sampler's CDF


# ---------------------------------------------------------------- one case, in its own process
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_head(case: dict) -> dict:
    """Tag-head steps with the training code's own sampling, gather, loss and optimizers."""
    from im2vec.wide.head import SamplerConfig, draw_ids, sampled_loss
    from im2vec.wide.sampler import NegativeSampler, PositiveSampler
    from im2vec.wide.tag_table import CPUTagTable, make_table_optimizer

    v, d, b, head = case["V"], case["d"], case["B"], case["head"]
    gen = torch.Generator().manual_seed(0)
    counts = zipf_counts(v)
    shared = head == "shared"
    cfg = SamplerConfig(negatives="shared" if shared else "per_example",
                        num_negatives=case["shared"] if shared else case["K"])
    pos_sampler, neg_sampler = PositiveSampler(counts, cfg.beta), NegativeSampler(counts, cfg.alpha)
    batches = [batch_tags(counts, b, case["tags_per_image"], gen) for _ in range(8)]
    u = torch.randn(b, d, generator=gen).mul_(0.1).requires_grad_()
    optimizer = "sparse_adam" if shared else head
    stock = head == "torch_sparse_adam"  # the stock path: nn.Embedding(sparse=True) lookup, torch's SparseAdam

    def step(table, opt, tags, samplers) -> tuple[float, float, float, float, int]:
        t0 = time.perf_counter()
        ids = draw_ids(cfg, *samplers, tags, gen)
        t1 = time.perf_counter()
        table.weight.grad = None
        u.grad = None
        loss, _, _ = sampled_loss(cfg, table, u, *ids, dedupe=not stock)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t0, t1, t2, t3, torch.cat([ids[0].flatten(), ids[1].flatten()]).unique().numel()

    # The same steps first on a small table with uniform counts (so that about as many distinct rows
    # are touched per step as with the real one): numba's kernels are loaded, torch initialises
    # lazily, and the heap grows to a step's working memory, all before the memory baseline. That
    # working memory (independent of V) is reported on its own.
    rows_sampled = b * cfg.num_positives + cfg.num_negatives * (1 if shared else b)
    tiny = torch.ones(min(v, 1024), dtype=torch.long)  # code loaded and initialised before any baseline
    tiny_table = CPUTagTable(tiny, d)
    step(tiny_table, make_table_optimizer(optimizer, [tiny_table.weight], lr=0.01), batches[0].clamp(max=tiny.numel() - 1),
         (PositiveSampler(tiny, cfg.beta), NegativeSampler(tiny, cfg.alpha)))
    del tiny_table
    few = torch.ones(min(v, 8 * rows_sampled), dtype=torch.long)
    base, _ = rss(), reset_peak()
    small = CPUTagTable(few, d)
    small_opt = make_table_optimizer(optimizer, [small.weight], lr=0.01)
    small_samplers = (PositiveSampler(few, cfg.beta), NegativeSampler(few, cfg.alpha))
    for i in range(3):
        step(small, small_opt, batches[i].clamp(max=few.numel() - 1), small_samplers)
    working = max(0, peak_rss() - base - _minimum(head, few.numel(), d))  # 0: reused what earlier work freed
    del small, small_opt
    bandwidth = copy_bandwidth(case["bandwidth_mb"])

    base, exact_peak = rss(), reset_peak()  # table + state from here on
    table = CPUTagTable(counts, d)
    opt = make_table_optimizer(optimizer, [table.weight], lr=0.01)
    per_row = 7 * d * 4 if head != "row_adagrad" else 3 * d * 4 + 8  # bytes the update moves per distinct row
    out = {"sample_ms": [], "fwd_bwd_ms": [], "update_ms": [], "step_ms": [], "rows": [], "floor_ms": []}
    for i in range(case["warmup"] + case["steps"]):
        t0, t1, t2, t3, rows = step(table, opt, batches[i % len(batches)], (pos_sampler, neg_sampler))
        if i >= case["warmup"]:
            for key, x in (("sample_ms", t1 - t0), ("fwd_bwd_ms", t2 - t1), ("update_ms", t3 - t2),
                           ("step_ms", t3 - t0)):
                out[key].append(x * 1e3)
            out["rows"].append(rows)
            out["floor_ms"].append(rows * per_row / bandwidth * 1e3)
    peak = peak_rss() - base
    minimum = _minimum(head, v, d)
    ratios = [u_ / f for u_, f in zip(out["update_ms"], out["floor_ms"])]
    return {**{k: _median(x) for k, x in out.items()}, "update_over_floor": _median(ratios),
            "bandwidth_gbs": bandwidth / 1e9, "peak_bytes": peak, "min_bytes": minimum,
            "peak_over_min": peak / minimum, "peak_exact": exact_peak, "rows_sampled": rows_sampled,
            "working_bytes": working}


def _dense_minimum(v: int, d: int) -> int:
    """Bytes of the dense head's weights and bias, their gradient and Adam's two moments."""
    return 4 * v * (d + 1) * 4


def _minimum(head: str, v: int, d: int) -> int:
    """Bytes of the (V, d) fp32 table plus its optimizer state, nothing else."""
    return v * d * 4 * (1 + STATE_TENSORS.get(head, 0)) + (v * 4 if head == "row_adagrad" else 0)


def run_dense(case: dict) -> dict:
    """The head one would otherwise write: a V-wide Linear, BCE over multi-hot targets, dense Adam."""
    import torch.nn.functional as F

    from im2vec.wide.loss import multi_hot

    v, d, b = case["V"], case["d"], case["B"]
    gen = torch.Generator().manual_seed(0)
    counts = zipf_counts(v)
    batches = [batch_tags(counts, b, case["tags_per_image"], gen) for _ in range(2)]
    u = torch.randn(b, d, generator=gen).mul_(0.1).requires_grad_()

    def step(head: torch.nn.Linear, opt: torch.optim.Optimizer, tags: torch.Tensor) -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        u.grad = None
        targets = multi_hot(tags, head.out_features)  # (B, V)
        loss = F.binary_cross_entropy_with_logits(head(u), targets)
        loss.backward()
        opt.step()
        return (time.perf_counter() - t) * 1e3

    small = torch.nn.Linear(d, 1000)  # once on a small head first (lazy initialisation outside the baseline)
    step(small, torch.optim.Adam(small.parameters()), batches[0].clamp(max=999))
    del small
    base, exact_peak = rss(), reset_peak()
    head = torch.nn.Linear(d, v)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    steps = []
    for i in range(case["warmup"] + case["steps"]):
        ms = step(head, opt, batches[i % len(batches)])
        if i >= case["warmup"]:
            steps.append(ms)
    peak = peak_rss() - base
    minimum = _dense_minimum(v, d)
    return {"step_ms": _median(steps), "peak_bytes": peak, "min_bytes": minimum, "peak_over_min": peak / minimum,
            "peak_exact": exact_peak}


def run_whole(case: dict) -> dict:
    """A whole training step (default small trunk + sampled head) beside the trunk alone, interleaved."""
    from im2vec.deep.encoder import ImageEncoder
    from im2vec.wide.head import SamplerConfig, draw_ids, sampled_loss
    from im2vec.wide.sampler import NegativeSampler, PositiveSampler
    from im2vec.wide.tag_table import CPUTagTable, make_table_optimizer

    v, d, b, size = case["V"], case["d"], case["B"], case["image_size"]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    counts = zipf_counts(v)
    cfg = SamplerConfig(num_negatives=case["K"])
    pos_sampler, neg_sampler = PositiveSampler(counts, cfg.beta), NegativeSampler(counts, cfg.alpha)
    tags = batch_tags(counts, b, case["tags_per_image"], gen)
    images = torch.randn(b, 3, size, size, generator=gen)
    encoder = ImageEncoder("small_cnn", d)
    table = CPUTagTable(counts, d)
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
    opt_table = make_table_optimizer("sparse_adam", [table.weight], lr=0.01)

    def step(with_head: bool) -> float:
        t = time.perf_counter()
        u = encoder(images)
        if with_head:
            loss = sampled_loss(cfg, table, u, *draw_ids(cfg, pos_sampler, neg_sampler, tags, gen))[0]
        else:
            loss = u.square().mean()
        opt.zero_grad(set_to_none=True)
        table.weight.grad = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        if with_head:
            opt_table.step()
        return (time.perf_counter() - t) * 1e3

    whole, trunk = [], []
    for i in range(case["warmup"] + case["steps"]):
        a, c = step(True), step(False)
        if i >= case["warmup"]:
            whole.append(a)
            trunk.append(c)
    w, t = _median(whole), _median(trunk)
    return {"step_ms": w, "trunk_ms": t, "wide_share": (w - t) / w}


def run_case(case: dict) -> dict:
    from im2vec.wide.allocator import tune_malloc

    tuned = tune_malloc() if case.get("malloc_tuning", True) else False  # as training does
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    t = time.perf_counter()
    result = {"head": run_head, "dense": run_dense, "whole": run_whole}[case["kind"]](case)
    return {**result, "case_seconds": time.perf_counter() - t, "malloc_tuned": tuned}
