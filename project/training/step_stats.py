"""One device-to-host sync per logging interval: the training loop's numbers kept on the device, read together.

Reading a device value on the host (`.item()`, `float(t)`, `if t:`, and on a GPU even `torch.tensor(x,
device="cuda")`) makes the CPU wait until the device has finished everything queued so far. Done every step (the
training loss for the progress bar, the NaN guard's verdict, a clock for tokens/s) the GPU idles while Python
prepares the next step. So during an interval nothing is read: the loss is summed on the device, the NaN guard
keeps its counters there, and `StepStats` reads everything at once every `log_every_n_steps` optimizer steps,
summed over the ranks in one all-reduce and moved to the host in one `.tolist()`: the only sync of the
training loop (Lightning itself adds one per step with more than one process, its SIGTERM check, which it
offers no way to turn off).

`IntervalCallback` is what a callback subclasses to take part: it names its device tensors
(`interval_tensors`) and gets their values, summed over ranks, with the interval's wall time (`on_interval`);
the metrics it returns go to the loggers (rank 0) and to the progress bar. The CLI adds `StepStats` to every run.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

TRAIN_LOSS = "train/loss"


class IntervalCallback(Callback):
    """A callback that reads device values once per logging interval, through `StepStats`'s one sync."""

    def interval_tensors(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """Scalars on the module's device to read at the end of this interval (summed over ranks)."""
        return {}

    def on_interval(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float],
                    seconds: float) -> dict[str, float]:
        """Called on every rank with every callback's values (summed over ranks) and the interval's wall time in
        seconds (measured after the sync, so it covers the device's work); returns metrics to log."""
        return {}


class StepStats(Callback):
    """Reads the training loop's device values once per logging interval and logs them (see the module docstring).

    Logs `train/loss`, the mean training loss of the interval's optimizer steps over every rank, plus what the
    `IntervalCallback`s return (tokens/s, MFU). `metrics` keeps the latest values for the progress bar.
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.steps = 0  # optimizer steps since the last reading
        self.seen_step = 0
        self.read_at = 0.0
        self.validation_from = 0.0
        self.metrics: dict[str, float] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.loss_sum, self.steps, self.seen_step, self.metrics = None, 0, trainer.global_step, {}
        self.read_at = time.perf_counter()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validation_from = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The interval's clock leaves out validation time (tokens/s counts training tokens)."""
        self.read_at += time.perf_counter() - self.validation_from

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # divided by accumulate_grad_batches: the micro-batches add up to the step's
            loss = loss.detach().float()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        if trainer.global_step == self.seen_step:
            return  # accumulating gradients: no optimizer step in this batch
        self.steps += trainer.global_step - self.seen_step
        self.seen_step = trainer.global_step
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self.read(trainer, pl_module)

    def read(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The interval's one sync: every value summed over ranks, then handed to the interval callbacks."""
        listeners = [cb for cb in trainer.callbacks if isinstance(cb, IntervalCallback)]
        device = pl_module.device
        tensors = {TRAIN_LOSS: self.loss_sum if self.loss_sum is not None else torch.zeros((), device=device)}
        for callback in listeners:
            tensors.update(callback.interval_tensors(trainer, pl_module))
        stacked = torch.stack([t.to(dtype=torch.float32) for t in tensors.values()])
        values = dict(zip(tensors, trainer.strategy.reduce(stacked, reduce_op="sum").tolist()))  # the sync
        now = time.perf_counter()
        seconds, self.read_at = now - self.read_at, now
        metrics = {TRAIN_LOSS: values[TRAIN_LOSS] / (max(1, self.steps) * trainer.world_size)}
        self.loss_sum, self.steps = None, 0
        for callback in listeners:
            metrics.update(callback.on_interval(trainer, pl_module, values, seconds))
        self.metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def step_stats(trainer: Trainer) -> StepStats | None:
    """The trainer's StepStats callback, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, StepStats)), None)
