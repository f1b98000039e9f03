"""Ctrl-C that stops every process at the same step, saves last.ckpt and exits, instead of hanging.

A terminal's Ctrl-C sends SIGINT to every process of the run, each of which would raise KeyboardInterrupt wherever
it happens to be: one rank inside a collective, another in its next step, a third in a checkpoint save, each
waiting for the others (and SIGINT to rank 0 alone left the others training on). Here SIGINT only sets a flag;
the flags of all ranks are summed at the next logging interval (`StepStats`'s one sync), where every rank stands
at the same step, and all of them stop there together: Lightning ends training normally, `LatestCheckpoint` saves
last.ckpt, and the command exits with status 130 and the step. A second Ctrl-C interrupts at once, as
Lightning does.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
from lightning.pytorch import LightningModule, Trainer

from project.training.step_stats import IntervalCallback

log = logging.getLogger(__name__)


class GracefulInterrupt(IntervalCallback):
    """Turn Ctrl-C (SIGINT) into a stop of every rank at the next logging interval (see the module docstring).

    `stopped_at` is the step where training stopped on a Ctrl-C, else None. The CLI adds it to every run.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self.previous = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.requested, self.stopped_at = False, None
        if stage == "fit" and threading.current_thread() is threading.main_thread():  # handlers: main thread only
            self.previous = signal.signal(signal.SIGINT, self.request_stop)

    def request_stop(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C: Lightning's own KeyboardInterrupt

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def interval_tensors(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        # a fill on the device, not a copy from the host (on a GPU a copy would wait for the device)
        return {"interrupt/requested": torch.full((), float(self.requested), device=pl_module.device)}

    def on_interval(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float],
                    seconds: float) -> dict[str, float]:
        if values.get("interrupt/requested", 0.0) > 0 and not trainer.should_stop:
            trainer.should_stop = True  # on every rank, at this same step
            self.stopped_at = trainer.global_step
            if trainer.is_global_zero:
                log.info("interrupted (Ctrl-C): stopping every process at step %d, saving last.ckpt",
                         trainer.global_step)
        return {}


def interrupted_step(trainer: Trainer | None) -> int | None:
    """The step where `trainer`'s fit stopped on a Ctrl-C (GracefulInterrupt), or None."""
    callbacks = getattr(trainer, "callbacks", None) or []
    return next((cb.stopped_at for cb in callbacks if isinstance(cb, GracefulInterrupt)), None)
