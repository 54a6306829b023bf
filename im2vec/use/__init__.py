"""Using a trained model: tag images and search them by tag (``predict``: ``Tagger`` and its command), the
web demo (``serve``) and evaluate.py's work on held-out shards (``evaluate``)."""
