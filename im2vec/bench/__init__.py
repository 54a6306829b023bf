"""Benchmarks: python -m im2vec.bench (the tag head), python -m im2vec.bench.loader (the data loader),
python -m im2vec.bench.scoring (evaluation's full-vocabulary pass)."""
