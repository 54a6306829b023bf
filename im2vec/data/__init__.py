"""The data stage: from YFCC100M's metadata or a folder of images to webdataset shards (``ingest``), the
vocabulary (``vocab``), and the loaders that stream, decode, crop and balance them into batches
(``loader``, ``datamodule``, ``memory``, ``gpu_decode``); ``corpus`` generates the embedded default data.

Knows nothing of the model: it yields images and padded tag ids."""
