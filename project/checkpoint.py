"""Loading a trained model (weights, config and tokenizer) from a Lightning checkpoint, safely.

Also reads the transformers directories `python -m project export` writes (through project.hf, which
knows that format both ways). Checkpoints are read with `torch.load(weights_only=True)`: only tensors and plain containers, never
pickled code. Used by `generate`, `export`, `serve` and the notebooks. Distributed (DCP) checkpoint folders
written under ModelParallelStrategy (configs/strategy/tp.yaml) are read too, or consolidated once into a
single .ckpt (optimizer state included, so training resumes on one device) with
`python -m project consolidate --ckpt_path DIR --out FILE.ckpt`.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from project.hf import read_hf_directory
from project.model import GPT, GPTConfig
from project.tokenizer import Tokenizer, tokenizer_from_state


@dataclass
class LoadedCheckpoint:
    """A model ready for inference, its tokenizer, and what the checkpoint says about its training."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    global_step: int = 0
    metrics: dict = field(default_factory=dict)  # e.g. best val/loss recorded by ModelCheckpoint


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A DCP folder as ModelParallelStrategy writes it: tensor shards + .metadata + Lightning's meta.pt."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def read_distributed_checkpoint(path: str | Path) -> dict:
    """A DCP folder read back as one single-device checkpoint dict: the full model weights (no optimizer
    state) under "state_dict", plus everything else Lightning stored (hyperparameters, tokenizer, step)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    reader = dcp.FileSystemReader(path)
    weights = {  # DCP flattens nested keys with dots: "state_dict.model.wte.weight"
        key.removeprefix("state_dict."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)
    }
    state = {"state_dict": weights}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)  # gathers every shard into the full tensors
    checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, with one-line errors for a missing, truncated or foreign file."""
    path = Path(path)
    if is_distributed_checkpoint(path):
        return read_distributed_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass --ckpt_path pointing to a .ckpt written by fit")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0][:200]
        raise ValueError(f"checkpoint {path} is truncated or not a checkpoint of this project ({reason})") from None


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """GPT weights from a GPTModule checkpoint: strip `model.` and any torch.compile `_orig_mod.` prefix."""
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("model."):
            state[key.removeprefix("model.").replace("_orig_mod.", "")] = value
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the GPT and tokenizer stored in a checkpoint written by `python -m project fit`."""
    checkpoint = read_checkpoint(path)
    try:
        config = GPTConfig(**checkpoint["hyper_parameters"]["config"])
        tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {path} lacks this project's model config or tokenizer ({err!r})") from None
    model = GPT(config)
    missing, unexpected = model.load_state_dict(model_state_dict(checkpoint), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_embeddings]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval()
    metrics = {}
    for key, cb_state in checkpoint.get("callbacks", {}).items():
        if key.startswith(("ModelCheckpoint", "GPTCheckpoint")) and cb_state.get("best_model_score") is not None:
            metrics[cb_state.get("monitor") or "best"] = float(cb_state["best_model_score"])
    return LoadedCheckpoint(model, tokenizer, Path(path), checkpoint.get("global_step", 0), metrics)


def consolidate_checkpoint(*, ckpt_path: str, out: str) -> Path:
    """Turn a distributed (DCP) checkpoint folder into one single-device .ckpt file, and return its path.

    The file holds everything the folder does, gathered into full tensors: weights, optimizer state,
    LR schedule and loop state, hyperparameters and tokenizer. So `predict --ckpt_path`, `generate` and
    `export` use it on one device, and `fit --ckpt_path FILE` resumes the training on one device.

    Args:
        ckpt_path: a checkpoint folder written under ModelParallelStrategy (configs/strategy/tp.yaml).
        out: the .ckpt file to write; an existing file is never overwritten.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not is_distributed_checkpoint(ckpt_path):
        raise ValueError(f"{ckpt_path} is not a distributed checkpoint folder (with .metadata and meta.pt)")
    target = Path(out)
    if target.exists():
        raise FileExistsError(f"{target} exists; choose another --out or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        dcp_to_torch_save(ckpt_path, tmp)  # every shard gathered: {"state_dict": ..., "optimizer_0": ...}
        tensors = torch.load(tmp, map_location="cpu", weights_only=True)
        checkpoint = torch.load(Path(ckpt_path) / "meta.pt", map_location="cpu", weights_only=True)
        checkpoint["state_dict"] = tensors.pop("state_dict")
        n_optimizers = sum(key.startswith("optimizer_") for key in tensors)
        checkpoint["optimizer_states"] = [optimizer_state_by_position(tensors[f"optimizer_{i}"])
                                          for i in range(n_optimizers)]
        torch.save(checkpoint, tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def optimizer_state_by_position(state: dict) -> dict:
    """An optimizer state dict keyed by parameter names, as ModelParallelStrategy saves it, in torch's own
    format (keyed by each parameter's position in the param groups), which `Optimizer.load_state_dict` reads."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(names)}
    groups = []
    for group in state["param_groups"]:
        # sharded runs turn fused/foreach kernels off; let the resumed single-device optimizer choose again
        group = {k: v for k, v in group.items() if k not in ("fused", "foreach")}
        group["params"] = [position[name] for name in group["params"]]
        groups.append(group)
    return {"state": {position[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def load_model(path: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """A .ckpt file or distributed checkpoint folder, or a transformers directory written by
    `python -m project export` (read by project.hf)."""
    path = Path(path)
    if path.is_dir() and not is_distributed_checkpoint(path) and (path / "config.json").is_file():
        model, tokenizer = read_hf_directory(path)
        return LoadedCheckpoint(model.to(device), tokenizer, path)
    return load_checkpoint(path, device=device)
