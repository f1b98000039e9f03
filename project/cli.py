"""Command line: LightningCLI for fit/validate/test/predict, plus the project's own commands.

    python -m project fit --config configs/shakespeare.yaml      (any Trainer flag: --trainer.devices 2 ...)
    python -m project predict --config configs/shakespeare.yaml --ckpt_path runs/.../last.ckpt
    python -m project generate --ckpt_path runs/.../last.ckpt --prompt "ROMEO:" --stream true
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from jsonargparse import ArgumentParser, auto_cli
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from project.checkpoint import consolidate_checkpoint, read_checkpoint
from project.callbacks import (GPTCheckpoint, NonFiniteLossGuard, PredictionWriter, TextSampleCallback,
                               TokenThroughputMonitor)
from project.data import TextDataModule, train_tokenizer
from project.hf import export_command
from project.app import serve_command  # imports gradio only when the app is built
from project.module import VAL_LOSS, GPTModule
from project.streaming import prepare_corpus  # imports litdata only when it runs

# errors that carry a message meant for the user: printed as one line, exit status 1
USER_ERRORS = (ValueError, ConnectionError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


class OneLineErrorParser(LightningArgumentParser):
    """Argument errors end stderr with one line (`error: Parser key "model.config.n_layer": Expected ...`)."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(" ".join(str(message).split()), ex)


class OneLineCommandParser(ArgumentParser):
    """The same one-line argument errors for generate/export/serve/consolidate."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(" ".join(str(message).split()), ex)


class GPTCLI(LightningCLI):
    """LightningCLI with the project's always-on callbacks and the data -> model argument links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # each of these is configurable from YAML or flags, e.g. --checkpoint.last_every_n_steps 500
        # (ModelCheckpoint + periodic last.ckpt, atomic writes, save on Ctrl-C: project/callbacks.py)
        parser.add_lightning_class_args(GPTCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": VAL_LOSS, "checkpoint.mode": "min", "checkpoint.save_top_k": 1,
            "checkpoint.save_last": True, "checkpoint.filename": "best-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(TextSampleCallback, "samples")
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nan_guard")  # --nan_guard.action stop|skip
        # the vocabulary is known by the data (tokenizer); the context length by the model
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("model.config.block_size", "data.block_size")

    def _parse_ckpt_path(self) -> None:
        """Resolve `--ckpt_path last`, check the checkpoint, then let LightningCLI apply its hyperparameters."""
        subcommand = self.config.get("subcommand")
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        config = self.config[subcommand]
        if config.ckpt_path == "last":
            resolve_last_checkpoint(config)
        # a missing, truncated or foreign file: one-line error here, before anything is built
        self._checkpoint = read_checkpoint(config.ckpt_path)
        defaults = self.parser._subcommands_action._name_parser_map[subcommand].get_defaults()
        check_architecture(config, defaults, self._checkpoint, config.ckpt_path)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """A character model's vocabulary comes from its checkpoint, so resuming or predicting needs no corpus;
        so does a `bpe:N` model's tokenizer when predicting."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if config.data.vocabulary or not ckpt_path or not Path(ckpt_path).is_file():
            return
        predicting_bpe = config.data.tokenizer.startswith("bpe:") and self.subcommand == "predict"
        if config.data.tokenizer != "char" and not predicting_bpe:
            return
        checkpoint = getattr(self, "_checkpoint", None) or read_checkpoint(ckpt_path)
        state = checkpoint.get("tokenizer", {})
        if state.get("kind") == "char" and config.data.tokenizer == "char":
            config.data.vocabulary = state["chars"]
        elif state.get("kind") == "bpe" and config.data.tokenizer != "char":
            config.data.vocabulary = state["tokenizer_json"]


# GPTConfig fields that shape the weights: a config asking for other values than the checkpoint's is an error
# (LightningCLI would otherwise replace them silently with the checkpoint's)
ARCHITECTURE_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "bias", "positions", "norm", "mlp",
                     "mlp_hidden", "tie_embeddings")


def check_architecture(config, defaults, checkpoint: dict, ckpt_path: str) -> None:
    """ValueError when the config explicitly sets an architecture value that differs from the checkpoint's."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(saved, dict):
        return
    for key in ARCHITECTURE_KEYS:
        asked, default = config.get(f"model.config.{key}"), defaults.get(f"model.config.{key}")
        if key not in saved or asked == saved[key] or asked == default:
            continue  # matches, or not set by the user (LightningCLI then takes the checkpoint's)
        if key == "block_size" and asked > saved[key]:
            raise ValueError(
                f"--model.config.block_size {asked} is larger than the context of checkpoint {ckpt_path} "
                f"({saved[key]}): use block_size <= {saved[key]}, or train a longer-context model"
            )
        raise ValueError(
            f"checkpoint {ckpt_path} has a different architecture: {key}={saved[key]}, the config asks for "
            f"{key}={asked}: use the config the checkpoint was trained with (its run's config.yaml)"
        )


def resolve_last_checkpoint(config) -> None:
    """`--ckpt_path last`: the newest last.ckpt of this logger name (runs/<name>/version_*/checkpoints).

    Lightning's own "last" looks in the new run's (empty) version folder; this one finds the interrupted run,
    and sets the logger's version to it so the resumed run's curves continue in the same folder.
    """
    dirpath = config.get("checkpoint.dirpath")
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if dirpath:
        candidates = [Path(dirpath) / "last.ckpt"]
    elif init is not None and init.get("save_dir") is not None and init.get("name") is not None:
        candidates = list(Path(init.save_dir, init.name).glob("version_*/checkpoints/last.ckpt"))
    else:
        root = config.trainer.get("default_root_dir") or "."
        candidates = [Path(root) / "checkpoints" / "last.ckpt"]
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        where = dirpath or (Path(init.save_dir, init.name, "version_*", "checkpoints") if init else "checkpoints")
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt under {where}: train first (without --ckpt_path), "
            "or pass --ckpt_path path/to/file.ckpt"
        )
    newest = max(candidates, key=lambda p: (p.stat().st_mtime, p.parent.parent.name))
    config.ckpt_path = str(newest)
    version = newest.parent.parent.name.removeprefix("version_")
    if not dirpath and init is not None and "version" in init and version.isdigit():
        init.version = int(version)  # log into the resumed run's folder (its checkpoints dir included)
    print(f"resuming from {newest}", file=sys.stderr)


def run_lightning(args: list[str] | None) -> None:
    GPTCLI(
        GPTModule,
        TextDataModule,
        args=args,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "gpt"}},
            "gradient_clip_val": 1.0,
        },
        save_config_kwargs={"overwrite": True},
        parser_class=OneLineErrorParser,
        parser_kwargs={"default_env": False},
    )


def generate_command(
    *,
    ckpt_path: str,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    stream: bool = False,
    device: str = "cpu",
) -> None:
    """Generate text from a checkpoint and print it (as it is produced with --stream true).

    Args:
        ckpt_path: a .ckpt written by `python -m project fit`, a distributed checkpoint folder, or a
            transformers directory written by `python -m project export`.
        prompt: text to continue.
        max_new_tokens: tokens to generate at most.
        temperature: 0 = greedy; lower is more conservative.
        top_k: sample among the k most likely tokens (None = all).
        top_p: sample within this much probability mass (None = all).
        seed: fix the random choices for reproducible text.
        stop: stop at any of these strings.
        stream: print text as it is generated.
        device: torch device, e.g. cpu or cuda.
    """
    from project.checkpoint import load_model
    from project.generate import GenerationSettings, stream as stream_text

    loaded = load_model(ckpt_path, device=device)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed, stop=stop or [])
    pieces = stream_text(loaded.model, loaded.tokenizer, prompt, settings)
    first = next(pieces, "")  # checks the prompt and settings before anything is printed
    sys.stdout.write(prompt + first)
    for piece in pieces:
        sys.stdout.write(piece)
        if stream:
            sys.stdout.flush()
    sys.stdout.write("\n")


def train_tokenizer_command(*, path: str, out: str, vocab_size: int = 4096) -> None:
    """Train a byte-level BPE tokenizer on a text file, for `--data.tokenizer OUT`.

    Args:
        path: the UTF-8 corpus to learn the merges from (train on training text only, not validation).
        out: the folder to create (it holds tokenizer.json); it must not exist.
        vocab_size: tokens in the vocabulary: 256 bytes + end-of-text + merges (257 to 65536).
    """
    tokenizer = train_tokenizer(path, vocab_size, out)
    print(f"trained a byte-level BPE of {tokenizer.vocab_size} tokens on {path} -> {out} "
          f"(use --data.tokenizer {out})")


# the project's own commands, beside LightningCLI's fit/validate/test/predict
COMMANDS: dict[str, Callable[..., None]] = {
    "generate": generate_command,
    "export": export_command,  # checkpoint -> Hugging Face transformers directory (project/hf.py)
    "consolidate": consolidate_checkpoint,  # DCP folder (ModelParallelStrategy) -> single .ckpt
    "serve": serve_command,  # Gradio app: generate with streaming, attention view (project/app.py)
    "prepare": prepare_corpus,  # folder of .txt/.parquet -> litdata token chunks for --data.streaming_dir
    "train-tokenizer": train_tokenizer_command,  # text file -> byte-level BPE folder for --data.tokenizer
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m project`."""
    words = sys.argv[1:] if argv is None else argv
    try:
        if words and words[0] in COMMANDS:
            auto_cli(COMMANDS[words[0]], args=words[1:], prog=f"python -m project {words[0]}",
                     parser_class=OneLineCommandParser)
        else:
            run_lightning(argv)  # None: LightningCLI reads sys.argv itself
    except USER_ERRORS as err:
        if os.environ.get("PROJECT_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
