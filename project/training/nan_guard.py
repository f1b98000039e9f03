"""The NaN guard: stop (or skip the batch) when the training loss is NaN or infinite."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (raised by NonFiniteLossGuard)."""


class NonFiniteLossGuard(Callback):
    """Stop the run (or skip the batch) when the training loss is NaN or infinite.

    The check runs before the optimizer step, so with "stop" the weights (and last.ckpt) keep the last
    finite state, and with "skip" the batch changes nothing (its gradients are dropped; the LR schedule and
    the step counter still advance). Under several processes the decision is collective: a non-finite loss
    on any rank stops or skips on every rank. It costs one host sync of a scalar per optimizer step (and,
    with several ranks, an all-reduce of it).

    Args:
        action: "stop" ends the run with an error naming the step; "skip" drops that batch's update and warns.
        max_skips: with "skip", stop anyway after this many skipped batches (the run has diverged).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        self.action, self.max_skips = action, max_skips
        self.skipped = 0
        self.finite: torch.Tensor | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # no sync yet: read once per optimizer step below
        self.finite = finite if self.finite is None else self.finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        finite, self.finite = self.finite, None
        if finite is None:
            return
        # every rank takes the same decision: a rank skipping alone would let the replicas diverge, and a rank
        # stopping alone would leave the others waiting in their next collective. Count the ranks that saw one
        nonfinite_ranks = trainer.strategy.reduce((~finite).to(torch.float32), reduce_op="sum")
        if not nonfinite_ranks.item():  # the one host sync per step
            return
        step = trainer.global_step
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # AdamW leaves parameters without gradients untouched
            if trainer.is_global_zero:
                log.warning("non-finite training loss at step %d: skipped this batch (%d/%d skips allowed)", step,
                            self.skipped, self.max_skips)
            return
        hint = ("lower --model.optimizer.learning_rate, raise --model.optimizer.warmup_steps or check the data; "
                "--nan_guard.action skip skips such batches")
        if self.action == "skip":
            hint = f"{self.skipped} batches were skipped already: lower --model.optimizer.learning_rate"
        raise NonFiniteLossError(f"non-finite training loss at step {step} (weights not updated): {hint}")
