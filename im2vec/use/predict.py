"""A trained checkpoint at work: tag images, embed them, find similar tags, search images by tag.

The Python API is ``Tagger``; the command line is

    python -m im2vec.use.predict tag    CKPT FOLDER --out tags.jsonl [--k 5] [--gamma G] [--vocabulary tags.txt]
                                       [--user NAME [--user-prior user_prior.pt]] [--visual-tags visual_tags.tsv]
    python -m im2vec.use.predict index  CKPT FOLDER --out index.pt
    python -m im2vec.use.predict search CKPT index.pt TAG [--k 10]

The scores are those of shared/DESIGN.md ("The model in one equation"):
    tagging    s(t|x) = v_t·u + γ·log count(t)   (γ: the checkpoint's, unless given)
    retrieval  v_t·u for a fixed tag t            (γ adds the same constant to every image)
    similarity cos(v_s, v_t)

A file of ``python -m im2vec.visualness`` (``use_visual_tags``, ``--visual-tags``) hides the tags it marks 0
(non-visual): they are never returned, and the next tags fill the k places.

Images go through the evaluation preprocessing (``data.eval_view`` at the checkpoint's image
size). Every file is loaded weights-only: a checkpoint or an index that pickles arbitrary
objects is refused, never run. In the folder commands an unreadable image is skipped and
counted, never fatal.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pickle
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from im2vec.data.samples import eval_view, normalize, to_uint8_tensor
from im2vec.data.yfcc import normalize_tag
from im2vec.errors import ArgumentParser, BadValue, NotFound, UserError, positive_int, run_cli
from im2vec.eval.scoring import topk_tags
from im2vec.train.checkpoint import TrainedModel, load_model, unpickling_reason
from im2vec.use.image_files import batched, find_images, read_image, read_images
from im2vec.wide.tag_vectors import mapped_vectors
from im2vec.wide.wordvec import read_vectors

INDEX_FORMAT = "im2vec-index-1"
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
        nonvisual = read_visual_tags(path)
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


def read_visual_tags(path: str | os.PathLike) -> list[str]:
    """The tags a file of ``python -m im2vec.visualness`` marks non-visual (visual = 0), in its order; read with
    that tool's own reader. Refused with one line when the file is missing or not such a file."""
    from im2vec.use.visualness import read_tsv

    fix = "write it with python -m im2vec.visualness CKPT --out visual_tags.tsv"
    if not Path(path).is_file():
        raise NotFound(f"visual tags: no file {path}", fix)
    try:
        rows = read_tsv(path)
    except (UnicodeDecodeError, IndexError):  # binary, or no line but comments
        raise BadValue(f"visual tags: {path} is not a tag visualness file (no tag/visual columns)", fix) from None
    if not rows or not {"tag", "visual"} <= rows[0].keys():
        raise BadValue(f"visual tags: {path} is not a tag visualness file (no tag/visual columns)", fix)
    bad = [r for r in rows if r.get("visual") not in ("0", "1", "NA")]
    if bad:
        raise BadValue(f"visual tags: {path}: {len(bad)} line(s) whose visual is not 1, 0 or NA (the first: tag "
                       f"{str(bad[0].get('tag'))[:40]!r}, visual {str(bad[0].get('visual'))[:20]!r})", fix)
    return [r["tag"] for r in rows if r["visual"] == "0"]


# ---- a folder of images through the Tagger (its stages: im2vec.use.image_files)
def embed_folder(tagger: Tagger, folder: Path, paths: list[Path], batch_size: int,
                 skipped: Counter) -> Iterator[tuple[list[str], Tensor]]:
    """(names relative to ``folder``, image vectors (B, d)) per batch of readable images."""
    for batch in batched(read_images(paths, tagger.image_size, skipped), batch_size):
        # at this point each item is (path, (3, S, S) uint8)
        names = [p.relative_to(folder).as_posix() for p, _ in batch]
        yield names, tagger.embed(torch.stack([x for _, x in batch]), batch_size)


def folder_summary(command: str, done: int, skipped: Counter, ignored: int, out: Path) -> str:
    why = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
    return (f"im2vec.use.predict {command}: {done} images -> {out}; {sum(skipped.values())} skipped"
            + (f" ({why})" if why else "") + f"; {ignored} other file{'s' * (ignored != 1)} (no image suffix) ignored")


# ---- the commands
def run_tag(args: argparse.Namespace) -> None:
    tagger = Tagger.from_checkpoint(args.checkpoint, args.device, args.image_size)
    folder, out = Path(args.folder), Path(args.out)
    paths, ignored = find_images(folder)
    skipped, done = Counter(), 0
    vocabulary = None
    if args.vocabulary:  # an open vocabulary: checked (and its new tags' vectors read) before any image
        if not Path(args.vocabulary).is_file():
            raise NotFound(f"--vocabulary: no file {args.vocabulary}", "give a file with one tag a line")
        vocabulary = Path(args.vocabulary).read_text(encoding="utf-8").splitlines()
        tagger.vocabulary_vectors(vocabulary, args.word_vectors)
    if args.user is not None:  # every image of the folder by this uploader
        tagger.use_user_prior(args.user_prior, args.user_lambda)
    if args.visual_tags:
        tagger.use_visual_tags(args.visual_tags)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for names, u in embed_folder(tagger, folder, paths, args.batch_size, skipped):
            for name, tags in zip(names, tagger.tag_vectors(u, args.k, args.gamma, vocabulary, args.word_vectors,
                                                            args.user)):
                f.write(json.dumps({"image": name, "tags": [[t, s] for t, s in tags]}) + "\n")
            done += len(names)
    print(folder_summary("tag", done, skipped, ignored, out), file=sys.stderr)


def run_index(args: argparse.Namespace) -> None:
    tagger = Tagger.from_checkpoint(args.checkpoint, args.device, args.image_size)
    folder, out = Path(args.folder), Path(args.out)
    paths, ignored = find_images(folder)
    skipped, names, vectors = Counter(), [], []
    for batch_names, u in embed_folder(tagger, folder, paths, args.batch_size, skipped):
        names += batch_names
        vectors.append(u)
    index = {  # plain containers only: the index loads weights-only
        "format": INDEX_FORMAT, "paths": names, "root": str(folder.resolve()),
        "vectors": torch.cat(vectors) if vectors else torch.zeros(0, tagger.dim),  # (N, d) float32
        "fingerprint": tagger.fingerprint, "weights": tagger.weights_digest,
        "checkpoint": str(Path(args.checkpoint).resolve()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(index, tmp)
    os.replace(tmp, out)  # a reader never sees half an index
    print(folder_summary("index", len(names), skipped, ignored, out), file=sys.stderr)


def load_index(path: str | os.PathLike, tagger: Tagger) -> dict:
    """An index written by ``index``, refused unless it was built with ``tagger``'s checkpoint."""
    try:
        index = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadValue(f"{path}: refused by weights-only loading: {unpickling_reason(e)}",
                       "give an index written by `python -m im2vec.use.predict index`") from None
    except (RuntimeError, EOFError) as e:
        raise BadValue(f"{path}: cannot be read as an index ({str(e).strip()[:200]})",
                       "give an index written by `python -m im2vec.use.predict index`") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise BadValue(f"{path}: not an im2vec index", "write one with `python -m im2vec.use.predict index`")
    rebuild = "rebuild it with `python -m im2vec.use.predict index` and this checkpoint"
    if index["fingerprint"] != tagger.fingerprint:
        raise BadValue(f"{path} was built from a checkpoint with another vocabulary (fingerprint "
                       f"{index['fingerprint']}, {tagger.path} has {tagger.fingerprint})", rebuild)
    if index["weights"] != tagger.weights_digest:
        raise BadValue(f"{path} was built from other weights than {tagger.path} (same vocabulary, another "
                       f"training state, e.g. an older last.ckpt; index built from {index['checkpoint']})", rebuild)
    return index


def run_search(args: argparse.Namespace) -> None:
    tagger = Tagger.from_checkpoint(args.checkpoint, args.device, args.image_size)
    tagger.row(args.tag)  # an unknown tag fails before the index is read
    index = load_index(args.index, tagger)
    for i, score in tagger.search(index["vectors"], args.tag, args.k):
        print(f"{index['paths'][i]}\t{score:.6f}")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m im2vec.use.predict", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("checkpoint", help="a training checkpoint (e.g. outputs/.../checkpoints/last.ckpt)")
        c.add_argument("--device", default="cpu", help="where the encoder runs (cpu, cuda, cuda:1, ...)")
        c.add_argument("--image-size", type=positive_int, default=None,
                       help="resize images to this side (default: the size the checkpoint was trained on)")
        c.set_defaults(run=run)
        return c

    t = command("tag", run_tag, "tag every image under a folder: one JSON line per image")
    t.add_argument("folder")
    t.add_argument("--out", required=True, help="the JSONL file to write")
    t.add_argument("--k", type=positive_int, default=5, help="tags per image")
    t.add_argument("--gamma", type=float, default=None, help="γ of the tagging score (default: the checkpoint's)")
    t.add_argument("--batch-size", type=positive_int, default=64)
    t.add_argument("--vocabulary", default=None, help="rank these tags (a file, one a line) instead of the "
                   "checkpoint's; tags it never saw need a checkpoint trained with model.tag_vectors")
    t.add_argument("--word-vectors", default=None, help="where --vocabulary's new tags' vectors are (default: "
                   "the file the checkpoint was trained with)")
    t.add_argument("--user", default=None, help="the images' uploader: add λ·b(user, t), their own tag habits")
    t.add_argument("--user-prior", default=None, help="python -m im2vec.eval.user_prior build's file (default: "
                   "user_prior.pt beside the checkpoint)")
    t.add_argument("--user-lambda", type=float, default=None, help="λ (default: the file's, chosen on validation)")
    t.add_argument("--visual-tags", default=None, help="python -m im2vec.visualness's TSV: never output the tags it "
                   "marks 0 (non-visual); the next tags fill the k places")
    i = command("index", run_index, "embed every image under a folder into an index file for search")
    i.add_argument("folder")
    i.add_argument("--out", required=True, help="the index file to write (e.g. index.pt)")
    i.add_argument("--batch-size", type=positive_int, default=64)
    s = command("search", run_search, "print the images of an index that score highest for a tag")
    s.add_argument("index", help="an index written by `index` with the same checkpoint")
    s.add_argument("tag")
    s.add_argument("--k", type=positive_int, default=10, help="images to print")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; 0, or 2 after one line `im2vec: error: …` (a missing file, a refused checkpoint or
    index, an unknown tag); --debug shows the traceback instead."""
    return run_cli(_run, argv, exit=False)


def _run(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
