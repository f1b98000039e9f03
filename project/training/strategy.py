"""ShardedStrategy: Lightning's ModelParallelStrategy (tensor parallel + FSDP2) whose checkpoints are read safely.

    trainer:
      strategy:
        class_path: project.training.strategy.ShardedStrategy      # configs/strategy/tp.yaml
        init_args: {data_parallel_size: auto, tensor_parallel_size: auto}

ModelParallelStrategy writes a checkpoint as a DCP folder (shards, `.metadata`, Lightning's `meta.pt`) and reads it
back with torch's default reader, which unpickles user files (see project/formats/dcp.py). This subclass overrides
the one public method that reads a checkpoint, `load_checkpoint`, so `fit/validate/test/predict --ckpt_path DIR`
reads through project.formats.dcp: checked metadata, no fallback, weights-only items. It also works on any number
of devices (DCP reshards on load) and for models without sharded parameters. The CLI refuses a DCP folder under
any strategy that would read it otherwise (project/cli.py, `check_checkpoint_reader`).

Saving is this subclass's too (`save_checkpoint`): ModelParallelStrategy writes every save into the folder named
last.ckpt, so a crash in the middle of one left old and new shards mixed in the very folder `--ckpt_path last`
resumes. Here each save goes to its own step folder, written under a hidden temporary name and renamed once
every rank's shards and meta.pt are in it; the names ModelCheckpoint and LatestCheckpoint save to (last.ckpt,
best-stepN.ckpt) become links to step folders, replaced atomically:

    checkpoints/
      .step-000000120.4711.tmp/   being written (a killed save leaves only this; removed at the next start)
      step-000000100/             complete: __R_0.distcp shards, .metadata, meta.pt
      step-000000120/
      last.ckpt -> step-000000120
      best-step100.ckpt -> step-000000100

A folder named step-N is complete by construction (the rename is the commit); the newest one is what `--ckpt_path
last` resolves to in every command (project/formats/runs.py, where these names are defined). Older ones are deleted
beyond `keep_checkpoints`, except those a link names and the one this run resumed from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from project.files import atomic_path, remove_path, temporary_path
from project.formats.checkpoint import load_weights_only
from project.formats.dcp import META_FILE, load_dcp, read_dcp_metadata
from project.formats.runs import step_folder_name, step_folders

class ShardedStrategy(ModelParallelStrategy):
    """ModelParallelStrategy (a device mesh of data_parallel_size x tensor_parallel_size) whose checkpoints are saved
    to step folders, committed once complete, and read through project.formats.dcp (see the module docstring).

    Args:
        keep_checkpoints: complete step folders kept in a checkpoints folder (at least 1); older ones are deleted,
            unless last.ckpt or a best-stepN.ckpt links to them or the run resumed from them.
        save_distributed_checkpoint: False writes one consolidated file per save instead (rank 0 gathers every
            weight: only for models that fit one device), as ModelParallelStrategy does.
        *args, **kwargs: ModelParallelStrategy's (data_parallel_size, tensor_parallel_size, timeout, ...).
    """

    def __init__(self, *args, keep_checkpoints: int = 2, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        if keep_checkpoints < 1:
            raise ValueError(f"--trainer.strategy.keep_checkpoints must be >= 1, got {keep_checkpoints}")
        super().__init__(*args, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.keep_checkpoints, self.sharded_checkpoints = keep_checkpoints, save_distributed_checkpoint
        self.committed: set[Path] = set()  # step folders this process wrote (a later save at that step reuses them)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Write `checkpoint` (this rank's shards of it) to the step folder of its global step and point `filepath`
        (last.ckpt, best-stepN.ckpt) at it. Every rank calls this; rank 0 commits, links and prunes."""
        import torch.distributed.checkpoint as dcp

        if not self.sharded_checkpoints:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        link = Path(self.broadcast(str(filepath)))  # every rank writes where rank 0 says
        folder = link.parent / step_folder_name(checkpoint["global_step"])
        state = {"state_dict": checkpoint.pop("state_dict"),
                 **{f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}}
        if not self.broadcast(folder.resolve() in self.committed):  # else saved at this step (last and best)
            staging = Path(self.broadcast(str(temporary_path(folder))))  # rank 0's hidden .step-N.PID.tmp
            if self.is_global_zero:
                remove_path(staging)  # left by an earlier process that had this pid
                staging.mkdir(parents=True)
            self.barrier()
            dcp.save(state, checkpoint_id=staging)  # each rank its shards; .metadata once all are written
            self.commit(checkpoint, staging, folder)
        elif self.is_global_zero:
            save_meta(checkpoint, folder)  # the same weights; the newest loop and callback state of this step
        if self.is_global_zero:
            point_link(link, folder)
            self.prune(link.parent)
        self.barrier()

    def commit(self, checkpoint: dict, staging: Path, folder: Path) -> None:
        """Make the written shards a checkpoint: rank 0 adds meta.pt (hyperparameters, tokenizer, loops,
        callbacks) and renames the staging folder to its step folder, once every rank has written."""
        self.barrier()
        if self.is_global_zero:
            save_meta(checkpoint, staging)
            remove_path(folder)  # another run's folder of this step (one resumed from an earlier step)
            os.replace(staging, folder)  # the commit: a folder named step-N is complete
        self.committed.add(folder.resolve())

    def remove_checkpoint(self, filepath) -> None:
        """ModelCheckpoint drops an old best checkpoint: its link goes (the default would delete through it), then
        its step folder with the other unneeded ones."""
        if self.is_global_zero:
            path = Path(filepath)
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                remove_path(path)
            self.prune(path.parent)

    def prune(self, folder: Path) -> list[Path]:
        """Delete the complete step folders of `folder` beyond the newest `keep_checkpoints`, except those a link in
        it names and the one this run resumed from; return them."""
        linked = {(folder / os.readlink(p)).resolve() for p in folder.iterdir() if p.is_symlink()}
        resumed = self.lightning_module.trainer.ckpt_path if self.lightning_module is not None else None
        keep = linked | ({Path(resumed).resolve()} if resumed else set())
        old = [p for p in step_folders(folder)[: -self.keep_checkpoints] if p.resolve() not in keep]
        for path in old:
            remove_path(path)
        return old

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Restore the model and optimizers from a DCP folder (any world size), or a single .ckpt file (weights
        only); return the rest of the checkpoint (loops, callbacks, schedulers, hyperparameters, tokenizer)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))  # every rank reads the folder rank 0 resolved
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=True)  # a consolidated file: torch.load, weights only
        metadata = read_dcp_metadata(path)  # every rank checks it; ValueError is one line
        module = self.lightning_module
        # the destinations as Lightning's own loader builds them (its options included), filled in place
        state = {"state_dict": get_model_state_dict(module),
                 **{f"optimizer_{i}": get_optimizer_state_dict(module, optimizer)
                    for i, optimizer in enumerate(self.optimizers)}}
        load_dcp(state, path, metadata)  # resharded to this run's layout
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=module.strict_loading))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        # load_model_state_dict / load_optimizer_state_dict are no-ops in this strategy: the rest is Lightning's
        return load_weights_only(path / META_FILE)


def save_meta(checkpoint: dict, folder: Path) -> None:
    """Lightning's meta.pt (everything but the weights and optimizer states) into `folder`, atomically."""
    with atomic_path(folder / META_FILE) as staging:
        torch.save(checkpoint, staging)


def point_link(link: Path, folder: Path) -> None:
    """Make `link` (last.ckpt, best-stepN.ckpt) a relative symbolic link to `folder`, replacing what was there in one
    rename (a folder of that name, from a run saved before step folders, is deleted first)."""
    if link.is_dir() and not link.is_symlink():
        remove_path(link)
    staging = temporary_path(link)
    remove_path(staging)
    os.symlink(folder.name, staging)
    os.replace(staging, link)
