"""The wide part: the tag table (V rows, host memory, fp32; ``tag_table``, ``sharded_table`` across ranks),
its sparse optimizers (``sparse_optim``), the samplers of positives and negatives (``sampler``), the losses
(``loss``), the heads that put them together (``head``, ``pipeline``) and tag vectors from word vectors
(``wordvec``, ``tag_vectors``).

Knows nothing of data loading, the trunk or training: it takes image vectors and tag ids."""
