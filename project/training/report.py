"""What a training run did, for the command line to tell: why it stopped, its last validation, its checkpoints.

`RunReport` (always on in `fit`) logs one line when training starts (the model, where the run is written) and
keeps the last validation's metrics; `fit_report` reads the finished Trainer into a `FitReport`, which
`python -m project fit` prints, also after a Ctrl-C (project/training/interrupt.py). A run stopped by an error (a
NaN loss: project/training/nan_guard.py) is reported by `LatestCheckpoint.on_exception`
(project/training/checkpointing.py), which saves last.ckpt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer

from project.training.checkpointing import LatestCheckpoint
from project.training.interrupt import interrupted_step
from project.training.monitoring import TextSampleCallback

log = logging.getLogger(__name__)

VALIDATION_METRICS = ("val/loss", "val/ppl", "val/bpb")


@dataclass
class FitReport:
    """The outcome of `fit`.

    Attributes:
        stopped_by: "max_steps", "max_time", "max_epochs", "interrupted" (Ctrl-C) or "a callback" (e.g. early
            stopping). A NaN loss ends `fit` with an error instead (project.training.nan_guard).
        step: optimizer steps done (resumed ones included).
        max_steps: the step limit, or None without one.
        max_time_s: the time limit in seconds, or None without one.
        train_s: seconds this process trained (start-up excluded).
        validated_at: the step of the last validation, or None if the run never validated.
        metrics: that validation's val/loss, val/ppl and val/bpb.
        best: the best checkpoint by val/loss and its score, when one was written.
        last: last.ckpt, the final training state.
        run_dir: the run's folder (TensorBoard events, config.yaml, checkpoints/).
        prompt: the text samples' prompt (a good first prompt for `generate`).
    """

    stopped_by: str
    step: int
    max_steps: int | None
    max_time_s: float | None
    train_s: float | None
    validated_at: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    best: Path | None = None
    best_score: float | None = None
    last: Path | None = None
    run_dir: Path | None = None
    prompt: str | None = None


class RunReport(Callback):
    """Logs the model and the run folder when training starts; keeps each validation's metrics for `fit_report`."""

    def __init__(self) -> None:
        self.validated_at: int | None = None
        self.metrics: dict[str, float] = {}
        self.started: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = time.monotonic()
        if not trainer.is_global_zero:
            return
        model = getattr(pl_module, "model", None)
        what = f"a {model.num_params() / 1e6:.2f} M-parameter GPT" if hasattr(model, "num_params") else "the model"
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is not None:
            what += f", {tokenizer.describe()},"
        limits = [f"{trainer.max_steps:,} steps" if trainer.max_steps > 0 else None,
                  f"{time_limit(trainer) / 60:.1f} minutes" if time_limit(trainer) else None]
        limit = " or ".join(x for x in limits if x)
        limit = f" for {limit}{', whichever comes first' if None not in limits else ''}" if limit else ""
        where = f"; writing to {trainer.log_dir}" if trainer.logger is not None and trainer.log_dir else ""
        start = f" from step {trainer.global_step:,}" if trainer.global_step else ""
        log.info("training %s%s%s%s", what, start, limit, where)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validated_at = trainer.global_step
        self.metrics = {name: float(trainer.callback_metrics[name]) for name in VALIDATION_METRICS
                        if name in trainer.callback_metrics}


def time_limit(trainer: Trainer) -> float | None:
    """The Trainer's time limit (`max_time`) in seconds, or None."""
    timer = timer_of(trainer)
    if timer is None or timer.time_remaining() is None:
        return None
    return timer.time_elapsed() + timer.time_remaining()


def timer_of(trainer: Trainer) -> Timer | None:
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def fit_report(trainer: Trainer) -> FitReport:
    """The outcome of a finished `trainer.fit`: why it stopped, the last validation, the checkpoints written."""
    callbacks = trainer.callbacks
    report = next((c for c in callbacks if isinstance(c, RunReport)), RunReport())
    timer = timer_of(trainer)
    max_steps = trainer.max_steps if trainer.max_steps > 0 else None
    if interrupted_step(trainer) is not None:
        stopped_by = "interrupted"
    elif max_steps is not None and trainer.global_step >= max_steps:
        stopped_by = "max_steps"
    elif timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        stopped_by = "max_time"
    elif trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
        stopped_by = "max_epochs"
    else:
        stopped_by = "a callback"
    best = trainer.checkpoint_callback
    best_path = Path(best.best_model_path) if best is not None and best.best_model_path else None
    latest = next((c for c in callbacks if isinstance(c, LatestCheckpoint)), None)
    samples = next((c for c in callbacks if isinstance(c, TextSampleCallback)), None)
    return FitReport(
        stopped_by=stopped_by, step=trainer.global_step, max_steps=max_steps, max_time_s=time_limit(trainer),
        train_s=time.monotonic() - report.started if report.started is not None else None,
        validated_at=report.validated_at,
        metrics=dict(report.metrics), best=best_path,
        best_score=None if best_path is None or best.best_model_score is None else float(best.best_model_score),
        last=latest.path if latest is not None and latest.path is not None and latest.path.exists() else None,
        run_dir=Path(trainer.log_dir) if trainer.logger is not None and trainer.log_dir else None,
        prompt=samples.prompt if samples is not None else None,
    )
