"""Callbacks on a tiny Lightning demo model: what the training progress bar shows."""

from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from project.training.monitoring import StepProgressBar, TokenThroughput


class LoggingBoringModel(BoringModel):
    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"], prog_bar=True)
        return output


def test_step_bound_bar_shows_steps_of_max_steps_loss_and_tokens_per_second(tmp_path):
    bar = StepProgressBar()
    trainer = Trainer(max_steps=7, limit_val_batches=0, callbacks=[bar, TokenThroughput(peak_flops=1e12)],
                      logger=CSVLogger(tmp_path), log_every_n_steps=2, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(LoggingBoringModel())
    shown = bar.train_progress_bar
    assert (shown.n, shown.total) == (7, 7)  # BoringModel's epoch has 64 batches: Lightning would show n/64
    assert shown.desc.startswith("Training steps")
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert "v_num" not in metrics and "train/loss" in metrics
    assert float(metrics["tok/s"].replace(",", "")) > 0  # logged by TokenThroughput, shown by the bar


def test_epoch_bound_bar_is_lightnings():
    bar = StepProgressBar()
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[bar], logger=False,
                      enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(BoringModel())
    assert bar.train_progress_bar.total == 3 and bar.train_progress_bar.desc.startswith("Epoch 0")
    assert "tok/s" not in bar.get_metrics(trainer, trainer.lightning_module)
