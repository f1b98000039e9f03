"""One writer per run folder, a version of its own for every new run, and no folder left behind by a run that fails
before its first checkpoint."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

try:
    import fcntl  # advisory file locks (POSIX); without it a second writer is not detected
except ImportError:
    fcntl = None


class RunFolderGuard(Callback):
    """One writer per run folder, and no folder left behind by a run that fails before its first checkpoint.

    At setup rank 0 takes an exclusive lock on <log_dir>/.lock (the OS releases it when the process ends, however
    it ends): a second process given the same folder, e.g. `--ckpt_path last` while the run still trains, gets a
    one-line error instead of both writing the same checkpoints. The CLI adds it to every run.

    Args:
        claimed: the version folder `claim_next_version` created for this run (removed if the run fails before
            its first checkpoint, even before setup).
    """

    def __init__(self, claimed: str | None = None) -> None:
        self.folder: Path | None = Path(claimed) if claimed else None
        self.created = claimed is not None  # by this run: removed again if the run fails before writing a checkpoint
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
        if self.created and self.folder is not None:
            remove_unsaved_run(self.folder)


def claim_next_version(folder: Path) -> Path:
    """Create and return <folder>/version_N for a new run, N one past the highest version there. mkdir is atomic, so
    runs started together in one folder get different versions (Lightning's loggers would pick the same one)."""
    folder.mkdir(parents=True, exist_ok=True)
    versions = [int(m[1]) for p in folder.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(versions, default=-1) + 1
    while True:
        try:
            (folder / f"version_{version}").mkdir()
            return folder / f"version_{version}"
        except FileExistsError:  # another run claimed it first
            version += 1


def remove_unsaved_run(folder: Path) -> None:
    """Delete a run folder this process created if it holds no checkpoint (only config.yaml and logs of a run that
    failed before saving)."""
    if folder.is_dir() and not any(folder.rglob("*.ckpt")):
        shutil.rmtree(folder, ignore_errors=True)


class RunFolderBusyError(FileExistsError):
    """Another process holds the run folder's lock (raised by RunFolderGuard)."""
