"""The NaN guard: non-finite gradients never reach the weights; the run stops (or skips such steps) when they occur."""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer

from project.training.step_stats import TRAIN_LOSS, IntervalCallback

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The training loss or the gradients became NaN or infinite (raised by NonFiniteLossGuard)."""


class NonFiniteLossGuard(IntervalCallback):
    """Keep NaN and infinite gradients out of the weights, and stop the run (or skip such steps) when they occur.

    Every optimizer step, on the device and without a host sync: the global gradient norm (one reduction when the
    gradients are sharded; under DDP they are averaged already), which every rank computes alike; when it is not
    finite, that step's gradients are zeroed, so no NaN or infinity reaches the weights. The verdict is read once
    per logging interval through `StepStats`: with "stop" the run ends there with an error naming the first bad
    step, with "skip" it goes on, warning, until more than `max_skips` steps were skipped. A dropped step adds no
    gradient, but AdamW still applies its momentum and weight decay (and the LR schedule and step count advance),
    also in the steps between a bad one and the interval's end: finite unless the optimizer itself has diverged.
    A non-finite training loss with finite gradients is reported alike at the interval.

    Args:
        action: "stop" ends the run with an error naming the step; "skip" zeroes that step's gradients and warns.
        max_skips: with "skip", stop anyway after this many skipped steps (the run has diverged).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        self.action, self.max_skips = action, max_skips
        self.skipped = 0
        self.bad_steps: torch.Tensor | None = None  # device counters of this interval (identical on every rank)
        self.first_bad: torch.Tensor | None = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # Replicate already: no communication
        bad = ~torch.isfinite(norm)
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).masked_fill_(bad, 0.0)  # NaN * 0 stays NaN
        if self.bad_steps is None:
            self.bad_steps = torch.zeros((), dtype=torch.int32, device=norm.device)
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=norm.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), trainer.global_step, self.first_bad)
        self.bad_steps += bad

    def interval_tensors(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        if self.bad_steps is None:
            return {}
        return {"nan_guard/bad_steps": self.bad_steps, "nan_guard/first_bad": self.first_bad}

    def on_interval(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float],
                    seconds: float) -> dict[str, float]:
        ranks = trainer.world_size  # the counters are alike on every rank, and were summed over them
        bad = round(values.get("nan_guard/bad_steps", 0.0) / ranks)
        first = round(values.get("nan_guard/first_bad", -ranks) / ranks)
        self.bad_steps, self.first_bad = None, None
        if not bad and math.isfinite(values[TRAIN_LOSS]):
            return {}
        # a non-finite loss with finite gradients (an infinite loss can have them) counts as one bad step
        where = f"at step {first}" if bad else (f"in steps {trainer.global_step - trainer.log_every_n_steps}-"
                                                f"{trainer.global_step - 1}")
        bad = max(bad, 1)
        if self.action == "skip" and self.skipped + bad <= self.max_skips:
            self.skipped += bad
            if trainer.is_global_zero:
                log.warning("non-finite training loss %s: skipped %d step(s) (%d/%d skips allowed)", where, bad,
                            self.skipped, self.max_skips)
            return {}
        hint = ("lower --model.optimizer.learning_rate, raise --model.optimizer.warmup_steps or check the data; "
                "--nan_guard.action skip skips such steps")
        if self.action == "skip":
            hint = f"{self.skipped} steps were skipped already: lower --model.optimizer.learning_rate"
        raise NonFiniteLossError(f"non-finite training loss {where} (its gradients were dropped): {hint}")
