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
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy

from project.formats.checkpoint import load_weights_only
from project.formats.dcp import META_FILE, load_dcp, read_dcp_metadata


class ShardedStrategy(ModelParallelStrategy):
    """ModelParallelStrategy (a device mesh of data_parallel_size x tensor_parallel_size) whose checkpoint loading
    goes through project.formats.dcp; every argument is ModelParallelStrategy's."""

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
        options = StateDictOptions(cpu_offload=True)
        state = {"state_dict": get_model_state_dict(module, options=options),
                 **{f"optimizer_{i}": get_optimizer_state_dict(module, optimizer, options=options)
                    for i, optimizer in enumerate(self.optimizers)}}
        load_dcp(state, path, metadata)  # fills `state` in place, resharded to this run's layout
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=module.strict_loading))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[f"optimizer_{i}"], options=options)
        # load_model_state_dict / load_optimizer_state_dict are no-ops in this strategy: the rest is Lightning's
        return load_weights_only(path / META_FILE)
