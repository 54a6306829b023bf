"""Training: the LightningModule (``module``), ``train(cfg)`` behind ``python train.py`` (``training``),
checkpoints (``checkpoint``, ``resilience``), thread settings (``threads``) and the frozen-trunk mode
(``features``). Puts the deep part, the wide part, the data and evaluation together."""
