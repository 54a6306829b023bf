"""Evaluate a trained im2vec checkpoint.

Not built yet: the full evaluation (tagging and retrieval over the whole vocabulary, baselines,
pictures) is its own issue. Until then, training itself writes the held-out figures
(precision@5 beside the frequency prior, the γ sweep) to ``<run dir>/metrics.json``.
"""

import sys

if __name__ == "__main__":
    sys.exit("evaluate.py is not implemented yet; the held-out figures of a run are in <run dir>/metrics.json")
