"""Cross-cutting training features as Lightning callbacks: text samples, throughput/MFU, prediction files,
checkpoints (with the atomic-write CheckpointIO plugin they are written through) and the NaN guard."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

import torch

from project.generate import complete_batch

try:
    import fcntl  # advisory file locks (POSIX); without it a second writer is not detected
except ImportError:
    fcntl = None


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
        if trainer.sanity_checking or pl_module.tokenizer is None:
            return
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
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm up (thread pool, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs train/device/items_per_sec (tokens/s) and
    train/device/mfu (model FLOPs utilisation) once `window_size` batches have run.

    Args:
        peak_flops: the device's peak FLOP/s for MFU. None: Lightning's table for known GPUs, and on a CPU a
            matmul peak measured once at setup in the training dtype (`measure_matmul_flops`).
        window_size: batches averaged per reading.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 20) -> None:
        self.peak_flops, self.table_flops = peak_flops, None
        super().__init__(batch_size_fn=lambda batch: batch[0].size(0), length_fn=lambda batch: batch[0].numel(),
                         window_size=window_size)

    # ThroughputMonitor.setup sets `available_flops` from Lightning's table of GPUs, then builds its
    # Throughput meters from it: a known peak (given, or measured on a CPU) takes precedence over the table
    @property
    def available_flops(self) -> float | None:
        return self.peak_flops if self.peak_flops is not None else self.table_flops

    @available_flops.setter
    def available_flops(self, value: float | None) -> None:
        self.table_flops = value

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.peak_flops is None and trainer.strategy.root_device.type == "cpu":  # no CPU in Lightning's table
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = measure_matmul_flops(dtype)
        super().setup(trainer, pl_module, stage)

    # prediction batches are prompts, not token windows: nothing to count
    def on_predict_start(self, *args, **kwargs) -> None:
        pass

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_predict_end(self, *args, **kwargs) -> None:
        pass


class PredictionWriter(BasePredictionWriter):
    """Write each completion as a JSON line (prompt, completion, settings) and print it to stdout.

    Args:
        output_path: the JSONL file; None writes predictions.jsonl into the run's log directory. An existing
            file is never overwritten.
        print_to_stdout: also print each prompt and completion.
    """

    def __init__(self, output_path: str | None = None, print_to_stdout: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path) if output_path else None
        self.print_to_stdout = print_to_stdout

    def resolve_path(self, trainer: Trainer) -> Path:
        return self.output_path or Path(trainer.log_dir or ".") / "predictions.jsonl"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.resolve_path(trainer)
        if trainer.is_global_zero and path.exists():
            raise FileExistsError(f"{path} exists; choose another --predictions.output_path or remove it")
        blocking = next((parent for parent in path.parents if parent.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise NotADirectoryError(f"--predictions.output_path {path}: {blocking} is a file, not a folder")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if not trainer.is_global_zero:  # under tensor parallelism every rank holds the same outputs
            return
        path = self.resolve_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for record in prediction:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.print_to_stdout:
            for record in prediction:
                sys.stdout.write(f"{record['prompt']}{record['completion']}\n{'-' * 40}\n")
            sys.stdout.flush()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"predictions written to {self.resolve_path(trainer)}", file=sys.stderr)


class StepProgressBar(TQDMProgressBar):
    """The training bar of a step-bound run (max_steps set, max_epochs not): optimizer steps out of max_steps,
    the training loss and tokens/s, instead of Lightning's per-epoch batches and logger version (v_num).

    Args:
        refresh_rate: update the bar every this many batches.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.tokens_per_sec: float | None = None
        self._last_batch_end: float | None = None

    @staticmethod
    def step_bound(trainer: Trainer) -> bool:
        return trainer.max_epochs in (None, -1) and trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self.step_bound(trainer):
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.update(trainer.global_step)  # a resumed run starts where it stopped
            self.train_progress_bar.set_description("Training steps")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.step_bound(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.count_tokens(batch[0].numel() * trainer.world_size)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and (batch_idx + 1) % self.refresh_rate == 0:
            bar.update(trainer.global_step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def count_tokens(self, tokens: int) -> None:
        """One batch's tokens (all ranks): tokens/s from the end of the previous batch to now (the first batch,
        with its start-up work, only starts the clock)."""
        now = time.perf_counter()
        if self._last_batch_end is not None and now > self._last_batch_end:
            self.tokens_per_sec = tokens / (now - self._last_batch_end)
        self._last_batch_end = now

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        if not self.step_bound(trainer):
            return metrics
        metrics.pop("v_num", None)  # the logger's version: its folder name, not progress
        if self.tokens_per_sec is not None:
            metrics["tok/s"] = f"{self.tokens_per_sec:,.0f}"
        return metrics


class GPTCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (best by val/loss + last.ckpt) that also

    - refreshes last.ckpt every `last_every_n_steps` optimizer steps, independently of the monitored top-k
      (`every_n_train_steps` of ModelCheckpoint would save top-k files by a stale val/loss instead);
    - has its files written atomically by AtomicCheckpointIO, the plugin the CLI gives the Trainer;
    - saves last.ckpt on Ctrl-C (KeyboardInterrupt), so `--ckpt_path last` resumes where it stopped;
    - stores the RNG states (torch, numpy, python, CUDA), so dropout continues the same random stream.

    Args:
        last_every_n_steps: refresh last.ckpt every this many optimizer steps (None: only with the best
            checkpoint, at validation, and at the end).
        save_on_interrupt: save last.ckpt when training is interrupted with Ctrl-C.
    """

    def __init__(self, *args, last_every_n_steps: int | None = None, save_on_interrupt: bool = True,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_steps is not None and last_every_n_steps < 1:
            raise ValueError(f"checkpoint.last_every_n_steps must be >= 1 (or null), got {last_every_n_steps}")
        self.last_every_n_steps, self.save_on_interrupt = last_every_n_steps, save_on_interrupt
        self._last_step_of_last = 0  # step of the newest last.ckpt

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_steps
        if (n and self.save_last and trainer.global_step % n == 0 and not trainer.sanity_checking
                and self._last_step_of_last != trainer.global_step and not trainer.fast_dev_run):
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = saved  # else the best (top-k) save at this step's validation is skipped

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step_of_last = trainer.global_step

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)  # Lightning's save_on_exception, off by default
        if (isinstance(exception, KeyboardInterrupt) and self.save_on_interrupt and self.save_last
                and trainer.state.fn == "fit" and trainer.global_step > 0):
            if trainer.global_step != self._last_step_of_last:  # else last.ckpt is already this step's
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if trainer.is_global_zero:
                print(f"interrupted at step {trainer.global_step}: saved {self.last_model_path}; "
                      "resume with --ckpt_path last", file=sys.stderr)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("rng_states"):
            set_rng_states(state_dict["rng_states"])


def rng_states() -> dict:
    """The random states of torch, numpy, Python (and CUDA), in types `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # numpy arrays would need pickle: store a tensor
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint file atomically: to a hidden temporary file in the same folder (named per
    process), then os.replace, so a kill mid-write leaves the previous complete file. Lightning's own write
    stages the bytes in the system temp dir and moves them, a plain copy when that is another filesystem.
    Distributed (DCP) folders are written by the strategy itself, not through this plugin."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None) -> dict:
        """Lightning's resume reads through here: weights only, whatever --weights_only says (the CLI refuses
        false, and has checked the file with project.checkpoint.read_checkpoint)."""
        return super().load_checkpoint(path, map_location, weights_only=True)


class RunFolderGuard(Callback):
    """One writer per run folder, and no folder left behind by a run that fails before its first checkpoint.

    At setup rank 0 takes an exclusive lock on <log_dir>/.lock (the OS releases it when the process ends, however
    it ends): a second process given the same folder, e.g. `--ckpt_path last` while the run still trains, gets a
    one-line error instead of both writing the same checkpoints. The CLI adds it to every run.
    """

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.created = False  # by this run: removed again if the run fails before writing a checkpoint
        self.lock = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective (broadcast from rank 0): every rank asks
        busy = self.take_lock(Path(log_dir)) if trainer.is_global_zero and log_dir and fcntl else None
        busy = trainer.strategy.broadcast(busy)  # every rank stops, not only rank 0 (the others would hang)
        if busy:
            raise RunFolderBusyError(busy)

    def take_lock(self, folder: Path) -> str | None:
        """Lock `folder` for this process; the one-line reason when another process holds it."""
        # Lightning has made the logger's folder by now: it is this run's if it holds only this process's events
        mine = f".{os.getpid()}."
        created = all(p.name.startswith("events.out.tfevents.") and mine in p.name
                      for p in folder.rglob("*") if p.is_file())
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            return (f"run folder {folder} is being written by another process (pid {owner}): wait for it to end "
                    "or stop it, or train into a new folder (without --ckpt_path last)")
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self.folder, self.created, self.lock = folder, created, lock
        return None

    def release(self) -> None:
        if self.lock is not None:
            Path(self.lock.name).unlink(missing_ok=True)
            self.lock.close()
            self.lock = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.release()
        if self.created and self.folder is not None and not any(self.folder.rglob("*.ckpt")):
            shutil.rmtree(self.folder, ignore_errors=True)  # only config.yaml and logs of a run that never saved


class RunFolderBusyError(FileExistsError):
    """Another process holds the run folder's lock (raised by RunFolderGuard)."""


class NonFiniteLossGuard(Callback):
    """Stop the run (or skip the batch) when the training loss is NaN or infinite.

    The check runs before the optimizer step, so with "stop" the weights (and last.ckpt) keep the last
    finite state, and with "skip" the batch changes nothing (its gradients are dropped; the LR schedule and
    the step counter still advance). Under several processes the decision is collective: a non-finite loss
    on any rank stops or skips on every rank. It costs one host sync of a scalar per optimizer step (and,
    with several ranks, an all-reduce of it): negligible next to the step itself.

    Args:
        action: "stop" ends the run with an error naming the step; "skip" drops that batch's update and warns.
        max_skips: with "skip", stop anyway after this many skipped batches (the run has diverged).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        self.action, self.max_skips = action, max_skips
        self.skipped = 0
        self._finite: torch.Tensor | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # no sync yet: read once per optimizer step below
        self._finite = finite if self._finite is None else self._finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        finite, self._finite = self._finite, None
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
            pl_module.print(f"warning: non-finite training loss at step {step}: skipped this batch "
                            f"({self.skipped}/{self.max_skips} skips allowed)", file=sys.stderr)
            return
        hint = ("lower --model.learning_rate, raise --model.warmup_steps or check the data; "
                "--nan_guard.action skip skips such batches")
        if self.action == "skip":
            hint = f"{self.skipped} batches were skipped already: lower --model.learning_rate"
        raise NonFiniteLossError(f"non-finite training loss at step {step} (weights not updated): {hint}")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (raised by NonFiniteLossGuard)."""
