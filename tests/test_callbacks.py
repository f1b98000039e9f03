"""Callbacks on tiny models: what the training progress bar shows, and how often the training loop waits for the
device (project/training/step_stats.py)."""

import inspect

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, IterableDataset

from project.model import GPTConfig
from project.training.interrupt import GracefulInterrupt
from project.training.module import GPTModule
from project.training.monitoring import LearningRates, StepProgressBar, TokenThroughput
from project.training.nan_guard import NonFiniteLossGuard
from project.training.step_stats import TRAIN_LOSS, StepStats


def test_step_bound_bar_shows_steps_of_max_steps_loss_and_tokens_per_second(tmp_path):
    bar, stats = StepProgressBar(), StepStats()
    trainer = Trainer(max_steps=7, limit_val_batches=0, callbacks=[bar, stats, TokenThroughput(peak_flops=1e12)],
                      logger=CSVLogger(tmp_path), log_every_n_steps=2, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    shown = bar.train_progress_bar
    assert (shown.n, shown.total) == (7, 7)  # BoringModel's epoch has 64 batches: Lightning would show n/64
    assert shown.desc.startswith("Training steps")
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert "v_num" not in metrics
    assert float(metrics["loss"]) == round(stats.metrics[TRAIN_LOSS], 3)  # the latest interval's, from StepStats
    assert float(metrics["tok/s"].replace(",", "")) > 0  # measured by TokenThroughput, shown by the bar


def test_epoch_bound_bar_is_lightnings():
    bar = StepProgressBar()
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[bar], logger=False,
                      enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(BoringModel())
    assert bar.train_progress_bar.total == 3 and bar.train_progress_bar.desc.startswith("Epoch 0")
    assert "tok/s" not in bar.get_metrics(trainer, trainer.lightning_module)


# what makes the host wait for the device: reading a value, or converting a tensor to Python or numpy
HOST_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__", "__format__",
              "cpu"}


class HostReads(TorchFunctionMode):
    """Counts device-to-host reads while `counting`, except the optimizer's own reads of its step counter (a CPU
    tensor unless the optimizer is fused or capturable, where nothing is read)."""

    def __init__(self) -> None:
        super().__init__()
        self.counting, self.reads = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.counting and name in HOST_READS:
            frames = [f"{f.filename}:{f.function}" for f in inspect.stack()[1:8]]
            if not any("torch/optim/" in frame for frame in frames):
                self.reads.append((name, frames[0]))
        return func(*args, **(kwargs or {}))


class CountDuringTraining(Callback):
    def __init__(self, counter: HostReads) -> None:
        self.counter = counter

    def on_train_batch_start(self, *args) -> None:
        self.counter.counting = True

    def on_train_end(self, *args) -> None:
        self.counter.counting = False


class RandomTokens(IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            tokens = torch.randint(0, 64, (4, 17), generator=generator)
            yield tokens[:, :-1], tokens[:, 1:]


def test_training_reads_the_device_once_per_logging_interval(tmp_path, monkeypatch):
    """20 steps, logging every 5 with the CLI's callbacks (progress bar, NaN guard, tokens/s, Ctrl-C, learning
    rates), gradient clipping and fused AdamW: the loop reads a device value 4 times, once per interval, where it
    used to read three per step (the guard's verdict, the bar's loss, the throughput clock)."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: counter.reads.append(("synchronize", "")))
    counter = HostReads()
    module = GPTModule(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    trainer = Trainer(accelerator="cpu", max_steps=20, log_every_n_steps=5, limit_val_batches=0, gradient_clip_val=1.0,
                      logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_model_summary=False,
                      callbacks=[StepStats(), StepProgressBar(refresh_rate=1), NonFiniteLossGuard(),
                                 TokenThroughput(peak_flops=1e12), GracefulInterrupt(),
                                 LearningRates(), CountDuringTraining(counter)])
    with counter:
        trainer.fit(module, DataLoader(RandomTokens(), batch_size=None))
    assert trainer.global_step == 20
    assert len(counter.reads) == 20 // 5, counter.reads
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in logged[0] and "train/tokens_per_sec" in logged[0] and "train/lr" in logged[0]


def test_step_bar_shows_the_last_validations_bits_per_byte(tmp_path, shakespeare_path):
    """After a validation the bar shows val/loss and val/bpb beside the training figures (GPTModule logs both
    with prog_bar), so a run's quality is on screen without TensorBoard."""
    from project.data.datamodule import TextDataModule

    dm = TextDataModule(path=str(shakespeare_path), data_dir=str(tmp_path / "data"), tokenizer="char", block_size=16,
                        batch_size=2, max_val_windows=2)
    module = GPTModule(GPTConfig(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    bar = StepProgressBar()
    trainer = Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1,
                      logger=False, enable_checkpointing=False, enable_model_summary=False,
                      callbacks=[StepStats(), bar])
    trainer.fit(module, datamodule=dm)
    metrics = bar.get_metrics(trainer, module)
    assert {"loss", "val/loss", "val/bpb"} <= set(metrics), metrics
    assert float(metrics["val/bpb"]) > 0
