"""Training: the LightningModule, optimizers (parameter groups, sparse row-wise updates), metrics, callbacks."""
