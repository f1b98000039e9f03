"""LightningCLI for fit/validate/test/predict: the always-on callbacks, argument links and checkpoint checks.

    python -m project fit --config configs/shakespeare.yaml      (any Trainer flag: --trainer.devices 2 ...)
    python -m project predict --config configs/shakespeare.yaml --ckpt_path runs/.../last.ckpt

project/commands.py dispatches to `run_lightning` and turns the errors raised here into one-line messages.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning.pytorch.callbacks import ModelCheckpoint

from project.data.datamodule import TextDataModule
from project.formats.checkpoint import read_checkpoint
from project.model import GPTConfig, architecture_fields
from project.tokenizer import spec_kind
from project.training.checkpointing import LatestCheckpoint
from project.training.module import VAL_LOSS, GPTModule
from project.training.monitoring import TextSampleCallback, TokenThroughput
from project.training.nan_guard import NonFiniteLossGuard
from project.training.optim import OptimizerSettings
from project.training.predictions import PredictionWriter

log = logging.getLogger(__name__)

PROG = "python -m project"  # the name usage lines show (the `gpt` script runs the same commands)


class OneLineErrorParser(LightningArgumentParser):
    """Argument errors end stderr with one line (`error: Parser key "model.config.n_layer": Expected ...`),
    for LightningCLI's commands and the project's own alike."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(" ".join(str(message).split()), ex)


class GPTCLI(LightningCLI):
    """LightningCLI with the project's always-on callbacks and the data -> model argument links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_callbacks(parser)
        parser.add_lightning_class_args(TextSampleCallback, "samples")
        # the vocabulary is known by the data (tokenizer); the context length by the model
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("model.config.block_size", "data.block_size")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Then check the Trainer flags, put runs under --trainer.default_root_dir, resolve `--ckpt_path last`
        and check the checkpoint, before LightningCLI applies its hyperparameters (and before Lightning opens it)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        check_trainer_flags(config.trainer)
        place_runs_under_root_dir(config)
        if not config.get("ckpt_path"):
            return
        if config.get("weights_only") is False:
            raise ValueError("--weights_only false would let the checkpoint run code when unpickled: this project "
                             "loads weights only; drop the flag")
        if config.ckpt_path == "last":
            resolve_last_checkpoint(config)
        # a missing, truncated, foreign or crafted file: one-line error here, before anything is built
        self.checkpoint = read_checkpoint(config.ckpt_path)
        self.check_checkpoint(config, subcommand)
        if subcommand == "fit":
            check_resume_settings(config, self.checkpoint, config.ckpt_path)
        self.compile = config.model.get("compile")  # a resume may switch it: re-applied after the checkpoint's

    def check_checkpoint(self, config, subcommand: str) -> None:
        """ValueError unless the checkpoint is a pretrained model this config can use (fine-tuned ones are
        `python -m project finetune`'s)."""
        task = self.checkpoint["hyper_parameters"].get("task")
        if task is not None:
            raise ValueError(f"checkpoint {config.ckpt_path} is fine-tuned (task={task}): use python -m project "
                             f"finetune {subcommand} --ckpt_path {config.ckpt_path} (generate, serve and export "
                             "take it as it is)")
        check_architecture(config, self.checkpoint, config.ckpt_path)
        check_tokenizer(config, self.checkpoint, config.ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Show training progress in steps (StepProgressBar); add the callbacks every run has."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        add_step_progress_bar(config.trainer)
        add_callback(config.trainer, "project.training.run_folder.RunFolderGuard")  # one writer; no empty folder
        add_callback(config.trainer, "project.training.checkpointing.RandomState")  # dropout resumes exactly
        if getattr(self, "compile", None) is not None:
            config.model.compile = self.compile
        self.vocabulary_from_checkpoint(config)

    def vocabulary_from_checkpoint(self, config) -> None:
        """A character model's vocabulary comes from its checkpoint, so resuming or predicting needs no corpus;
        so does a `bpe:N` model's tokenizer when predicting."""
        ckpt_path = config.get("ckpt_path")
        if config.data.vocabulary or not ckpt_path or not Path(ckpt_path).is_file():
            return
        predicting_bpe = config.data.tokenizer.startswith("bpe:") and self.subcommand == "predict"
        if config.data.tokenizer != "char" and not predicting_bpe:
            return
        checkpoint = getattr(self, "checkpoint", None) or read_checkpoint(ckpt_path)
        state = checkpoint.get("tokenizer", {})
        if state.get("kind") == "char" and config.data.tokenizer == "char":
            config.data.vocabulary = state["chars"]
        elif state.get("kind") == "bpe" and config.data.tokenizer != "char":
            config.data.vocabulary = state["tokenizer_json"]


def add_run_callbacks(parser: LightningArgumentParser) -> None:
    """The callbacks of every run, each configurable from YAML or flags (--last_checkpoint.every_n_train_steps 500):
    the best checkpoint by val/loss and last.ckpt beside it (project/training/checkpointing.py), learning rates,
    tokens/s, predict's writer and the NaN guard."""
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults({
        "checkpoint.monitor": VAL_LOSS, "checkpoint.mode": "min", "checkpoint.save_top_k": 1,
        "checkpoint.filename": "best-step{step}", "checkpoint.auto_insert_metric_name": False,
    })
    parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")
    parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
    parser.set_defaults({"lr_monitor.logging_interval": "step"})
    parser.add_lightning_class_args(TokenThroughput, "throughput")
    parser.add_lightning_class_args(PredictionWriter, "predictions")
    parser.add_lightning_class_args(NonFiniteLossGuard, "nan_guard")  # --nan_guard.action stop|skip


def add_step_progress_bar(trainer_config) -> None:
    """Add StepProgressBar to the Trainer's callbacks unless the bar is off or the config chose one."""
    callbacks = trainer_config.get("callbacks") or []
    if not isinstance(callbacks, list):
        callbacks = [callbacks]
    chosen = any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)
    if trainer_config.get("enable_progress_bar") is False or chosen:
        return
    add_callback(trainer_config, "project.training.monitoring.StepProgressBar")


def add_callback(trainer_config, class_path: str) -> None:
    """Append a callback (by class path, no arguments) to the Trainer's callbacks of a config."""
    callbacks = trainer_config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    trainer_config.callbacks = [*callbacks, Namespace(class_path=class_path, init_args=Namespace())]


def check_architecture(config, checkpoint: dict, ckpt_path: str) -> None:
    """ValueError when the config sets an architecture value (`architecture_fields`) other than the checkpoint's.

    A value equal to GPTConfig's default counts as not set: LightningCLI then takes the checkpoint's (it
    would also replace a value that is set, silently, which is why this check exists).
    """
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(saved, dict):
        return
    defaults = GPTConfig()
    for key in architecture_fields():
        asked = config.get(f"model.config.{key}")
        if key not in saved or asked is None or asked == saved[key] or asked == getattr(defaults, key):
            continue  # not set (or linked from the data, as vocab_size), or the checkpoint's value
        if key == "block_size" and asked > saved[key]:
            raise ValueError(
                f"--model.config.block_size {asked} is larger than the context of checkpoint {ckpt_path} "
                f"({saved[key]}): use block_size <= {saved[key]}, or train a longer-context model"
            )
        raise ValueError(
            f"checkpoint {ckpt_path} has a different architecture: {key}={saved[key]}, the config asks for "
            f"{key}={asked}: use the config the checkpoint was trained with (its run's config.yaml)"
        )


def check_trainer_flags(trainer) -> None:
    """One-line errors for Trainer flags Lightning would reject with a traceback (or a division by zero)."""
    accelerator = str(trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"--trainer.accelerator {accelerator}: this machine has no CUDA GPU: use "
                         "--trainer.accelerator cpu (or auto)")
    devices = trainer.get("devices")
    count = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()) else None
    if count is not None and (count == 0 or count < -1):
        raise ValueError(f"--trainer.devices must be a positive number, -1 (every device), auto or a list of "
                         f"device ids, got {devices}")
    if trainer.get("max_steps") is not None and trainer.max_steps < -1:
        raise ValueError(f"--trainer.max_steps must be >= 0, or -1 for no limit, got {trainer.max_steps}")
    accumulate = trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise ValueError(f"--trainer.accumulate_grad_batches must be >= 1, got {accumulate}")


def logger_init_args(config):
    """The init_args of the (first) logger in a subcommand's config, or None."""
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger.get("init_args") if hasattr(logger, "get") else None


def place_runs_under_root_dir(config) -> None:
    """--trainer.default_root_dir DIR: runs go to DIR/runs/<name>/version_N (the logger's default "runs" is
    relative to it), where `--ckpt_path last` looks for them too. Lightning applies the root dir only when
    no logger is configured, and this CLI always configures one."""
    root = config.trainer.get("default_root_dir")
    init = logger_init_args(config)
    if root and init is not None and init.get("save_dir") == "runs":
        init.save_dir = str(Path(root) / "runs")


def check_tokenizer(config, checkpoint: dict, ckpt_path: str) -> None:
    """ValueError when --data.tokenizer names another kind of tokenizer than the checkpoint's (its vocabulary is
    fixed). A trained BPE (bpe:N or a tokenizer folder) may be named either way: the checkpoint carries it."""
    state = checkpoint.get("tokenizer")
    if not isinstance(state, dict) or config.data.get("streaming_dir"):
        return  # a streaming folder brings its own tokenizer
    asked = config.data.tokenizer
    saved = {"char": "char", "bpe": "bpe:N (or its tokenizer folder)"}.get(state.get("kind"), state.get("name"))
    same = spec_kind(asked) == state.get("kind") and (state.get("kind") != "tiktoken" or asked == state.get("name"))
    if not same:
        raise ValueError(f"--data.tokenizer {asked} differs from the tokenizer of checkpoint {ckpt_path} ({saved}), "
                         f"whose vocabulary is fixed: pass --data.tokenizer {saved} (its run's config.yaml has "
                         "every setting)")


def check_resume_settings(config, checkpoint: dict, ckpt_path: str) -> None:
    """ValueError when `fit --ckpt_path` asks for optimizer settings other than the checkpoint's.

    A resume restores the optimizer and its LR schedule, so it cannot change them (LightningCLI would replace new
    values with the checkpoint's without a word). It can change every Trainer flag (max_steps, precision, devices,
    ...), the data loading (batch_size, num_workers), the callbacks and --model.compile.
    """
    saved = (checkpoint.get("hyper_parameters") or {}).get("optimizer") or {}
    asked = config.model.get("optimizer") or {}
    defaults = OptimizerSettings().to_dict()
    for name in (f.name for f in fields(OptimizerSettings)):
        value = asked.get(name)
        value = list(value) if isinstance(value, tuple) else value  # betas: a tuple in the config, a list stored
        if name not in saved or value is None or value in (saved[name], defaults[name]):
            continue  # not set, or the checkpoint's value
        raise ValueError(f"--model.optimizer.{name} {value} differs from checkpoint {ckpt_path} ({saved[name]}): a "
                         "resume restores the optimizer and its schedule, so it keeps the checkpoint's; drop the flag "
                         "to resume, or start a new run (a resume can change Trainer flags, data loading, callbacks "
                         "and --model.compile)")


def resolve_last_checkpoint(config) -> None:
    """`--ckpt_path last`: the newest last.ckpt of this logger name (runs/<name>/version_*/checkpoints).

    Lightning's own "last" looks in the new run's (empty) version folder; this one finds the interrupted run,
    and sets the logger's version to it so the resumed run's curves continue in the same folder.
    """
    dirpath = config.get("checkpoint.dirpath")
    init = logger_init_args(config)
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
    log.info("resuming from %s", newest)


class FinetuneCLI(GPTCLI):
    """`python -m project finetune fit|validate|test|predict`: FineTuneModule and FineTuneDataModule, with the same
    callbacks, run folders and checkpoint checks as the other commands. The architecture, tokenizer and context
    come from the base model (--model.init_from), so nothing is linked from the data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_callbacks(parser)

    def check_checkpoint(self, config, subcommand: str) -> None:
        if self.checkpoint["hyper_parameters"].get("task") is None:
            raise ValueError(f"checkpoint {config.ckpt_path} is not fine-tuned: fine-tune it with --model.init_from "
                             f"{config.ckpt_path} (--ckpt_path resumes or evaluates a fine-tuned checkpoint)")

    def vocabulary_from_checkpoint(self, config) -> None:
        pass  # the tokenizer is the base's, or the checkpoint's


def trainer_defaults(run_name: str) -> dict:
    """The Trainer settings of every run: TensorBoard under runs/<run_name>, clipping, atomic checkpoint files."""
    return {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": run_name}},
        "gradient_clip_val": 1.0,
        "plugins": [{"class_path": "project.training.checkpointing.AtomicCheckpointIO"}],  # files written atomically
    }


def run_lightning(args: list[str] | None) -> None:
    """fit/validate/test/predict with `args` (None: LightningCLI reads sys.argv)."""
    GPTCLI(
        GPTModule,
        TextDataModule,
        args=args,
        trainer_defaults=trainer_defaults("gpt"),
        save_config_kwargs={"overwrite": True},
        parser_class=OneLineErrorParser,
        parser_kwargs={"default_env": False, "prog": PROG},
    )


def run_finetune(args: list[str]) -> None:
    """`finetune fit|validate|test|predict` with `args` (project/training/finetune.py)."""
    from project.data.finetune import FineTuneDataModule
    from project.training.finetune import FineTuneModule

    FinetuneCLI(
        FineTuneModule,
        FineTuneDataModule,
        args=args,
        trainer_defaults=trainer_defaults("finetune"),
        save_config_kwargs={"overwrite": True},
        parser_class=OneLineErrorParser,
        parser_kwargs={"default_env": False, "prog": f"{PROG} finetune"},
    )
