"""Checkpoints of a sharded table as a folder that every rank writes its own part of, through
``torch.distributed.checkpoint`` (DCP), and that any number of processes reads back.

The one idea: the saved row space is **rank-major**. Rank r of W owns the strided ids r, r+W, r+2W, … (the
training exchange's ``id % W``); its local shard, in its own memory order, is written unchanged as the
contiguous block [off_r, off_r + n_r) of a (V, …) tensor, off_r = n_0 + … + n_{r-1} (chunks of at most
``CHUNK_BYTES``, each with its global offset, as DCP's sharded chunks are). A save then copies nothing and
sends no row anywhere: each rank writes what it holds. W is recorded in the checkpoint's metadata
(``planner_data``), so position p of block q is the global id q + (p − off_q)·W.

Reading on W′ ranks (or one process: W′ = 1) is a planner of our own (``RowLoadPlanner``): for each saved chunk
it computes which of its rows rank r′ owns under ``id % W′`` (an arithmetic progression: ids ≡ q mod W and ≡ r′
mod W′, by the Chinese remainder theorem) and copies them, strided, into the rank's shard. No collective is
needed to read: each rank plans its reads alone (``no_dist``). Memory while reading: the shard plus one saved
chunk. (DCP's own resharding needs contiguous blocks of one row space; the strided layout has none that does
not depend on W, hence the planner.)

Everything that is not a row shard (trunk, dense optimizer, schedules, loops, metadata) is written once, by
rank 0: tensors as DCP tensors, the rest of the checkpoint's structure as one "skeleton" read weights-only.

Complete or absent: DCP writes the data files, then ``.metadata`` (under a temporary name, renamed); the whole
folder is written as ``<name>.tmp-dcp`` and exchanged with ``<name>`` in one ``renameat2(RENAME_EXCHANGE)``
(or renamed into place when there is none), so a kill at any point leaves the previous checkpoint whole.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import math
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.default_planner import (DefaultLoadPlanner, DefaultSavePlanner,
                                                         create_default_local_load_plan)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, ReadItem, SavePlan, TensorWriteData,
                                                 WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import _create_write_items

from im2vec.wide.sharded_table import shard_rows

ROW_SHARDS = "row_shards"  # a checkpoint dict's entry naming its row-sharded tensors (set by the head on save)
SKELETON = "skeleton"  # the checkpoint's structure, tensors replaced by their DCP names
LAYOUT = "im2vec_rows"  # in the DCP metadata's planner_data: {"world": W, "rows": V, "keys": [...]}
CHUNK_BYTES = 64 << 20  # at most this much of a shard per saved chunk: what a reader holds at once besides its rows
METADATA = ".metadata"


def block_offsets(rows: int, world: int) -> list[int]:
    """Where each rank's block starts in the rank-major row space (and, last, the total)."""
    out = [0]
    for r in range(world):
        out.append(out[-1] + shard_rows(rows, r, world))
    return out


# ---- the checkpoint dict <-> flat DCP state dict
def flatten(checkpoint: dict) -> tuple[dict, dict[str, Tensor]]:
    """A (nested) checkpoint -> its skeleton (every non-empty tensor replaced by {"__dcp__": name}) and the
    tensors by name ("/"-joined keys)."""
    tensors: dict[str, Tensor] = {}

    def walk(obj, path):
        if isinstance(obj, Tensor) and obj.numel() > 0:
            name = "/".join(map(str, path))
            tensors[name] = obj.detach()
            return {"__dcp__": name}
        if isinstance(obj, dict):
            return {k: walk(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            out = [walk(v, (*path, i)) for i, v in enumerate(obj)]
            return out if isinstance(obj, list) else tuple(out)
        return obj

    return walk(checkpoint, ()), tensors


def unflatten(skeleton, tensors: dict):
    """The inverse of ``flatten``: the checkpoint with every tensor put back."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__dcp__"}:
            return tensors[skeleton["__dcp__"]]
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        out = [unflatten(v, tensors) for v in skeleton]
        return out if isinstance(skeleton, list) else tuple(out)
    return skeleton


# ---- save: each rank its own rows, rank 0 the rest
class RowSavePlanner(DefaultSavePlanner):
    """Rank ``rank`` of ``world`` writes its shard of each row key as chunks of the rank-major row space; rank 0
    also writes every other entry."""

    def __init__(self, row_keys: list[str], rank: int, world: int, rows: int):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.row_keys, self.rank, self.world, self.rows = list(row_keys), rank, world, rows
        self._chunks: dict[MetadataIndex, Tensor] = {}

    def create_local_plan(self):
        items = []
        start = block_offsets(self.rows, self.world)[self.rank]
        for fqn, obj in self.state_dict.items():
            if fqn not in self.row_keys:
                if self.rank == 0:
                    items += _create_write_items(fqn, obj)
                continue
            step = max(1, CHUNK_BYTES // max(1, obj[:1].nbytes))
            for lo in range(0, obj.shape[0], step):
                chunk = obj[lo:lo + step]
                offsets = torch.Size([start + lo] + [0] * (obj.dim() - 1))
                index = MetadataIndex(fqn, offsets)
                self._chunks[index] = chunk
                items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=chunk.shape),
                    properties=TensorProperties.create_from_tensor(chunk),
                    size=torch.Size([self.rows, *obj.shape[1:]]))))
        self.plan = SavePlan(items)
        return self.plan

    def create_global_plan(self, all_plans):
        plans, metadata = super().create_global_plan(all_plans)
        layout = {"world": self.world, "rows": self.rows, "keys": self.row_keys}
        self.metadata = dataclasses.replace(metadata, planner_data={LAYOUT: layout})
        return plans, self.metadata

    def lookup_object(self, index: MetadataIndex):
        if index in self._chunks:
            return self._chunks[index]
        return super().lookup_object(index)


def save_sharded(checkpoint: dict, path: str | os.PathLike, rank: int, world: int, group=None) -> None:
    """Write ``checkpoint`` (every rank calls this with its own; its ``ROW_SHARDS`` entry names the row-sharded
    tensors) as the DCP folder ``path``, complete or absent."""
    checkpoint = dict(checkpoint)
    spec = checkpoint.pop(ROW_SHARDS)
    skeleton, tensors = flatten(checkpoint)
    row_keys = [k for k in spec["keys"] if k in tensors]
    state = {k: v for k, v in tensors.items() if k in row_keys or rank == 0}
    if rank == 0:
        state[SKELETON] = skeleton
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp-dcp")
    if rank == 0:  # a folder left by a save that was killed: cleared before any rank writes into it
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier(group=group)
    with warnings.catch_warnings():  # one process (world 1): DCP says it assumes so
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
                 planner=RowSavePlanner(row_keys, rank, world, int(spec["rows"])), process_group=group,
                 no_dist=world == 1)
    if rank == 0:  # every rank's files and then the metadata are written: put the folder in place
        swap_into_place(tmp, path)
    if world > 1:
        dist.barrier(group=group)


def swap_into_place(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path`` in one rename (an atomic exchange when ``path`` exists); the old one is removed."""
    _fsync_dir(tmp)
    if path.exists() or path.is_symlink():
        if not _exchange(tmp, path):  # no renameat2 here (not Linux, or a filesystem without it): two renames
            old = path.with_name(path.name + ".old-dcp")
            _remove(old)
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
        _remove(tmp)  # now the previous checkpoint
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- load: any rank of any world, or one process
class RowLoadPlanner(DefaultLoadPlanner):
    """Reads the plain entries of ``state_dict`` as DCP does, and into each row key's tensor the rows that rank
    ``rank`` of ``world`` owns (``id % world == rank``, local row ``id // world``) from a rank-major checkpoint."""

    def __init__(self, row_keys: list[str], rank: int, world: int):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.row_keys, self.rank, self.world = set(row_keys), rank, world
        self._reads: dict[tuple, tuple] = {}

    def create_local_plan(self):
        plain = {k: v for k, v in self.state_dict.items() if k not in self.row_keys}
        items = list(create_default_local_load_plan(plain, self.metadata, True).items)
        layout = (self.metadata.planner_data or {}).get(LAYOUT)
        for fqn in self.row_keys:
            md = self.metadata.state_dict_metadata[fqn]
            items += self._row_reads(fqn, md, layout["world"], self.state_dict[fqn])
        return LoadPlan(items)

    def _row_reads(self, fqn: str, md: TensorStorageMetadata, saved_world: int, dest: Tensor) -> list[ReadItem]:
        w, w2, r2 = saved_world, self.world, self.rank
        offs = block_offsets(md.size[0], w)
        g = math.gcd(w, w2)
        s = w2 // g  # within a saved block, the rows rank r2 owns are every s-th one
        out = []
        for chunk in md.chunks:
            lo = chunk.offsets[0]
            q = next(b for b in range(w) if offs[b] <= lo < offs[b + 1])  # the saving rank
            if (r2 - q) % g:
                continue  # ids ≡ q (mod w) and ≡ r2 (mod w2) have no solution
            i_lo, i_hi = lo - offs[q], lo - offs[q] + chunk.sizes[0]  # rows of block q in this chunk
            i0 = ((r2 - q) // g * pow(w // g, -1, s)) % s if s > 1 else 0
            first = i_lo + (i0 - i_lo) % s
            if first >= i_hi:
                continue
            m = len(range(first, i_hi, s))
            j = (q + first * w) // w2  # the first one's local row on rank r2
            span = (m - 1) * s + 1
            rest = [0] * (len(md.size) - 1)
            item = ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(fqn, [j, *rest]),
                            dest_offsets=torch.Size([j, *rest]), storage_index=MetadataIndex(fqn, chunk.offsets),
                            storage_offsets=torch.Size([first - i_lo, *rest]),
                            lengths=torch.Size([span, *chunk.sizes[1:]]))
            self._reads[(fqn, tuple(chunk.offsets))] = (dest, j, m, w // g, s)
            out.append(item)
        return out

    def resolve_tensor(self, read_item: ReadItem):
        fqn = read_item.dest_index.fqn
        if fqn not in self.row_keys:
            return super().resolve_tensor(read_item)
        dest, j, m, dest_step, s = self._reads[(fqn, tuple(read_item.storage_index.offset))]
        if s == 1:  # consecutive saved rows: straight into their (strided) places in the shard
            return dest[j: j + (m - 1) * dest_step + 1: dest_step]
        return torch.empty(read_item.lengths, dtype=dest.dtype)  # every s-th row is ours: through a buffer

    def commit_tensor(self, read_item: ReadItem, tensor: Tensor) -> None:
        fqn = read_item.dest_index.fqn
        if fqn in self.row_keys:
            dest, j, m, dest_step, s = self._reads[(fqn, tuple(read_item.storage_index.offset))]
            if s > 1:
                dest[j: j + (m - 1) * dest_step + 1: dest_step] = tensor[::s]

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)  # never arbitrary objects


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` read without running arbitrary code: only DCP's metadata classes, torch's sizes, dtypes
    and layouts, and paths (the rest of a checkpoint is read weights-only)."""

    def find_class(self, module: str, name: str):
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        elif module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's {METADATA}")


class SafeReader(dcp.FileSystemReader):
    """DCP's file-system reader, its metadata unpickled by ``_MetadataUnpickler``."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, METADATA), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load(state: dict, path: str, planner: RowLoadPlanner) -> None:
    """``dcp.load`` in this process alone (no collective: each rank plans its own reads); DCP's failures as
    RuntimeError (DCP raises a BaseException)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, storage_reader=SafeReader(path), planner=planner, no_dist=True)
    except CheckpointException as e:
        first = next(iter(e.failures.values()), e)
        raise RuntimeError(f"{path}: {type(first).__name__}: {str(first).strip().splitlines()[0][:200]}") from None


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (complete: its metadata, written last, is there)."""
    return (Path(path) / METADATA).is_file()


def read_metadata(path: str | os.PathLike):
    return SafeReader(str(path)).read_metadata()


class SavedRows:
    """A row-sharded tensor of a DCP checkpoint, not read yet: ``read_rows`` reads one rank's rows of it."""

    def __init__(self, path: str, fqn: str, shape: tuple, dtype: torch.dtype):
        self.path, self.fqn, self.shape, self.dtype = path, fqn, tuple(shape), dtype

    def __repr__(self) -> str:
        return f"SavedRows({self.fqn!r}, {self.shape})"


def read_sharded(path: str | os.PathLike, rank: int | None = 0, world: int = 1) -> dict:
    """A DCP checkpoint folder -> the checkpoint dict: every plain entry read, and each row-sharded tensor as rank
    ``rank`` of ``world`` owns it (``rank=None``: left as ``SavedRows`` for ``read_rows``). Reads only what it
    returns; no collective (every rank of a run may call it on its own)."""
    path = str(path)
    md = read_metadata(path)
    layout = (md.planner_data or {}).get(LAYOUT) or {"keys": [], "world": 1}
    rows = [k for k in layout["keys"] if k in md.state_dict_metadata]
    state: dict = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata) and fqn not in rows:
            state[fqn] = torch.empty(m.size, dtype=m.properties.dtype)
        elif fqn == SKELETON:
            state[fqn] = None
    if rank is not None:
        for fqn in rows:
            m = md.state_dict_metadata[fqn]
            state[fqn] = torch.empty((shard_rows(m.size[0], rank, world), *m.size[1:]), dtype=m.properties.dtype)
    _load(state, path, RowLoadPlanner(rows if rank is not None else [], rank or 0, world))
    if rank is None:
        for fqn in rows:
            m = md.state_dict_metadata[fqn]
            state[fqn] = SavedRows(path, fqn, tuple(m.size), m.properties.dtype)
    skeleton = state.pop(SKELETON)
    ckpt = unflatten(skeleton, state)
    ckpt[ROW_SHARDS] = {"world": layout["world"], "rows": layout.get("rows"), "keys": rows}
    return ckpt


def read_rows(saved: SavedRows, rank: int, world: int) -> Tensor:
    """Rank ``rank`` of ``world``'s rows (``id % world == rank``) of a saved row-sharded tensor."""
    dest = torch.empty((shard_rows(saved.shape[0], rank, world), *saved.shape[1:]), dtype=saved.dtype)
    _load({saved.fqn: dest}, saved.path, RowLoadPlanner([saved.fqn], rank, world))
    return dest
