"""Using a trained model: tag images and search them by tag (``predict``: ``Tagger`` and its command) and
the web demo (``serve``)."""
