"""python -m im2vec.bench: the tag-head benchmark (im2vec.bench.head). The others:
python -m im2vec.bench.loader (the data loader) and python -m im2vec.bench.scoring (evaluation)."""

from im2vec.bench.head import main
from im2vec.errors import run_cli

run_cli(main)
