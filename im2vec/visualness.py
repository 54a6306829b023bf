"""Which tags a picture can show: rank every tag by how much better a trained model finds it among held-out
images than the frequency prior does (per-tag retrieval AP against the prior's, with a bootstrap bound):

    python -m im2vec.visualness outputs/train/<time>/checkpoints/last.ckpt [SHARDS...] --out visual_tags.tsv

Without shards, the checkpoint's own held-out images (its test split, else its validation split). Where the
data knows which tags describe the picture (the built-in corpus), or ``--truth FILE`` names them, precision
and recall of "visual" against that truth are printed. The logic is im2vec/use/visualness.py.
"""

from __future__ import annotations

import argparse
import sys

from im2vec.errors import UserError, one_line
from im2vec.use.visualness import ALPHA, BY, MIN_IMAGES, RESAMPLES, from_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m im2vec.visualness", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("shards", nargs="*", help="held-out shards (globs or brace patterns); default: the checkpoint's own")
    p.add_argument("--out", default="visual_tags.tsv", help="the TSV to write (default: %(default)s)")
    p.add_argument("--min-images", type=int, default=MIN_IMAGES,
                   help="tags with fewer held-out images are listed with visual = NA (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="visual when the lower bound of AP_model − AP_prior is above it (default: %(default)s)")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="the lower bound's quantile (default: %(default)s)")
    p.add_argument("--by", choices=BY, default="images", help="what the bootstrap resamples: single images, or "
                   "uploaders with all their images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", default=None, help="a file of the tags that describe the picture, one a line: prints "
                   "precision and recall of 'visual' against it (default: the data's own, where it knows them)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensorboard", default="auto", help="a folder for TensorBoard (counts, histograms of the bounds, "
                   "the top and bottom tags); auto: RUN/tensorboard/visualness beside the checkpoint's folder, where "
                   "the run has one; none: no TensorBoard (default: %(default)s)")
    a = p.parse_args(argv)
    if a.min_images < 1 or a.resamples < 1 or not 0 < a.alpha < 1:
        p.error("--min-images and --resamples must be ≥ 1, --alpha in (0, 1)")
    try:
        from_checkpoint(a.checkpoint, a.shards, a.out, a.min_images, a.threshold, a.resamples, a.alpha, a.seed,
                        a.truth, a.max_images, a.batch_size, a.num_workers, a.device, a.by,
                        tensorboard=None if a.tensorboard == "none" else a.tensorboard)
    except UserError as e:
        print(f"im2vec.visualness: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
