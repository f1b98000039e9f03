"""Where training runs keep their checkpoints, and `--ckpt_path last|best` resolved the same way by every command.

`fit` writes each run to `<runs>/<name>/version_N/` (TensorBoard's layout) with its checkpoints in
`checkpoints/`: `last.ckpt`, the newest training state, and `best-step<S>.ckpt`, the lowest val/loss so far. A
sharded run (project.training.strategy.ShardedStrategy) saves each checkpoint to a DCP folder `step-<S>/`, named so
only once complete, and makes last.ckpt and best-step<S>.ckpt links to those folders.

    --ckpt_path last    the newest run's last.ckpt (a sharded run's: its newest complete step folder)
    --ckpt_path best    the newest run's best checkpoint

"The newest run" is the run folder holding the most recently written checkpoint, under `runs/` of the current
directory (every run name) for generate, predict, export, serve, evaluate and consolidate; `fit --ckpt_path last`
looks under its own logger's folder (`runs/<name>`), and continues that run. Folders without checkpoints (a run
that has not saved yet) are never chosen.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

RUNS_DIR = "runs"  # the logger's save_dir unless a config says otherwise
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
BEST_PATTERN = "best*.ckpt"
Which = Literal["last", "best"]
WHICH = ("last", "best")
METADATA_FILE, META_FILE = ".metadata", "meta.pt"  # a DCP folder's index and Lightning's meta.pt in it
STEP_FOLDER = re.compile(r"step-(\d{9})")


def step_folder_name(step: int) -> str:
    """The folder a sharded run saves the checkpoint of optimizer step `step` to."""
    return f"step-{step:09d}"


def is_step_folder(path: Path) -> bool:
    """A complete step folder: named step-N (renamed so only once complete), with its index and meta.pt."""
    return (STEP_FOLDER.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()
            and (path / METADATA_FILE).is_file() and (path / META_FILE).is_file())


def step_folders(folder: Path) -> list[Path]:
    """The complete step folders in `folder`, oldest first."""
    return sorted((p for p in folder.iterdir() if is_step_folder(p)), key=lambda p: p.name) if folder.is_dir() else []


def latest_step_folder(folder: Path) -> Path | None:
    """The newest complete step folder in `folder` (a checkpoints folder), or None."""
    folders = step_folders(folder)
    return folders[-1] if folders else None


def run_checkpoints(run: Path) -> list[Path]:
    """The checkpoints a run folder holds: files, distributed folders, links to step folders, step folders."""
    folder = run / CHECKPOINTS
    return [p for p in folder.glob("*.ckpt") if p.exists()] + step_folders(folder)


def newest_run(runs: Path, name: str | None = None) -> Path | None:
    """The run folder (`<runs>/<name>/version_N`; any name when `name` is None) whose newest checkpoint is the most
    recently written, or None when no run holds a checkpoint."""
    pattern = f"{name}/version_*" if name is not None else "*/version_*"
    written = {run: max(p.stat().st_mtime for p in checkpoints)
               for run in runs.glob(pattern) if (checkpoints := run_checkpoints(run))}
    return max(written, key=lambda run: (written[run], run.name)) if written else None


def find_checkpoint(which: Which, runs: str | Path = RUNS_DIR, name: str | None = None) -> Path:
    """The newest run's last.ckpt (`which="last"`) or best checkpoint (`"best"`), or FileNotFoundError saying
    what is missing and what to pass instead."""
    runs = Path(runs)
    run = newest_run(runs, name)
    if run is None:
        where = runs / (name or "*") / "version_*" / CHECKPOINTS
        what = LAST if which == "last" else "best checkpoint"
        raise FileNotFoundError(f"--ckpt_path {which}: no {what} under {where}: train first (python -m project fit "
                                "...), run the command where runs/ is, or pass --ckpt_path path/to/file.ckpt")
    return checkpoint_in(run / CHECKPOINTS, which)


def checkpoint_in(folder: Path, which: Which) -> Path:
    """last.ckpt (a sharded run's newest complete step folder), or the best checkpoint (with save_top_k > 1: the
    latest written of them), in a checkpoints folder; FileNotFoundError when it has none yet."""
    if which == "last":
        # a sharded run's newest complete step folder (last.ckpt links to it too, unless the run died in between)
        path = latest_step_folder(folder) or folder / LAST
        if not (path.is_file() or (path / METADATA_FILE).is_file()):  # a file or a DCP folder
            raise FileNotFoundError(f"--ckpt_path last: {folder} has no {LAST}: pass --ckpt_path best or a "
                                    "checkpoint path")
        return path
    best = [p for p in folder.glob(BEST_PATTERN) if p.exists()]
    if not best:
        raise FileNotFoundError(f"--ckpt_path best: {folder} has no best checkpoint yet (one is written at each "
                                "validation): pass --ckpt_path last")
    return max(best, key=lambda p: (p.stat().st_mtime, p.name))


def resolve_checkpoint(ckpt_path: str, runs: str | Path = RUNS_DIR, name: str | None = None) -> str:
    """`last` and `best` become the newest run's checkpoint (`find_checkpoint`); any other value is returned as
    it is, not even made a Path (which would turn a URL into a file name): the reader checks it."""
    if ckpt_path in WHICH:
        return str(find_checkpoint(ckpt_path, runs, name))
    return ckpt_path
