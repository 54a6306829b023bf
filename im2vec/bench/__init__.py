"""Benchmarks: python -m im2vec.bench.loader (the data loader)."""
