"""Evaluation: the tagging score and its top k (``scoring``), ranking and retrieval figures (``ranking``,
``metrics``), bootstrap intervals over uploaders (``intervals``), validation during training
(``validation``) and the held-out figures (``evaluating``)."""
