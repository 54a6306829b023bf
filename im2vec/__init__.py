"""im2vec: teach a CNN to tag images from noisy, user-written tags (deep-and-wide negative sampling)."""

__version__ = "0.1.0"
