"""Loading a trained model (weights, config and tokenizer) from a Lightning checkpoint, safely.

Also reads the transformers directories `python -m project export` writes (through project.formats.hf, which
knows that format both ways). Used by `generate`, `export`, `serve`, the notebooks, and (through
`read_checkpoint`, called by the CLI before Lightning opens the file) by fit/validate/test/predict --ckpt_path.
Distributed (DCP) checkpoint folders written under ModelParallelStrategy (configs/strategy/tp.yaml) are read
too, or consolidated once into a single .ckpt (optimizer state included, so training resumes on one device)
with `python -m project consolidate --ckpt_path DIR --out FILE.ckpt`.

What is trusted: nothing in a file a user points at may run code. Checkpoint files and meta.pt are read with
`torch.load(weights_only=True)` (tensors and plain containers only); DCP folders only through
project.formats.dcp (checked metadata, no fallback, weights-only items); transformers folders from safetensors
and JSON. Then `check_checkpoint` makes the stored config, weights, tokenizer and training state agree, once,
before a model is built or Lightning restores anything.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import types
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from project.chat import PromptTemplate, prompt_template
from project.files import atomic_path, check_new_file
from project.formats.hf import read_hf_directory, read_prompt_template
from project.lora import LoRASettings, add_lora, is_lora_key, merge_lora
from project.model import GPT, GPTConfig
from project.tokenizer import Tokenizer, tokenizer_from_state


@dataclass
class LoadedCheckpoint:
    """A model ready for inference, its tokenizer, and what the checkpoint says about its training."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    global_step: int = 0
    metrics: dict = field(default_factory=dict)  # the latest validation's val/loss, val/bpb..., and "best val/loss"
    split: dict = field(default_factory=dict)  # how training split its corpus (project.data.corpus.Split's fields)
    training_lines: torch.Tensor | None = None  # the training text's fingerprint (project.data.overlap)
    template: PromptTemplate | None = None  # how to prompt an instruction-tuned model (None: a base model)
    lora: LoRASettings | None = None  # set when the model holds unmerged LoRA layers (load_checkpoint(merge=False))
    base: str | None = None  # a LoRA checkpoint's base model (its path)


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def local_path(path: str | Path) -> Path:
    """`path` as a local Path; a URL is refused (Lightning would download it and unpickle it unchecked)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)):
        raise ValueError(f"checkpoint {path} is a URL, which is never read: download it, then pass the local path")
    return Path(path)


def load_weights_only(path: Path) -> object:
    """torch.load(weights_only=True) of a checkpoint file, with one-line errors for an empty file, a Git LFS
    pointer, pickled objects (refused, never loaded) and truncated or foreign bytes."""
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): the copy or the run that wrote it was cut short")
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise ValueError(f"checkpoint {path} is a Git LFS pointer, not the checkpoint: run `git lfs pull` in "
                             "the repository it came from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if refused:
            raise ValueError(f"checkpoint {path} is not a checkpoint of this project: it holds pickled Python "
                             f"objects ({refused.group(1)}), which are never loaded (only tensors and plain values "
                             "are)") from None
        raise ValueError(f"checkpoint {path} is truncated or not a checkpoint of this project "
                         f"({str(err).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(f"checkpoint {path} is truncated or not a checkpoint of this project ({reason})") from None


def read_distributed_checkpoint(path: str | Path, *, optimizer: bool = False, weights: bool = True) -> dict:
    """A DCP folder read back as one single-device Lightning checkpoint: the full weights under "state_dict"
    (and, with `optimizer`, each optimizer's state under "optimizer_states", as a single-device optimizer keys it),
    plus everything else Lightning stored in meta.pt (hyperparameters, tokenizer, step, loops, callbacks).
    Without `weights`, "state_dict" holds meta-device tensors of the stored names, shapes and dtypes, read from the
    folder's index alone: what a check needs, without reading a shard. Read through project.formats.dcp, the one
    reader of DCP folders."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from project.formats.dcp import META_FILE, read_dcp_metadata, read_dcp_state

    path = Path(path)
    metadata = read_dcp_metadata(path)  # checked before any shard or meta.pt is opened
    checkpoint = load_weights_only(path / META_FILE)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path}: {META_FILE} is not a checkpoint of this project")
    if not weights:
        where = {key: metadata.planner_data[key] for key in metadata.state_dict_metadata}  # ("state_dict", name)
        checkpoint["state_dict"] = {
            where[key][1]: torch.empty(item.size, dtype=item.properties.dtype, device="meta")
            for key, item in metadata.state_dict_metadata.items()
            if len(where[key]) == 2 and where[key][0] == "state_dict" and type(item) is TensorStorageMetadata}
        return checkpoint
    state = read_dcp_state(path, metadata, prefix="" if optimizer else "state_dict.")
    checkpoint["state_dict"] = state.get("state_dict", {})
    if optimizer:
        names = [f"optimizer_{i}" for i in range(sum(key.startswith("optimizer_") for key in state))]
        if any(not isinstance(state.get(name), dict) for name in names):
            raise ValueError(f"checkpoint {path} has malformed optimizer states (expected {', '.join(names)})")
        checkpoint["optimizer_states"] = [optimizer_state_by_position(state[name], path) for name in names]
    return checkpoint


def read_checkpoint(path: str | Path, *, optimizer: bool = False, weights: bool = True) -> dict:
    """The raw checkpoint dict of a .ckpt file or DCP folder, read safely (see the module docstring) and checked
    (`check_checkpoint`), with one-line errors for a missing, truncated, foreign or inconsistent one. A DCP
    folder's optimizer state is read only with `optimizer` (a file holds it anyway); without `weights` its
    weights are checked from its index only (names, shapes, dtypes: `read_distributed_checkpoint`), so checking
    a sharded checkpoint on each of many ranks reads no shard."""
    path = local_path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():  # DCP's index file
            raise ValueError(f"folder {path} is not a checkpoint: pass a .ckpt file, a distributed checkpoint folder "
                             "(.metadata + meta.pt) or a folder written by `python -m project export`")
        if not (path / "meta.pt").is_file():
            raise ValueError(f"distributed checkpoint {path} has no meta.pt (hyperparameters, tokenizer): copy the "
                             "whole folder the run wrote")
        checkpoint = read_distributed_checkpoint(path, optimizer=optimizer, weights=weights)
    elif not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass --ckpt_path pointing to a .ckpt written by fit")
    else:
        checkpoint = load_weights_only(path)
    check_checkpoint(checkpoint, path)
    return checkpoint


def check_checkpoint(checkpoint, path: Path) -> None:
    """ValueError unless `checkpoint` is this project's: plain hyperparameters with a model config that builds
    exactly the stored weights, finite weights, a tokenizer of the model's vocabulary, and training state
    (step, callbacks, optimizers, schedulers) of the types Lightning writes. Everything that later reads a
    checkpoint (the model, the tokenizer, Lightning's resume) relies on this one check."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project (no state_dict)")
    config = stored_config(checkpoint, path)
    tuning = fine_tuning(checkpoint["hyper_parameters"], path)
    head = {"head.weight": (len(tuning.classes or ()), config.n_embd)}  # no bias, like transformers' `score`
    foreign = [key for key in checkpoint["state_dict"] if not (isinstance(key, str) and key.startswith("model."))
               and not (tuning.task == "classify" and key in head)]
    if foreign:
        raise ValueError(f"checkpoint {path} holds weights no GPTModule has ({', '.join(map(str, foreign[:3]))})")
    check_weights(model_state_dict(checkpoint), config, path, lora=tuning.lora)
    if tuning.task == "classify":  # a classifier's head reads the final hidden state: one row per class
        for key, shape in head.items():
            tensor = checkpoint["state_dict"].get(key)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                raise ValueError(f"checkpoint {path} is a classifier of {shape[0]} classes whose {key} "
                                 f"{'is missing' if tensor is None else f'is not a {shape} tensor'}: the checkpoint "
                                 "was edited")
    if "tokenizer" in checkpoint:
        try:
            tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
        except ValueError as err:
            raise ValueError(f"checkpoint {path} has an unreadable tokenizer state ({err})") from None
        if not tokenizer.fits_model(config.vocab_size):
            raise ValueError(f"checkpoint {path}: its tokenizer has {tokenizer.vocab_size} tokens but the model "
                             f"{config.vocab_size}: the checkpoint was edited or mixed up with another run's")
    check_training_state(checkpoint, path)


def stored_config(checkpoint: dict, path: Path) -> GPTConfig:
    """The checkpoint's model config (hyper_parameters.config), its values of the types GPTConfig declares."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict):
        raise ValueError(f"checkpoint {path} lacks this project's model config (hyper_parameters.config): pass a "
                         ".ckpt written by fit")
    # "_class_path" and the like tell LightningCLI which class to import and build: this project writes none
    directives = sorted(str(key) for key in hparams if str(key).startswith("_"))
    if directives:
        raise ValueError(f"refusing checkpoint {path}: its hyperparameters carry {', '.join(directives)}, which "
                         "would tell LightningCLI what to import; this project never writes them")
    hints = typing.get_type_hints(GPTConfig)
    for name, value in hparams["config"].items():
        if name not in hints or not value_fits(value, hints[name]):
            raise ValueError(f"checkpoint {path} has an invalid model config: {name}={value!r} is not a "
                             f"{'GPTConfig field' if name not in hints else hints[name]}")
    try:
        return GPTConfig(**hparams["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path} has an invalid model config ({err})") from None


def value_fits(value, hint) -> bool:
    """Whether a plain value matches a type hint of GPTConfig (int, float, bool, str literals, X | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(value_fits(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return type(value) is hint


def check_weights(stored: dict, config: GPTConfig, path: Path, lora: LoRASettings | None = None) -> None:
    """The stored weights are exactly the tensors `config` builds (names and shapes; with `lora`, the adapters
    alone: the other weights are the base's), and finite."""
    with torch.device("meta"), WithoutInitialisation():  # shapes only: no memory, no random numbers
        model = GPT(config)
        if lora is not None:
            add_lora(model, lora)
        expected = model.state_dict()
    for key, tensor in stored.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"checkpoint {path}: weight {key} is a {type(tensor).__name__}, not a tensor")
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"checkpoint {path} does not match its stored config: {key} is {tuple(tensor.shape)}, "
                             f"the config (vocab_size={config.vocab_size}, block_size={config.block_size}, "
                             f"n_embd={config.n_embd}) makes it {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in stored and not (k == "lm_head.weight" and config.tie_embeddings)]
    if lora is not None:  # a LoRA checkpoint holds the adapters; the other weights are its base's
        missing = [k for k in missing if is_lora_key(k)]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its stored config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for key, tensor in stored.items():
        if not tensor.is_floating_point():
            raise ValueError(f"checkpoint {path}: weight {key} holds {tensor.dtype} values, not floating point")
        if tensor.is_meta:
            continue  # read from a DCP index only: values unread (each rank loads its own shards later)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"checkpoint {path}: weight {key} holds NaN or infinite values (training diverged "
                             "before it was saved): use an earlier checkpoint")


def is_optimizer_state(state) -> bool:
    """A torch optimizer's state_dict ({"state": ..., "param_groups": [...]}), or the Muon + AdamW pair's
    (project.training.optim.CombinedOptimizer: {"optimizers": [each one's]})."""
    if isinstance(state, dict) and set(state) == {"optimizers"}:
        return isinstance(state["optimizers"], list) and all(is_optimizer_state(s) for s in state["optimizers"])
    return (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list))


def check_training_state(checkpoint: dict, path: Path) -> None:
    """Lightning's own entries, when present, have the types Lightning writes (a hand-edited or foreign one
    would fail deep inside Lightning's restore or our readers)."""
    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def is_table(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items())

    checks = {
        "global_step": is_count, "epoch": is_count, "loops": lambda v: isinstance(v, dict), "callbacks": is_table,
        "optimizer_states": lambda v: isinstance(v, list) and all(is_optimizer_state(s) for s in v),
        "lr_schedulers": lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v),
        "bytes_per_token": lambda v: isinstance(v, dict) and all(
            isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 for n in v.values()),
    }
    for key, check in checks.items():
        if key in checkpoint and not check(checkpoint[key]):
            raise ValueError(f"checkpoint {path} has a malformed {key!r} entry (not what Lightning writes): the file "
                             "was edited; use the checkpoint as the run wrote it")
    for key, state in (checkpoint.get("callbacks") or {}).items():
        score = state.get("best_model_score")
        if key.startswith("ModelCheckpoint") and score is not None and not (
                isinstance(score, (int, float, torch.Tensor)) and torch.as_tensor(score).numel() == 1):
            raise ValueError(f"checkpoint {path} has a malformed best_model_score in {key}")


class WithoutInitialisation(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init's random fills while a model is built for its shapes: on the meta device they run
    torch's reference implementations, whose first use imports torch's compiler (seconds of every command's start)."""

    SKIPPED = {torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
               torch.nn.init.trunc_normal_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """GPT weights from a GPTModule checkpoint: strip `model.` and any torch.compile `_orig_mod.` prefix."""
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("model."):
            state[key.removeprefix("model.").replace("_orig_mod.", "")] = value
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *, merge: bool = True) -> LoadedCheckpoint:
    """Rebuild the GPT and tokenizer stored in a checkpoint written by `python -m project fit` (or `finetune fit`).

    A LoRA checkpoint is loaded onto its base (checked by SHA-256) and, with `merge`, merged into a plain GPT;
    without, the model keeps its LoRA layers (`LoadedCheckpoint.lora` set). A classifier is refused: it answers
    with labels, through `python -m project finetune predict`.
    """
    device = resolve_device(device)
    checkpoint = read_checkpoint(path)  # checked: the config builds exactly these weights
    if "tokenizer" not in checkpoint:
        raise ValueError(f"checkpoint {path} lacks its tokenizer: pass a .ckpt written by fit")
    tuning = fine_tuning(checkpoint["hyper_parameters"], path)
    if tuning.task == "classify":
        raise ValueError(f"checkpoint {path} is a classifier (task=classify), which answers with labels: use python "
                         f"-m project finetune predict --ckpt_path {path} --data.predict_path FILE")
    config = GPTConfig(**checkpoint["hyper_parameters"]["config"])
    tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    if tuning.lora is not None:
        model = load_base(tuning, path).model
        add_lora(model, tuning.lora)
    else:
        model = GPT(config)
    model.load_state_dict(model_state_dict(checkpoint), strict=False)  # a tied lm_head.weight (or the base's) only
    if tuning.lora is not None and merge:
        model = merge_lora(model)
    model.to(device).eval()
    stored = checkpoint.get("metrics") if isinstance(checkpoint.get("metrics"), dict) else {}  # GPTModule's
    metrics = {k: float(v) for k, v in stored.items() if isinstance(v, (int, float))}  # last val/loss, val/bpb...
    for key, cb_state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and cb_state.get("best_model_score") is not None:
            metrics[f"best {cb_state.get('monitor') or 'score'}"] = float(cb_state["best_model_score"])
    text = checkpoint.get("training_text") if isinstance(checkpoint.get("training_text"), dict) else {}
    lines = text.get("lines")
    lines = lines if isinstance(lines, torch.Tensor) and lines.dtype == torch.int64 and lines.dim() == 1 else None
    split = {k: float(v) for k, v in text["split"].items() if k in ("val_fraction", "test_fraction")
             and isinstance(v, (int, float))} if isinstance(text.get("split"), dict) else {}
    return LoadedCheckpoint(model, tokenizer, Path(path), checkpoint.get("global_step", 0), metrics, split, lines,
                            template=tuning.template, lora=None if merge else tuning.lora, base=tuning.init_from)


# --- fine-tuned checkpoints ------------------------------------------------------------------------------------


@dataclass
class FineTuning:
    """What a fine-tuned checkpoint's hyperparameters say (all None for a pretrained model's)."""

    task: str | None = None  # "instruct" or "classify"
    template: PromptTemplate | None = None
    lora: LoRASettings | None = None  # the checkpoint holds LoRA adapters for the base below
    classes: list[str] | None = None
    init_from: str | None = None  # a LoRA checkpoint's base
    base_sha256: str | None = None


def fine_tuning(hparams: dict, path: Path | str) -> FineTuning:
    """The fine-tuning fields of checked hyperparameters; ValueError naming the field when one is malformed."""
    task = hparams.get("task")
    if task not in (None, "instruct", "classify"):
        raise ValueError(f"checkpoint {path} has an unknown task {task!r}: this project fine-tunes instruct or classify")
    try:
        template = None if hparams.get("template") is None else prompt_template(hparams["template"])
        lora = None if hparams.get("lora") is None else LoRASettings(**hparams["lora"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path} has invalid fine-tuning settings ({err})") from None
    classes = hparams.get("classes")
    if task == "classify" and not (isinstance(classes, list) and len(classes) >= 2
                                   and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"checkpoint {path} is a classifier without its class names (hyper_parameters.classes)")
    if task == "instruct" and template is None:
        raise ValueError(f"checkpoint {path} is instruction-tuned but has no prompt template")
    init_from, digest = hparams.get("init_from"), hparams.get("base_sha256")
    if lora is not None and not (isinstance(init_from, str) and isinstance(digest, str)):
        raise ValueError(f"checkpoint {path} holds LoRA adapters but does not name its base (init_from, base_sha256)")
    return FineTuning(task, template, lora, classes, init_from, digest)


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a checkpoint file, or of every file in a folder (names and bytes, in name order): what a LoRA
    checkpoint records of its base, so a changed base is noticed."""
    path = local_path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_base(tuning: FineTuning, path: Path | str) -> LoadedCheckpoint:
    """The base model of a LoRA checkpoint (merged, if it is a LoRA checkpoint itself), checked to be the one the
    adapters were trained on."""
    base = local_path(tuning.init_from)
    if not base.exists():
        raise FileNotFoundError(f"the base of LoRA checkpoint {path}, {base}, does not exist: put it back there, or "
                                "merge the adapters while it exists (python -m project merge-lora)")
    if weights_digest(base) != tuning.base_sha256:
        raise ValueError(f"the base of LoRA checkpoint {path}, {base}, changed since the adapters were trained on it "
                         "(its SHA-256 differs): restore that base, or fine-tune again")
    return load_model(base)


def save_merged(path: str | Path, out: str | Path) -> Path:
    """Merge a LoRA checkpoint's adapters into its base and write a self-contained checkpoint (weights, the
    tokenizer, the task and template; no optimizer state) that needs the base no more."""
    target = Path(out)
    if target.exists():
        raise FileExistsError(f"{target} exists; choose another --out or remove it")
    checkpoint = read_checkpoint(path)
    tuning = fine_tuning(checkpoint["hyper_parameters"], path)
    if tuning.lora is None:
        raise ValueError(f"checkpoint {path} holds no LoRA adapters: it is complete already")
    if tuning.task == "classify":
        raise ValueError(f"checkpoint {path} is a classifier: merging keeps its head outside transformers' formats; "
                         "use it through python -m project finetune predict")
    loaded = load_checkpoint(path)
    hparams = {**checkpoint["hyper_parameters"], "lora": None, "init_from": None, "base_sha256": None}
    merged = {"state_dict": {f"model.{k}": v for k, v in loaded.model.state_dict().items()},
              "hyper_parameters": hparams, "tokenizer": checkpoint["tokenizer"],
              "global_step": checkpoint.get("global_step", 0)}
    with atomic_path(target) as staging:
        torch.save(merged, staging)
    return target


def consolidate_checkpoint(*, ckpt_path: str, out: str) -> Path:
    """Turn a distributed (DCP) checkpoint folder into one single-device .ckpt file, and return its path.

    The file holds everything the folder does, gathered into full tensors: weights, optimizer state,
    LR schedule and loop state, hyperparameters and tokenizer. So `predict --ckpt_path`, `generate` and
    `export` use it on one device, and `fit --ckpt_path FILE` resumes the training on one device (which
    `fit --ckpt_path DIR` also does, reading the folder the same way).

    Args:
        ckpt_path: a checkpoint folder written under ModelParallelStrategy (configs/strategy/tp.yaml).
        out: the .ckpt file to write; an existing file is never overwritten.
    """
    path = local_path(ckpt_path)
    if not (path.is_dir() and (path / ".metadata").is_file()):
        raise ValueError(f"{ckpt_path} is not a distributed checkpoint folder (with .metadata and meta.pt)")
    target = check_new_file(out, "--out")
    checkpoint = read_checkpoint(path, optimizer=True)
    with atomic_path(target) as staging:
        torch.save(checkpoint, staging)
    return target


def optimizer_state_by_position(state: dict, path: Path) -> dict:
    """An optimizer state dict keyed by parameter names, as ModelParallelStrategy saves it, in torch's own
    format (keyed by each parameter's position in the param groups), which `Optimizer.load_state_dict` reads."""
    per_parameter = state.get("state", {})  # DCP stores no empty dict: an optimizer that never stepped has none
    groups_ok = isinstance(state.get("param_groups"), list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(n, str) for n in g["params"])
        for g in state["param_groups"])
    if not groups_ok or not isinstance(per_parameter, dict):
        raise ValueError(f"checkpoint {path} has a malformed optimizer state (param_groups without parameter names)")
    names = [name for group in state["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(names)}
    if not set(per_parameter) <= set(position):
        raise ValueError(f"checkpoint {path} has optimizer state for parameters its param_groups do not list")
    groups = []
    for group in state["param_groups"]:
        # sharded runs turn fused/foreach kernels off; let the resumed single-device optimizer choose again
        group = {k: v for k, v in group.items() if k not in ("fused", "foreach")}
        group["params"] = [position[name] for name in group["params"]]
        groups.append(group)
    return {"state": {position[name]: value for name, value in per_parameter.items()}, "param_groups": groups}


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this machine has, or a one-line ValueError naming one it has."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(resolved.type, False):
        raise ValueError(f"--device {device}: this machine has no such device: use --device cpu")
    return resolved


def load_model(path: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """A .ckpt file or distributed checkpoint folder, or a transformers directory written by
    `python -m project export` (read by project.formats.hf)."""
    path = local_path(path)
    exported = any((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
    if path.is_dir() and not (path / ".metadata").exists() and exported:
        device = resolve_device(device)
        model, tokenizer = read_hf_directory(path)
        return LoadedCheckpoint(model.to(device), tokenizer, path, template=read_prompt_template(path))
    return load_checkpoint(path, device=device)
