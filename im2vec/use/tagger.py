"""``Tagger``: a trained checkpoint at work in Python — tag images, embed them, find similar tags, search images by
tag (the command line over it is im2vec/use/predict.py, whose docstring gives the scores).

A file of ``python -m im2vec.visualness`` (``use_visual_tags``) hides the tags it marks 0 (non-visual): they are
never returned, and the next tags fill the k places. ``use_user_prior`` adds each uploader's own habits.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from im2vec.data.samples import eval_view, normalize, to_uint8_tensor
from im2vec.data.visual_file import nonvisual_tags
from im2vec.data.yfcc import normalize_tag
from im2vec.errors import BadValue, UserError
from im2vec.eval.scoring import topk_tags
from im2vec.train.checkpoint import TrainedModel, load_model
from im2vec.use.image_files import read_image
from im2vec.wide.tag_vectors import mapped_vectors
from im2vec.wide.wordvec import read_vectors

# a hidden tag's shared term: finite (the ranking refuses ±inf), far below any real score, and far enough above
# float32's lowest that adding a score to it does not overflow
HIDDEN = -torch.finfo(torch.float32).max / 4

ImageInput = Tensor | Sequence["str | os.PathLike | Image.Image"] | str | os.PathLike | Image.Image


class UnknownTag(UserError, KeyError):
    """A tag that is not in the checkpoint's vocabulary."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def center_resize(x: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) float -> (B, 3, size, size): the central square, resized (eval_view for tensors)."""
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Tagger:
    """A trained model for inference. The encoder runs on ``device``; the tag table stays on the CPU
    (it can be far larger than the trunk) and is scored in chunks of ``chunk`` tags."""

    chunk = 65536  # tags scored per matrix product when tagging

    def __init__(self, model: TrainedModel, device: str | torch.device = "cpu", image_size: int | None = None):
        """``image_size``: the side images are resized to; by default the one the checkpoint was
        trained on (older checkpoints did not record it: then it must be given)."""
        image_size = image_size or model.image_size
        if not image_size:
            raise BadValue(f"{model.path} does not record the image size it was trained on",
                           "give it: Tagger.from_checkpoint(..., image_size=S), or --image-size S")
        self.device = torch.device(device)
        self.encoder = model.encoder.to(self.device).eval()
        self.table, self.log_counts = model.table, model.log_counts  # (V, d), (V,) on the CPU
        self.tags, self.gamma, self.image_size = model.tags, model.gamma, int(image_size)
        self.fingerprint, self.path = model.fingerprint, model.path
        self.rows = model.index  # tag -> row; built once (TrainedModel.index builds a new dict per call)
        self.tag_map = model.tag_map  # model.tag_vectors: A, for tags outside the vocabulary (vocabulary=)
        self._vocabulary: tuple | None = None  # the last extended vocabulary's vectors, reused
        self.user_prior, self.user_lam = None, 0.0  # use_user_prior: each uploader's own habits
        self.user_prior_path: str | None = None
        self.nonvisual: frozenset[str] = frozenset()  # use_visual_tags: the tags never returned by tag()
        self._hidden: Tensor | None = None  # (V,) bool: the vocabulary's rows of those tags; None: none hidden
        self.visual_path: str | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        image_size: int | None = None) -> Tagger:
        return cls(load_model(path), device, image_size)

    def __repr__(self) -> str:
        return (f"Tagger({self.path}: {len(self.tags):,} tags, d={self.dim}, γ={self.gamma:g}, "
                f"{self.image_size}px images, {self.device})")

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    # ---- images -> vectors
    def embed(self, images: ImageInput, batch_size: int = 64) -> Tensor:
        """Image vectors u, (N, d) float32 on the CPU.

        ``images``: PIL images or file paths (a bad file raises ``BadImage``), or a tensor
        (N, 3, H, W): uint8 raw pixels, or float already normalized (``data.normalize``); a tensor
        that is not image_size square is center-cropped and resized. A PIL image that is not yet
        loaded is decoded at full size (no ``draft``: the caller's object is left as it was)."""
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"embed: expected an image tensor (N, 3, H, W), got {tuple(images.shape)}")
            batches: Iterable[Tensor] = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        else:
            items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
            batches = (torch.stack([self._pixels(x) for x in items[i : i + batch_size]])
                       for i in range(0, len(items), batch_size))
        out = [self._encode(b) for b in batches]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def _pixels(self, item: str | os.PathLike | Image.Image) -> Tensor:
        if isinstance(item, Image.Image):
            return to_uint8_tensor(eval_view(item, self.image_size, draft=False))  # (3, S, S) uint8
        return read_image(item, self.image_size)

    @torch.no_grad()
    def _encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels or normalized floats -> (B, d) float32 on the CPU."""
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise ValueError(f"embed: image tensors are uint8 pixels or normalized floats, not {x.dtype}")
        pixels = x.dtype == torch.uint8
        x = x.to(self.device)  # uint8 crosses the bus as a quarter of the bytes
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = center_resize(x.float(), self.image_size)  # (B, 3, S, S), still 0..255 pixels if they were
        x = normalize(x) if pixels else x.float()  # as the training module normalizes its batches
        return self.encoder(x).float().cpu()  # (B, d)

    # ---- vectors -> tags, tag -> tags, tag -> images
    def tag(self, images: ImageInput, k: int = 5, gamma: float | None = None, batch_size: int = 64,
            vocabulary: Sequence[str] | None = None, word_vectors: str | None = None,
            user: str | None = None, hide: bool = True) -> list[list[tuple[str, float]]]:
        """The k best tags of every image, by s(t|x) = v_t·u + γ·log count(t), best first; ``user`` (the images'
        uploader) adds λ·b(user, t) of the prior ``use_user_prior`` loaded (im2vec/eval/user_prior.py). With
        ``hide`` (default), tags a ``use_visual_tags`` file marks non-visual are skipped: k visible tags come back
        (fewer only where fewer are left).

        ``vocabulary``: rank these tags instead of the checkpoint's (see ``vocabulary_vectors``): tags it was
        trained on, and, for a checkpoint trained with model.tag_vectors, any word of a word-vector file
        (``word_vectors``, default: the file it was trained with) — tags never seen with an image."""
        return self.tag_vectors(self.embed(images, batch_size), k, gamma, vocabulary, word_vectors, user, hide)

    def use_user_prior(self, path: str | os.PathLike | None = None, lam: float | None = None) -> None:
        """Load a per-uploader prior (default: user_prior.pt beside the checkpoint) with its λ (default: the one
        ``python -m im2vec.bench.user_prior`` chose on validation and recorded; 0 where it did not help)."""
        from im2vec.eval.user_prior import UserPrior

        path = path or Path(self.path).with_name("user_prior.pt")
        try:
            prior = UserPrior.load(path)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # not a torch file, or one that pickles code
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise BadValue(f"user prior: {path} cannot be read as a user prior ({why})",
                           "build it: python -m im2vec.eval.user_prior build CKPT") from None
        if prior.fingerprint and prior.fingerprint != self.fingerprint or prior.num_tags != len(self.tags):
            raise BadValue(f"user prior: {path} was counted in another vocabulary", "build it for this checkpoint")
        self.user_prior, self.user_lam = prior, float(prior.lam or 0.0) if lam is None else float(lam)
        self.user_prior_path = str(path)

    def knows_user(self, user: str | None) -> bool:
        """Whether ``user`` has images in the loaded prior's training counts (else b = 0: the plain score)."""
        return user is not None and self.user_prior is not None and self.user_prior.row(user) is not None

    def use_visual_tags(self, path: str | os.PathLike | None) -> None:
        """Hide the tags that a file of ``python -m im2vec.visualness`` marks non-visual (visual = 0): ``tag`` never
        returns them. Tags marked 1 or NA (not tested) are kept, and so are tags the file does not list. None:
        hide nothing again. A file that shares no tag with this checkpoint's vocabulary is refused."""
        if path is None:
            self.nonvisual, self._hidden, self.visual_path = frozenset(), None, None
            return
        nonvisual = nonvisual_tags(path)
        rows = [self.rows[t] for t in nonvisual if t in self.rows]
        if nonvisual and not rows:
            raise BadValue(f"visual tags: no tag of {path} is in {self.path}'s vocabulary",
                           "write the file from this checkpoint: python -m im2vec.visualness CKPT --out FILE")
        hidden = torch.zeros(len(self.tags), dtype=torch.bool)
        hidden[rows] = True
        self.nonvisual, self._hidden, self.visual_path = frozenset(nonvisual), hidden, str(path)

    @property
    def num_hidden(self) -> int:
        """How many of the vocabulary's tags ``use_visual_tags`` hides."""
        return 0 if self._hidden is None else int(self._hidden.sum())

    def _terms(self, gamma: float | None, vocabulary: Sequence[str] | None, word_vectors: str | None,
               user: str | None, hide: bool) -> tuple[list[str], Tensor, Tensor, float, Tensor | None]:
        """(tag names, their vectors (n, d), the term every image shares (n,), its weight, hidden (n,) bool or
        None) of the score s = v·u + weight·term; the hidden tags' term is HIDDEN, the others' exactly as without
        hiding."""
        g = self.gamma if gamma is None else float(gamma)
        names, table, log_counts = self.tags, self.table, self.log_counts
        if vocabulary is not None:
            names, table, log_counts = self.vocabulary_vectors(vocabulary, word_vectors)
        prior, lam = self.user_prior, self.user_lam
        if user is not None and prior is None:
            raise BadValue("tag: user= needs a user prior", "call use_user_prior() first (predict: --user-prior)")
        term = log_counts
        if lam != 0 and vocabulary is None and self.knows_user(user):  # an unknown user: b = 0, the plain scores
            term, g = g * log_counts + lam * prior.term(user), 1.0  # s = v·u + 1·(γ·log count + λ·b)
        hidden = None
        if hide and self.nonvisual:
            hidden = self._hidden if vocabulary is None else torch.tensor([t in self.nonvisual for t in names])
            term, g = torch.where(hidden, HIDDEN, g * term), 1.0  # 1.0·x is x: the kept tags' scores do not move
        return names, table, term, g, hidden

    def tag_vectors(self, u: Tensor, k: int = 5, gamma: float | None = None, vocabulary: Sequence[str] | None = None,
                    word_vectors: str | None = None, user: str | None = None,
                    hide: bool = True) -> list[list[tuple[str, float]]]:
        """``tag`` for image vectors already computed: u (N, d)."""
        names, table, term, g, hidden = self._terms(gamma, vocabulary, word_vectors, user, hide)
        if hidden is not None:
            k = min(k, len(names) - int(hidden.sum()))  # the hidden tags are last: never reached
        if k < 1:
            return [[] for _ in range(len(u))]
        scores, ids = topk_tags(u, table, term, [g], k, self.chunk)[g]  # (N, k) x2
        return [[(names[i], s) for i, s in zip(row_ids, row_scores)]
                for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]

    def hidden_above(self, u: Tensor, floors: Sequence[float], gamma: float | None = None,
                     vocabulary: Sequence[str] | None = None, word_vectors: str | None = None,
                     user: str | None = None) -> list[int]:
        """Per image (u (N, d)), how many hidden tags score above ``floors[i]`` (the last tag ``tag_vectors``
        returned for it): the tags hiding skipped to fill its k places. 0 where nothing is hidden."""
        names, table, term, g, _ = self._terms(gamma, vocabulary, word_vectors, user, hide=False)
        hidden = self._hidden if vocabulary is None else torch.tensor([t in self.nonvisual for t in names])
        if not self.nonvisual or not bool(hidden.any()):
            return [0] * len(u)
        rows = hidden.nonzero().squeeze(1)  # (H,)
        floor = torch.tensor([float(f) for f in floors])  # (N,)
        counts = torch.zeros(len(u), dtype=torch.long)
        for start in range(0, len(rows), self.chunk):  # the hidden rows a chunk at a time: no (H, d) copy at once
            r = rows[start : start + self.chunk]
            s = u.float() @ table[r].float().t() + g * term[r]  # (N, h)
            counts += (s > floor[:, None]).sum(1)
        return counts.tolist()

    def vocabulary_vectors(self, vocabulary: Sequence[str], word_vectors: str | None = None
                           ) -> tuple[list[str], Tensor, Tensor]:
        """(tags, vectors (n, d), log counts (n,)) of an open vocabulary. A tag of the checkpoint keeps its
        vector and count; another one gets A·w from the word-vector file and the smallest log count of the
        vocabulary (it was never counted: rarer than any trained tag). A tag in neither is an UnknownTag.
        The vectors of the last vocabulary asked for are kept (the file is read once per vocabulary)."""
        key = (tuple(vocabulary), word_vectors)  # as given: the folder command asks again for every batch
        if self._vocabulary is not None and self._vocabulary[0] == key:
            return self._vocabulary[1]
        names = list(dict.fromkeys(t for t in (normalize_tag(str(w)) for w in vocabulary) if t))
        if not names:
            raise BadValue("vocabulary: no tag given", "give a list of tags")
        new = [t for t in names if t not in self.rows]
        vectors: dict[str, Tensor] = {}
        if new:
            if self.tag_map is None:
                raise UnknownTag(f"{len(new)} tag(s) not in this checkpoint's vocabulary ({', '.join(new[:5])}) and "
                                 "it has no word vectors to place them: train with model.tag_vectors=PATH")
            path = word_vectors or self.tag_map.path
            wv = read_vectors(path, new)
            if wv.missing:
                raise UnknownTag(f"{len(wv.missing)} tag(s) neither in this checkpoint's vocabulary nor in {path}: "
                                 f"{', '.join(wv.missing[:5])}")
            mapped = mapped_vectors(self.tag_map.proj.weight.detach(), wv.vectors)
            vectors = {new[i]: mapped[j] for j, i in enumerate(wv.rows.tolist())}
        floor = self.log_counts.min()
        table = torch.stack([vectors[t] if t in vectors else self.table[self.rows[t]] for t in names])
        log_counts = torch.stack([floor if t in vectors else self.log_counts[self.rows[t]] for t in names])
        self._vocabulary = (key, (names, table.float(), log_counts.float()))
        return self._vocabulary[1]

    def row(self, tag: str) -> int:
        try:
            return self.rows[tag]
        except KeyError:
            raise UnknownTag(f"unknown tag {tag!r}: not in this checkpoint's vocabulary "
                             f"({len(self.tags):,} tags)") from None

    @functools.cached_property
    def _norms(self) -> Tensor:
        return self.table.norm(dim=1)  # (V,)

    def similar_tags(self, tag: str, k: int = 10) -> list[tuple[str, float]]:
        """The k tags whose vectors are closest to ``tag``'s by cosine, the tag itself left out."""
        i = self.row(tag)
        v = self.table[i]  # (d,)
        cos = (self.table @ v) / (self._norms * v.norm()).clamp_min(1e-12)  # (V,): one vector, no V×V matrix
        cos[i] = -torch.inf
        top = torch.topk(cos, min(k, len(self.tags) - 1))
        return [(self.tags[j], s) for j, s in zip(top.indices.tolist(), top.values.tolist())]

    def search(self, vectors: Tensor, tag: str, k: int = 10) -> list[tuple[int, float]]:
        """The k image vectors (rows of ``vectors``, (N, d)) that score highest for ``tag`` by v_t·u,
        as (row, score), best first. γ·log count(t) is the same for every image: it is left out."""
        v = self.table[self.row(tag)]  # (d,)
        scores = vectors.float().cpu() @ v  # (N,)
        top = torch.topk(scores, min(k, scores.numel()))
        return list(zip(top.indices.tolist(), top.values.tolist()))

    @functools.cached_property
    def weights_digest(self) -> str:
        """A hash of the encoder's weights and the tag table. The checkpoint's fingerprint is the
        vocabulary's, the same for every checkpoint of a run (last.ckpt is rewritten every epoch):
        an index must also match the weights its vectors came from."""
        h = hashlib.sha256()
        tensors = [*sorted(self.encoder.state_dict().items()), ("table", self.table), ("log_counts", self.log_counts)]
        for name, t in tensors:
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
            h.update(t.view(torch.uint8).numpy())
        return h.hexdigest()[:16]
