"""One checkpoint file from a checkpoint folder, for sharing:

    python -m im2vec.export outputs/train/<time>/checkpoints/last.ckpt model.ckpt

A sharded run (``trainer=ddp``) saves a DCP folder that every rank wrote its own rows of; ``evaluate.py``,
``Tagger``, ``serve`` and a resumed run read it as it is. This writes the same contents as one file, as a
one-device run writes it (the table's rows in id order, the table optimizer's state whole): read once into
memory, then streamed to ``<out>.tmp-<pid>`` by ``torch.save`` (no second copy), fsynced and renamed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from im2vec.errors import UserError, one_line
from im2vec.train.checkpoint import read_checkpoint
from im2vec.train.resilience import fsync_replace


def export(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write checkpoint ``src`` (a folder or a file) as the one file ``out``."""
    ckpt = read_checkpoint(src)  # the whole state, once
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(ckpt, tmp)  # streamed tensor by tensor
        fsync_replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m im2vec.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (or file) written by train.py")
    p.add_argument("out", help="the one-file checkpoint to write")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except UserError as e:
        print(f"im2vec.export: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"im2vec.export: {args.checkpoint} -> {out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
