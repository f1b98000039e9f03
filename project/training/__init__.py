"""Training with Lightning: the LightningModule, optimizers and schedule, callbacks (one concern per module) and
the sharding plan. Import from the modules themselves."""
