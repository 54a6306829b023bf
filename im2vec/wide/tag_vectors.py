"""Tag vectors from pretrained word vectors, and tags never seen with an image (zero-shot).

``model.tag_vectors=PATH`` (word2vec text or binary, GloVe text; read in one stream by
``im2vec.wide.wordvec``, keeping only the vocabulary's vectors) gives every tag t found in the file a
vector of its own, w_t, L2-normalized. Its tag vector is then

    v_t = r_t + A·w_t          (model.freeze_tag_vectors=false, the default)
    v_t = A·w_t                (model.freeze_tag_vectors=true: the row r_t is not used nor trained)

with r_t the tag table's row (as for every other tag; it starts near 0, at table_init_std) and A a
learned d_w → d map that lives beside the trunk (trained by the dense optimizer). A is shared by all
tags, so what it learns from the tags seen with images carries to the tags of the file that never
were: their vector is A·w (r = 0), and ``Tagger.tag(..., vocabulary=[...])`` ranks them. Synonyms
and translations sit close in word-vector space, so a held-out word is predicted through its
neighbours (the zero-shot protocol of Zhang et al. 2016, "Fast zero-shot image tagging").

Memory: the found vectors are kept once, in fp16, in host memory ((found tags) × d_w × 2 bytes: 360 MB
for 600k tags of 300-d vectors), with one int32 per tag saying where each tag's vector is. The
training step maps only the sampled rows' vectors (B·(P+K) × d_w) on the trunk's device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from im2vec.errors import BadValue
from im2vec.wide.wordvec import read_vectors


class _HostVectors(nn.Module):
    """The word vectors of the tags found in the file, in host memory: never moved, never cast (as the
    tag table: ``_apply`` ignores Lightning's moves)."""

    def __init__(self, num_tags: int, rows: Tensor, vectors: Tensor):
        super().__init__()
        slot = torch.full((num_tags,), -1, dtype=torch.int32)
        slot[rows] = torch.arange(len(rows), dtype=torch.int32)
        self.register_buffer("slot", slot)  # (V,): the tag's row in ``vectors``, or -1
        self.register_buffer("vectors", vectors.to(torch.float16).contiguous())  # (n, d_w), unit norm

    def _apply(self, fn, recurse=True):
        return self


class TagVectorMap(nn.Module):
    """v_t = r_t + A·w_t for the tags of the word-vector file (see the module docstring)."""

    def __init__(self, num_tags: int, dim: int, rows: Tensor, vectors: Tensor, freeze: bool = False,
                 init_std: float = 0.01, path: str = ""):
        super().__init__()
        if vectors.ndim != 2 or len(rows) != len(vectors):
            raise ValueError("TagVectorMap: rows (n,) and vectors (n, d_w)")
        self.store = _HostVectors(num_tags, rows, F.normalize(vectors.float(), dim=1))
        self.proj = nn.Linear(vectors.shape[1], dim, bias=False)  # A: on the trunk's device, dense optimizer
        nn.init.normal_(self.proj.weight, std=init_std)  # unit w: A·w starts at the scale of a table row
        self.freeze, self.path = bool(freeze), str(path)

    @classmethod
    def from_state(cls, state: dict[str, Tensor], num_tags: int, freeze: bool, path: str = "") -> TagVectorMap:
        """Rebuilt from a checkpoint's ``tag_map.*`` entries (keys without the prefix)."""
        slot, vectors, a = state["store.slot"], state["store.vectors"], state["proj.weight"]
        if slot.shape != (num_tags,) or a.shape[1] != vectors.shape[1]:
            raise ValueError(f"tag_map: {tuple(slot.shape)} slots for {num_tags} tags, A {tuple(a.shape)}")
        rows = torch.argsort(torch.where(slot >= 0, slot.long(), len(slot)))[: int((slot >= 0).sum())]
        m = cls(num_tags, a.shape[0], rows, vectors[slot[rows].long()].float(), freeze, path=path)
        m.store.vectors.copy_(vectors)  # bit for bit (already unit norm, fp16)
        m.proj.weight.data.copy_(a.float())
        return m

    @property
    def word_dim(self) -> int:
        return self.proj.in_features

    @property
    def found(self) -> int:
        return len(self.store.vectors)

    def words(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids (n,) on the CPU -> (w (n, d_w) fp32 with zeros where a tag has none, has (n,) bool)."""
        slot = self.store.slot[ids]
        has = slot >= 0
        w = torch.zeros(len(ids), self.word_dim)
        if bool(has.any()):
            w[has] = self.store.vectors[slot[has].long()].float()
        return w, has

    def forward(self, ids: Tensor, rows: Tensor) -> Tensor:
        """The tag vectors of ``ids`` (n,) on the CPU from their table rows (n, d) on the trunk's device."""
        w, has = self.words(ids.cpu())
        mapped = self.proj(w.to(rows.device, non_blocking=True).to(self.proj.weight.dtype))
        if self.freeze:  # the rows of tags with a word vector take no part (their gradient is 0)
            rows = rows * (~has).to(rows.device, rows.dtype).unsqueeze(1)
        return rows + mapped.to(rows.dtype)

    @torch.no_grad()
    def full(self, table: Tensor, chunk: int = 65536, ids: Tensor | None = None) -> Tensor:
        """The (V, d) tag vectors from the whole table (V, d) on the CPU, in chunks of rows; or, with ``ids``
        (n,), the vectors of those tags from their rows ``table`` (n, d) (a rank's shard)."""
        out = torch.empty_like(table)
        a = self.proj.weight.detach().float().cpu()  # (d, d_w)
        for i in range(0, len(table), chunk):
            w, has = self.words(torch.arange(i, min(i + chunk, len(table))) if ids is None else ids[i : i + chunk])
            rows = table[i : i + chunk].float()
            if self.freeze:
                rows = rows * (~has).unsqueeze(1)
            out[i : i + chunk] = rows + w @ a.t()
        return out


def read_tag_vectors(path: str, tags: list[str], dim: int, freeze: bool, init_std: float) -> TagVectorMap:
    """The TagVectorMap of a vocabulary from a word-vector file; says how many tags it found."""
    path = str(Path(path).expanduser().resolve())  # recorded in checkpoints: Tagger reads new words from it
    wv = read_vectors(path, tags)
    if not len(wv.rows):
        raise BadValue(f"model.tag_vectors={path}: not one of the {len(tags):,} tags is in the file "
                       f"({wv.read:,} vectors read)", "give word vectors in the tags' language(s)")
    print(f"im2vec: tag vectors: {len(wv.rows):,} of {len(tags):,} tags found in {path} ({wv.dim}-d, {wv.fmt}; "
          f"{wv.read:,} vectors read, {wv.skipped:,} lines skipped)"
          + ("; those tags' rows frozen at A·w" if freeze else ""))
    return TagVectorMap(len(tags), dim, wv.rows, wv.vectors, freeze, init_std, path)


def mapped_vectors(a: Tensor, vectors: Tensor) -> Tensor:
    """A·w for word vectors (n, d_w), normalized as in training -> (n, d) tag vectors."""
    return F.normalize(vectors.float(), dim=1) @ a.float().t()


def random_like(vectors: Tensor, seed: int = 0) -> Tensor:
    """Random unit vectors of the same shape: the control of a zero-shot evaluation (what A·w gives when
    w carries nothing about the word)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(vectors.shape, generator=g), dim=1)
