"""Checkpoints that resume exactly: the newest state as last.ckpt, files written atomically, RNG states kept.

The best checkpoint by val/loss is Lightning's own ModelCheckpoint (configured by the CLI as `--checkpoint.*`);
`LatestCheckpoint` (`--last_checkpoint.*`) keeps last.ckpt beside it: every N optimizer steps, at the end of
training (max_steps or max_time) and when training is interrupted (Ctrl-C, an error), so `--ckpt_path last`
continues where the run stopped. `AtomicCheckpointIO` writes every file through project.files, `RandomState` carries the
random streams (torch, numpy, Python, CUDA) so dropout continues the same sequence after a resume.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from project.files import atomic_path, remove_stale_temporaries
from project.formats.checkpoint import read_checkpoint
from project.training.interrupt import interrupted_step

log = logging.getLogger(__name__)


class LatestCheckpoint(Callback):
    """last.ckpt beside the best checkpoint: the newest training state, refreshed every `every_n_train_steps`
    optimizer steps, when training ends (max_steps or max_time) and, with `save_on_exception`, when training
    stops on Ctrl-C or an error. Written with `Trainer.save_checkpoint`, so it holds exactly what Lightning's own
    checkpoints hold (optimizer, schedule, loop and callback states) and goes through the CheckpointIO plugin.

    Args:
        every_n_train_steps: refresh last.ckpt every this many optimizer steps (None: only at the end).
        save_on_exception: save when training is interrupted, so `--ckpt_path last` resumes there.
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_train_steps: int | None = 100, save_on_exception: bool = True) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"--last_checkpoint.every_n_train_steps must be >= 1 (or null: only at the end), got "
                             f"{every_n_train_steps}")
        self.every_n_train_steps, self.save_on_exception = every_n_train_steps, save_on_exception
        self.saved_step: int | None = None
        self.path: Path | None = None

    def save(self, trainer: Trainer) -> None:
        """Write last.ckpt into the best checkpoint's folder (every rank takes part), once per step."""
        best = trainer.checkpoint_callback
        if best is None or best.dirpath is None or self.saved_step == trainer.global_step or trainer.fast_dev_run:
            return  # checkpointing is off, or this step is saved already
        self.path = Path(best.dirpath) / self.FILENAME
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole training state, to resume from
        self.saved_step = trainer.global_step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before training (or a resume) continues, clear what killed runs left in the checkpoint folders."""
        if trainer.is_global_zero:
            for removed in remove_killed_run_leftovers(trainer):
                log.info("removed %s, left by a run that was killed", removed)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and trainer.global_step > 0:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0:
            self.save(trainer)
        if interrupted_step(trainer) is not None and trainer.is_global_zero and self.path is not None:
            log.info("interrupted at step %d: saved %s; resume with --ckpt_path last", trainer.global_step, self.path)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not self.save_on_exception or trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return  # nothing trained: no checkpoint to write (and none in a validate/test/predict run's folder)
        self.save(trainer)
        if trainer.is_global_zero and self.path is not None:
            why = ("interrupted" if isinstance(exception, KeyboardInterrupt) else "stopped by SIGTERM"
                   if isinstance(exception, SIGTERMException) else f"stopped by {type(exception).__name__}")
            facts = [f"{trainer.global_step:,} of {trainer.max_steps:,} steps done"] if trainer.max_steps > 0 else []
            facts += [f"last validation {name} {float(trainer.callback_metrics[name]):.4f}"
                      for name in ("val/loss", "val/bpb") if name in trainer.callback_metrics]
            log.info("%s at step %d: saved %s (%s); to continue, run the same command with --ckpt_path last", why,
                     trainer.global_step, self.path, ", ".join(facts) or "no validation yet")


def remove_killed_run_leftovers(trainer: Trainer) -> list[Path]:
    """Delete, in each ModelCheckpoint's folder, the temporaries of dead writers and, on a resume, the checkpoints a
    killed run saved after the one resumed from, which the restored ModelCheckpoint state does not know (a
    best-stepN.ckpt beside the tracked one under save_top_k 1): that run's later steps are trained again."""
    removed = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            continue
        folder = Path(callback.dirpath)
        removed += remove_stale_temporaries(folder)
        if trainer.ckpt_path is None or not callback.best_k_models:
            continue  # a new run, or no state restored for this folder: nothing is known to be an orphan
        kept = [*callback.best_k_models, callback.best_model_path, callback.last_model_path,
                callback.kth_best_model_path, trainer.ckpt_path, folder / LatestCheckpoint.FILENAME]
        tracked = {Path(p).resolve() for p in kept if p}
        # the files this callback names (its filename template, Lightning's default when unset), not others
        pattern = re.sub(r"\{[^}]*\}", "*", callback.filename or "{epoch}-{step}") + callback.FILE_EXTENSION
        for path in folder.glob(pattern):
            if path.is_file() and path.resolve() not in tracked:
                path.unlink()
                removed.append(path)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint file atomically (project.files.atomic_path): a kill mid-write leaves the previous
    complete file, and reads checkpoints safely: files weights-only, DCP folders (written by ShardedStrategy
    itself, not through this plugin) through project.formats.dcp, so a single-device or DDP run resumes from one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as staging:
            super().save_checkpoint(checkpoint, staging, storage_options)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None) -> dict:
        """Lightning's resume reads through here: weights only, whatever --weights_only says (the CLI refuses
        false, and has checked the checkpoint with project.formats.checkpoint.read_checkpoint); a DCP folder
        gathered into full tensors, optimizer state included."""
        if Path(path).is_dir():
            return read_checkpoint(path, optimizer=True)
        return super().load_checkpoint(path, map_location, weights_only=True)


class RandomState(Callback):
    """Stores the random states of torch, numpy and Python (and CUDA) in each checkpoint and restores them on
    resume, so dropout and anything else random continue the same stream."""

    def state_dict(self) -> dict:
        return rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            set_rng_states(state_dict)


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
    """Restore what `rng_states` returned; CUDA states only for the GPUs this process has (a run saved on 8 GPUs
    resumes on 1: torch.cuda.set_rng_state_all would fail on the 7 missing ones)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "torch.cuda" in states and torch.cuda.is_available():
        for index, state in enumerate(states["torch.cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
