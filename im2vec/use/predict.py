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
import json
import os
import pickle
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from im2vec.errors import ArgumentParser, BadValue, NotFound, positive_int, run_cli
from im2vec.train.checkpoint import load_model, unpickling_reason  # noqa: F401 (load_model: re-exported)
from im2vec.use.image_files import batched, find_images, read_images
from im2vec.use.tagger import ImageInput, Tagger, UnknownTag, center_resize  # noqa: F401 (the API, re-exported)

INDEX_FORMAT = "im2vec-index-1"


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
