"""Evaluation: the tagging score and its top k (``scoring``), ranking and retrieval figures (``ranking``,
``metrics``), bootstrap intervals over uploaders (``intervals``), validation during training
(``validation``), a trained model's held-out figures (``heldout``) and the zero-shot figures (``zeroshot``)."""
