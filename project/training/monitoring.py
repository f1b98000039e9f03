"""Watching a run: a text sample after each validation, tokens/s and MFU, TensorBoard events by step, and a
progress bar counted in steps."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from project.generate import complete_batch
from project.training.step_stats import TRAIN_LOSS, IntervalCallback, step_stats

TOKENS_PER_SEC, MFU = "train/tokens_per_sec", "train/mfu"


class TextSampleCallback(Callback):
    """After each validation, generate a sample from `prompt` and log it to TensorBoard (tab TEXT).

    The seed is fixed so that samples from successive validations differ only because the model learned.
    """

    def __init__(self, prompt: str = "\n", max_new_tokens: int = 200, seed: int = 1234) -> None:
        self.prompt, self.max_new_tokens, self.seed = prompt, max_new_tokens, seed
        self.last_sample: str | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the prompt now, not at the first validation (after steps that would be lost)."""
        if pl_module.tokenizer is None or self.max_new_tokens == 0:
            return
        try:
            ok = bool(pl_module.tokenizer.encode(self.prompt))
        except ValueError as err:
            raise ValueError(f"--samples.prompt {self.prompt!r} cannot be encoded ({err}): pass --samples.prompt "
                             "with text made of the corpus's characters, e.g. its first word") from None
        if not ok:
            raise ValueError("--samples.prompt is empty: pass some text, e.g. the corpus's first word")

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or pl_module.tokenizer is None or trainer.state.fn != TrainerFn.FITTING:
            return  # `validate` has no TensorBoard run to log a sample into
        reason = sample_skip_reason(trainer.strategy)
        if reason is not None:
            rank_zero_warn(f"no text samples are logged: {reason}")  # Python's warnings show it once
            return
        settings = replace(pl_module.generation, max_new_tokens=self.max_new_tokens, seed=self.seed)
        self.last_sample = complete_batch(pl_module.model, pl_module.tokenizer, [self.prompt], settings)[0]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # TensorBoard renders markdown: indent four spaces to keep line breaks and verse layout
                body = "    " + (self.prompt + self.last_sample).replace("\n", "\n    ")
                logger.experiment.add_text("samples", body, global_step=trainer.global_step)


def sample_skip_reason(strategy: Strategy) -> str | None:
    """Why `TextSampleCallback` cannot generate under `strategy`, or None when rank 0 holds the whole model.

    Sampling runs on rank 0 alone; under a sharding strategy each forward gathers the weights from every rank,
    so rank 0 would wait forever for ranks that are not generating.
    """
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
        return f"{type(strategy).__name__} shards the weights and rank 0 alone cannot run the model"
    return None


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 3,
                         device: str | torch.device = "cpu") -> float:
    """Achievable matmul FLOP/s of `device` in `dtype`: the median of a few size x size matmuls (~0.1 s on a CPU).

    The denominator of MFU where no datasheet peak is known (CPUs): "fraction of what this machine's matmul
    reaches", measured on the spot, so a loaded machine reads lower peaks.
    """
    generator = torch.Generator(device=device).manual_seed(0)  # not the global RNG: a resumed run draws alike
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    torch.mm(a, b)  # warm up (thread pool, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def compute_dtype(trainer: Trainer) -> torch.dtype:
    """The dtype the matmuls of this run compute in, from its precision flag."""
    precision = str(trainer.precision)
    if "bf16" in precision:
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


class TokenThroughput(IntervalCallback):
    """Training tokens/s (all ranks) and MFU, logged as train/tokens_per_sec and train/mfu every
    `log_every_n_steps` optimizer steps, measured with Lightning's `Throughput` over the last `window` intervals.

    Tokens are counted on the host (batch shapes); the clock is read at `StepStats`'s one sync per interval,
    after the device has finished the interval's work, so no extra synchronisation is needed.

    Args:
        peak_flops: the device's peak FLOP/s for MFU. None: Lightning's table for known GPUs, and on a CPU a
            matmul peak measured once at the start in the training dtype (`measure_matmul_flops`).
        window: logging intervals averaged per reading (at least 1).
    """

    def __init__(self, peak_flops: float | None = None, window: int = 1) -> None:
        if window < 1:
            raise ValueError(f"--throughput.window must be >= 1, got {window}")
        self.peak_flops, self.window = peak_flops, window
        self.meter: Throughput | None = None
        self.counts_flops = False
        self.elapsed = 0.0
        self.batches = self.samples = self.tokens = self.flops = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        peak = self.peak_flops
        if peak is None:
            device, dtype = trainer.strategy.root_device, compute_dtype(trainer)
            peak = get_available_flops(device, dtype) if device.type != "cpu" else measure_matmul_flops(dtype)
        self.meter = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window + 1)
        # a module without a FLOP count (fine-tuning: batches vary in length) gets tokens/s only, not an MFU of 0
        self.counts_flops = getattr(pl_module, "flops_per_batch", None) is not None
        self.elapsed, self.batches, self.samples, self.tokens, self.flops = 0.0, 0, 0, 0, 0
        self.meter.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        x = batch[0]
        self.batches += 1
        self.samples += x.size(0)
        self.tokens += x.numel()
        self.flops += getattr(pl_module, "flops_per_batch", None) or 0

    def on_interval(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float],
                    seconds: float) -> dict[str, float]:
        if self.meter is None:
            return {}
        self.elapsed += seconds
        self.meter.update(time=self.elapsed, batches=self.batches, samples=self.samples, lengths=self.tokens,
                          flops=self.flops)  # flops: of this interval only
        self.flops = 0
        metrics = self.meter.compute()
        per_device = metrics.get("device/items_per_sec")
        if per_device is None:
            return {}
        logged = {TOKENS_PER_SEC: per_device * trainer.world_size}
        if "device/mfu" in metrics and self.counts_flops:
            logged[MFU] = metrics["device/mfu"]
        return logged


class LearningRates(IntervalCallback):
    """The learning rates in use, logged each logging interval beside the loss in TensorBoard's `train` group:
    `train/lr` (AdamW's groups) and, with Muon, `train/lr_muon`. Read on the host from the optimizer's param groups
    (named by project.training.optim), so they add nothing to the interval's one sync."""

    TAGS = {"decay": "train/lr", "muon": "train/lr_muon"}  # param group name -> tag (no_decay shares decay's)

    def on_interval(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float],
                    seconds: float) -> dict[str, float]:
        return {self.TAGS[group["name"]]: group["lr"] for optimizer in trainer.optimizers
                for group in optimizer.param_groups if group.get("name") in self.TAGS}


class RunLogger(TensorBoardLogger):
    """TensorBoard events of a run, by optimizer step: the configs' logger.

    Lightning's TensorBoardLogger with two series left out that only look like results: `epoch` (added to every
    logging call, flat at 0 for a step-bound run over an endless stream) and the placeholder `hp_metric` (-1). So
    TensorBoard opens on the `train` group (loss, learning rates, tokens/s) and `val` (loss, ppl, bits per byte).
    """

    def __init__(self, save_dir: str = "runs", name: str | None = "gpt", version: int | str | None = None,
                 default_hp_metric: bool = False, **kwargs) -> None:
        super().__init__(save_dir, name=name, version=version, default_hp_metric=default_hp_metric, **kwargs)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


class StepProgressBar(TQDMProgressBar):
    """The training bar of a step-bound run (max_steps set, max_epochs not): optimizer steps out of max_steps,
    the training loss and tokens/s of the latest logging interval (from `StepStats`), instead of Lightning's
    per-epoch batches and logger version (v_num).

    Args:
        refresh_rate: update the bar every this many batches.
    """

    @staticmethod
    def step_bound(trainer: Trainer) -> bool:
        return trainer.max_epochs in (None, -1) and trainer.max_steps > 0

    @property
    def train_description(self) -> str:
        return "Training steps" if self.step_bound(self.trainer) else super().train_description

    def on_train_epoch_start(self, trainer: Trainer, *args) -> None:
        if not self.step_bound(trainer):
            return super().on_train_epoch_start(trainer, *args)
        # one bar for the whole run, never redrawn as Lightning's "Epoch 0: 0/N" first
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.update(trainer.global_step)  # a resumed run starts where it stopped

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.step_bound(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and (batch_idx + 1) % self.refresh_rate == 0:
            bar.update(trainer.global_step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        if not self.step_bound(trainer):
            return metrics
        metrics.pop("v_num", None)  # the logger's version: its folder name, not progress
        stats = step_stats(trainer)  # the latest interval's values, read without a sync of their own
        latest = stats.metrics if stats is not None else {}
        if TRAIN_LOSS in latest:
            metrics["loss"] = f"{latest[TRAIN_LOSS]:.3f}"
        if TOKENS_PER_SEC in latest:
            metrics["tok/s"] = f"{latest[TOKENS_PER_SEC]:,.0f}"
        return metrics
