"""Which shards and samples a rank reads: a spec expanded to shard paths (``expand_shards``), each rank's
part (``rank_shards``), the shards' sizes and uploaders from their ingest statistics (``shard_sizes``,
``user_counts``), the uploader balance (``user_uses``: uploaders drawn ∝ n_u^τ) and a stable subset by
key hash (``key_rank``, ``first_by_key``)."""

from __future__ import annotations

import glob
import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds

from im2vec.errors import BadValue


def user_of(meta: dict) -> str:
    """A sample's uploader as a string ("" where the json names none, or names one by anything but a string or a
    number: such a sample is still a sample, of no known uploader)."""
    user = meta.get("user")
    return str(user) if isinstance(user, (str, int, float)) and not isinstance(user, bool) else ""


def rank_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else from torch.distributed or the RANK/WORLD_SIZE variables."""
    if rank is None or world_size is None:
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if not 0 <= rank < world_size:
        raise BadValue(f"data: rank {rank} is not in [0, {world_size})", "check RANK and WORLD_SIZE")
    return rank, world_size


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's shards: every world_size-th one, so ranks never share a sample."""
    if len(urls) < world_size:
        raise BadValue(f"data: {len(urls)} shard(s) for {world_size} ranks: every rank needs its own",
                       "write smaller shards (ingest --shard-size)")
    return urls[rank::world_size]


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Samples per shard, from the ingest's ``.stats.json`` files when every shard has one (else None)."""
    from im2vec.data.ingest import stats_name

    sizes = []
    for u in urls:
        stats = stats_name(Path(u))
        if not stats.is_file():
            return None
        sizes.append(json.loads(stats.read_text(encoding="utf-8"))["written"])
    return sizes if sum(sizes) > 0 else None


def user_counts(urls: list[str]) -> Counter:
    """Samples per uploader (the json's "user") in these shards: from the ingest's ``.stats.json``
    files when every shard's has them, else by reading the shards' json members once."""
    from im2vec.data.ingest import stats_name

    counts = Counter()
    stats = [stats_name(Path(u)) for u in urls]
    if all(p.is_file() for p in stats):
        found = [json.loads(p.read_text(encoding="utf-8")).get("users") for p in stats]
        if all(f is not None for f in found):
            for f in found:
                counts.update(f)
            return counts
    for u in urls:
        counts.update(_shard_users(u))
    return counts


def _shard_users(url: str) -> Counter:
    counts = Counter()
    try:
        with tarfile.open(url, "r|*") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    try:
                        user = user_of(json.loads(tar.extractfile(member).read()))
                    except (ValueError, AttributeError, RecursionError):
                        continue  # the loader counts such samples (bad_meta) when it meets them
                    if user:
                        counts[user] += 1
    except (OSError, tarfile.TarError, EOFError):
        pass  # a truncated shard: what was read counts; the loader counts the read error
    return counts


def user_uses(counts: Counter, temperature: float | None) -> dict[str, float]:
    """uploader -> how often each of their samples is used per pass over the data, so that uploader u's
    share of a pass is ∝ n_u^τ (τ = ``temperature``): τ = 1 is no balance (every sample once: an empty
    map), τ = 0 gives every uploader the same share, τ = 0.5 shares ∝ √n_u. The uses sum to the samples,
    so a pass uses as many samples as it reads, whatever the collection's shape (4 uploaders of 1,900
    images or 500 of a few): the prolific uploaders' samples are used less than once a pass, the others'
    more. Samples without an uploader are used once."""
    if temperature is None or temperature == 1:
        return {}
    if not 0 <= temperature <= 1:
        raise BadValue(f"data.user_temperature={temperature}", "use a number in [0, 1] (1 or null: no balance)")
    mass = {u: float(n) ** temperature for u, n in counts.items() if n > 0}
    scale = sum(counts.values()) / max(sum(mass.values()), 1e-12)
    return {u: scale * m / counts[u] for u, m in mass.items()}


def _in_subset(keep: float, sample: dict) -> bool:
    return keep >= 1.0 or key_rank(str(sample.get("__key__", ""))) < keep * 2**64


def key_rank(key: str) -> int:
    """A sample key's place in the held-out subset order: a 64-bit hash, the same on every machine."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "big")


def first_by_key(keys: list[str], n: int | None) -> torch.Tensor:
    """Indices of the ``n`` keys with the smallest ``key_rank`` (all when n is None), in their given order."""
    if not n or n >= len(keys):
        return torch.arange(len(keys))
    ranks = torch.tensor([key_rank(k) >> 1 for k in keys], dtype=torch.long)  # >> 1: fits an int64
    return torch.sort(torch.topk(ranks, n, largest=False).indices).values


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns ('train-{000000..000099}.tar'), globs or lists -> a list of shard paths."""
    if not isinstance(spec, str):
        return [str(s) for s in spec]
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return list(wds.shardlists.expand_urls(spec))
