"""The GPU check's data (im2vec.bench.gpu), generated once into a cache: JPEG webdataset shards of the embedded
corpus's photos (``im2vec.data.corpus.make_sample``) and a vocabulary padded with rare tags to the plan's V."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path

import numpy as np

from im2vec.bench.gpu_runs import Plan

GENERATOR = 1  # bump when the data written here changes, so that caches are not reused


def _write_shard(job: tuple[str, int, int, int, dict]) -> list[list[str]]:
    """One shard of ``n`` photos drawn by the corpus generator (its uploaders, scenes, noise and long tail)."""
    import webdataset as wds

    from im2vec.data.corpus import CorpusSpec, _Users, make_sample

    path, shard, first, n, spec_kwargs = job
    spec = CorpusSpec(**spec_kwargs)
    users = _Users(np.random.default_rng([spec.seed, 0]), spec.num_users, 0)  # the same uploaders in every shard
    rng = np.random.default_rng([spec.seed, 1, shard])
    zipf = 1.0 / np.arange(11, spec.tail_size + 11) ** spec.tail_exponent
    cdf = np.cumsum(zipf) / zipf.sum()
    tag_lists = []
    with wds.TarWriter(path) as sink:
        for i in range(first, first + n):
            sample = make_sample(rng, users, spec, i, cdf)
            tag_lists.append(json.loads(sample["json"])["tags"])
            sink.write(sample)
    return tag_lists


def padded_vocabulary(counts: Counter, size: int):
    """The ``size`` most frequent tags of ``counts``; when there are fewer, rare tags (count 1, never on a photo)
    fill it up to ``size`` rows, as a large real vocabulary's tail would."""
    from im2vec.data.vocab import Vocabulary, from_counts

    vocab = from_counts(counts, 1, size)
    tags, freq = list(vocab.tags), vocab.counts.tolist()
    taken, i = set(tags), 0
    while len(tags) < size:
        name = f"zzpad{i:07d}"
        i += 1
        if name not in taken:
            tags.append(name)
            freq.append(1)
    return Vocabulary(tags, freq)


def ensure_data(cache: Path, p: Plan, processes: int) -> tuple[Path, Path, float]:
    """(shard folder, vocab.tsv, seconds spent) for the plan, generated once into ``cache``."""
    spec = dict(num_train=p.images, num_val=0, num_test=0, image_size=p.stored, num_users=150,
                tail_size=p.vocab, tail_per_image=8.0, tail_exponent=0.5, seed=p.seed)
    key = hashlib.sha1(json.dumps([spec, p.shards, p.vocab, GENERATOR], sort_keys=True).encode()).hexdigest()[:10]
    out = cache / f"gpu-bench-{key}"
    if (out / "DONE").exists():
        return out, out / "vocab.tsv", 0.0
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    per = math.ceil(p.images / p.shards)
    jobs = [(str(out / f"train-{s:06d}.tar"), s, s * per, min(per, p.images - s * per), spec)
            for s in range(p.shards) if s * per < p.images]
    if processes > 1:
        with mp.get_context("fork").Pool(min(processes, len(jobs))) as pool:
            lists = pool.map(_write_shard, jobs, chunksize=1)
    else:
        lists = [_write_shard(j) for j in jobs]
    counts = Counter(t for shard in lists for tags in shard for t in set(tags))
    padded_vocabulary(counts, p.vocab).save(out / "vocab.tsv")
    (out / "spec.json").write_text(json.dumps({"corpus": spec, "shards": len(jobs), "distinct_tags": len(counts),
                                               "vocab": p.vocab}, indent=1))
    (out / "DONE").touch()
    return out, out / "vocab.tsv", time.perf_counter() - t0

