"""LightningCLI for fit/validate/test/predict: the always-on callbacks, argument links and checkpoint checks.

    python -m project fit --config configs/shakespeare.yaml      (any Trainer flag: --trainer.devices 2 ...)
    python -m project predict --config configs/shakespeare.yaml --ckpt_path runs/.../last.ckpt

project/commands.py dispatches to `run_lightning` and turns the errors raised here into one-line messages.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only

from project.commands import PROG, OneLineErrors
from project.data.datamodule import TextDataModule
from project.formats.checkpoint import read_checkpoint
from project.formats.runs import CHECKPOINTS, WHICH, checkpoint_in, find_checkpoint
from project.model import GPTConfig
from project.threads import configure_threads
from project.tokenizer import BPETokenizer, bpe_vocab_size, is_tokenizer_folder, spec_kind, tokenizer_from_state
from project.training.checkpointing import AtomicCheckpointIO, LatestCheckpoint
from project.training.module import VAL_LOSS, GPTModule
from project.training.monitoring import TextSampleCallback, TokenThroughput
from project.training.nan_guard import NonFiniteLossGuard
from project.training.optim import MUON_SHARDED_ERROR, OptimizerSettings
from project.training.predictions import PredictionWriter
from project.training.run_folder import claim_next_version, remove_unsaved_run
from project.training.strategy import ShardedStrategy

log = logging.getLogger(__name__)

# the settings a checkpoint gives defaults for (`checkpoint_settings`), settled against it before anything is built
SETTLED_KEYS = ("model", "data.tokenizer", "data.vocabulary", "data.block_size")


class OneLineErrorParser(OneLineErrors, LightningArgumentParser):
    """Argument errors end stderr with one line (`error: Parser key "model.config.n_layer": Expected ...`),
    after one usage line (the options are in --help), for LightningCLI's commands as for the project's own."""


class GPTCLI(LightningCLI):
    """LightningCLI with the project's always-on callbacks and the data -> model argument links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_callbacks(parser)
        parser.add_lightning_class_args(TextSampleCallback, "samples")
        # the vocabulary is known by the data (tokenizer); the context length by the model
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("model.config.block_size", "data.block_size")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Then check the Trainer flags, put runs under --trainer.default_root_dir, resolve `--ckpt_path last`,
        read and check the checkpoint, and settle the run's settings against it (`settle_with_checkpoint`): all
        before anything is built or written."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        check_trainer_flags(config.trainer)
        check_sharded_optimizer(config)
        place_runs_under_root_dir(config)
        if not config.get("ckpt_path"):
            return
        if config.get("weights_only") is False:
            raise ValueError("--weights_only false would let the checkpoint run code when unpickled: this project "
                             "loads weights only; drop the flag")
        if config.ckpt_path in WHICH:
            resolve_named_checkpoint(config, subcommand)
        # a missing, truncated, foreign or crafted checkpoint: one-line error here, before anything is built
        checkpoint = read_checkpoint(config.ckpt_path, weights=False)  # a DCP folder: its index, not its shards
        self.settle(parser, args, subcommand, config, checkpoint)

    def settle(self, parser: LightningArgumentParser, args, subcommand: str, config, checkpoint: dict) -> None:
        """A pretrained model's checkpoint (fine-tuned ones are `python -m project finetune`'s): its settings become
        the defaults, so config files and flags are what differs from it (`settle_with_checkpoint`)."""
        task = checkpoint["hyper_parameters"].get("task")
        if task is not None:
            raise ValueError(f"checkpoint {config.ckpt_path} is fine-tuned (task={task}): use python -m project "
                             f"finetune {subcommand} --ckpt_path {config.ckpt_path} (generate, serve and export "
                             "take it as it is)")
        parser.set_defaults({f"{subcommand}.{key}": value for key, value in checkpoint_settings(checkpoint).items()})
        given = parser.parse_args(args)[subcommand]
        for key in SETTLED_KEYS:
            config[key] = given[key]
        settle_with_checkpoint(subcommand, config, checkpoint, config.ckpt_path)
        # LightningCLI applies a checkpoint file's hyperparameters over these next: kept to be put back
        self.settled = {key: config[key] for key in SETTLED_KEYS}

    def before_instantiate_classes(self) -> None:
        """Set torch's threads (`configure_threads`), show training progress in steps (StepProgressBar), claim a new
        fit's run folder, and put back the settings settled against the checkpoint (LightningCLI has just applied the
        checkpoint's hyperparameters over them)."""
        configure_threads()  # here, once the command line parsed: a mistyped flag gets only its error
        config = self.config[self.subcommand] if self.subcommand else self.config
        add_step_progress_bar(config.trainer)
        self.claimed = claim_run_folder(config) if self.subcommand == "fit" else None
        # one writer per run folder; none left behind by a run that fails before its first checkpoint
        add_callback(config.trainer, "project.training.run_folder.RunFolderGuard",
                     {"claimed": str(self.claimed)} if self.claimed else None)
        add_callback(config.trainer, "project.training.checkpointing.RandomState")  # dropout resumes exactly
        add_callback(config.trainer, "project.training.step_stats.StepStats")  # one host sync per logging interval
        add_callback(config.trainer, "project.training.monitoring.LearningRates")  # train/lr, train/lr_muon
        add_callback(config.trainer, "project.training.interrupt.GracefulInterrupt")  # Ctrl-C: all ranks stop alike
        if self.subcommand == "fit":
            add_callback(config.trainer, "project.training.report.RunReport")  # what `fit` says at its start and end
        else:
            # validate/test/predict print their results (and predict writes JSON lines beside the checkpoint's run):
            # a TensorBoard folder of their own would be a newer, checkpoint-less version_N beside the training run
            config.trainer.logger = False
            self.save_config_callback = None
            # these commands never write a checkpoint, so where the training run's ModelCheckpoint wrote (stored in
            # the checkpoint, relative to where it ran) does not matter; Lightning warns that it differs from ours
            warnings.filterwarnings("ignore", message="The dirpath has changed from", category=UserWarning)
        for key, value in getattr(self, "settled", {}).items():
            config[key] = value

    def instantiate_classes(self) -> None:
        """Build the model, data, callbacks and Trainer; a failure here removes the version folder claimed for it."""
        try:
            super().instantiate_classes()
        except BaseException:
            if getattr(self, "claimed", None) is not None:
                remove_unsaved_run(self.claimed)
            raise

    def instantiate_trainer(self, **kwargs):
        """The Trainer, once its strategy is known to read `--ckpt_path` safely (`check_checkpoint_reader`)."""
        trainer = super().instantiate_trainer(**kwargs)
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt_path:
            check_checkpoint_reader(trainer.strategy, ckpt_path)
        return trainer


def add_run_callbacks(parser: LightningArgumentParser) -> None:
    """The callbacks of every run, each configurable from YAML or flags (--last_checkpoint.every_n_train_steps 500):
    the best checkpoint by val/loss and last.ckpt beside it (project/training/checkpointing.py), tokens/s,
    predict's writer and the NaN guard."""
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults({
        "checkpoint.monitor": VAL_LOSS, "checkpoint.mode": "min", "checkpoint.save_top_k": 1,
        "checkpoint.filename": "best-step{step}", "checkpoint.auto_insert_metric_name": False,
    })
    parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")
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


def add_callback(trainer_config, class_path: str, init_args: dict | None = None) -> None:
    """Append a callback (by class path) to the Trainer's callbacks of a config."""
    callbacks = trainer_config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    trainer_config.callbacks = [*callbacks, Namespace(class_path=class_path, init_args=Namespace(**(init_args or {})))]


@rank_zero_only  # other ranks get None: Lightning broadcasts rank 0's folder to them
def claim_run_folder(config) -> Path | None:
    """A new run's version folder, claimed now (`claim_next_version`) and set as the logger's version, so runs
    started together in one folder never share one. None when the version is set (a resume), no logger writes, or
    this is another rank's process (Lightning broadcasts rank 0's folder to them)."""
    init = logger_init_args(config)
    if init is None or init.get("version", False) is not None or None in (init.get("save_dir"), init.get("name")):
        return None
    folder = claim_next_version(Path(init.save_dir, init.name))
    init.version = int(folder.name.removeprefix("version_"))
    return folder


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


def check_sharded_optimizer(config) -> None:
    """Muon under ModelParallelStrategy: refused here, before any process is launched (`MUON_SHARDED_ERROR`)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = config.trainer.get("strategy")
    class_path = str(getattr(strategy, "class_path", strategy))
    module_name, _, class_name = class_path.rpartition(".")
    try:
        strategy_class = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError):
        return  # not a class path (e.g. "ddp"), or one LightningCLI reports itself
    optimizer = config.model.get("optimizer") or {}
    sharded = isinstance(strategy_class, type) and issubclass(strategy_class, ModelParallelStrategy)
    if sharded and optimizer.get("name") == "muon":
        raise ValueError(MUON_SHARDED_ERROR)


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


def checkpoint_settings(checkpoint: dict) -> dict:
    """The settings a checkpoint fixes, by config key: its model config (but vocab_size, which the tokenizer
    gives), optimizer settings, compile, and its tokenizer (--data.tokenizer and --data.vocabulary)."""
    hparams = checkpoint["hyper_parameters"]
    config = GPTConfig(**hparams["config"]).to_dict()  # checked by read_checkpoint; fields it lacks at their defaults
    settings = {f"model.config.{key}": value for key, value in config.items() if key != "vocab_size"}
    optimizer = hparams.get("optimizer") if isinstance(hparams.get("optimizer"), dict) else {}
    settings.update({f"model.optimizer.{f.name}": optimizer[f.name] for f in fields(OptimizerSettings)
                     if f.name in optimizer})
    if isinstance(hparams.get("compile"), bool):
        settings["model.compile"] = hparams["compile"]
    state = checkpoint.get("tokenizer")
    if isinstance(state, dict):
        tokenizer = tokenizer_from_state(state)  # checked by read_checkpoint
        settings["data.tokenizer"] = {"char": "char", "bpe": f"bpe:{tokenizer.vocab_size}"}.get(tokenizer.kind,
                                                                                              state.get("name"))
        settings["data.vocabulary"] = {"char": state.get("chars"), "bpe": state.get("tokenizer_json")}.get(tokenizer.kind)
    return settings


def settle_with_checkpoint(subcommand: str, config, checkpoint: dict, ckpt_path: str) -> None:
    """Compare the run's settings (the checkpoint's, as overridden by config files and flags) with the checkpoint.

    What the checkpoint fixes (architecture, tokenizer, and for `fit` the optimizer and its schedule, which it
    restores) must be the checkpoint's: ValueError listing every difference. What may change is applied and,
    for `fit`, logged and recorded in the new checkpoints' hyperparameters: dropout, --model.compile, a shorter
    block_size (the windows shrink; the model keeps its context), Trainer flags, data loading and callbacks.
    Optimizer settings and dropout do nothing in validate/test/predict.
    """
    saved = checkpoint_settings(checkpoint)
    refused, applied = [], []
    for key, value in saved.items():
        asked = config.get(key)
        if key.startswith("data.") or plain(asked) == plain(value):
            continue
        flag = f"--{key} {plain(asked)} (the checkpoint's: {plain(value)})"  # where a config file sets it too
        if key == "model.config.block_size" and asked > value:
            refused.append(f"--model.config.block_size {asked}, larger than its context ({value})")
        elif key == "model.config.block_size":
            config.model.config.block_size = value  # the weights' context; data.block_size keeps the asked one
            applied.append(f"windows of {asked} tokens (the model's context stays {value})")
        elif key in ("model.config.dropout", "model.compile"):
            applied.append(flag)
        elif key.startswith("model.optimizer.") and subcommand != "fit":
            continue  # no optimizer runs: nothing differs
        else:
            refused.append(flag)
    refused += tokenizer_differences(config, checkpoint)
    if refused:
        run_config = Path(ckpt_path).parent.parent / "config.yaml"
        hint = f"pass its run's config (--config {run_config})" if run_config.is_file() else "drop those settings"
        raise ValueError(
            f"settings differ from checkpoint {ckpt_path}: {'; '.join(refused)}. "
            + ("A resume restores the architecture, tokenizer and optimizer with its schedule, so they cannot "
               "change; it can change dropout, --model.compile, a shorter block_size, Trainer flags, data loading "
               "and callbacks" if subcommand == "fit" else "Its architecture and tokenizer cannot change")
            + f"; {hint}, or start a new run")
    if subcommand == "fit" and applied:
        log.info("changed from the checkpoint: %s", ", ".join(applied))


def plain(value):
    """A setting's value for comparison and messages: tuples as lists (betas are a tuple in one, a list in the other)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def tokenizer_differences(config, checkpoint: dict) -> list[str]:
    """How the run's tokenizer (--data.tokenizer, --data.vocabulary, or a streaming folder's) differs from the
    checkpoint's, whose vocabulary the model's rows are: one phrase per difference."""
    state = checkpoint.get("tokenizer")
    if not isinstance(state, dict):
        return []
    saved = tokenizer_from_state(state)
    if config.data.get("streaming_dir"):  # the folder's own tokenizer, whatever --data.tokenizer says
        from project.data.streaming import read_record

        folder = tokenizer_from_state(read_record(config.data.streaming_dir).tokenizer)
        same = folder.state_dict() == saved.state_dict()
        return [] if same else [f"--data.streaming_dir {config.data.streaming_dir}, prepared with {folder.describe()} "
                                f"(the checkpoint's tokenizer: {saved.describe()})"]
    asked = config.data.tokenizer
    phrase = f"--data.tokenizer {asked} (the checkpoint's: {saved.describe()})"
    if spec_kind(asked) != saved.kind or (saved.kind == "tiktoken" and asked != state.get("name")):
        return [phrase]
    if saved.kind == "bpe" and is_tokenizer_folder(asked):
        return [] if BPETokenizer.from_dir(asked).spec == saved.spec else [f"{phrase}: another tokenizer.json"]
    if saved.kind == "bpe" and bpe_vocab_size(asked) < saved.vocab_size:
        return [phrase]
    vocabulary = {"char": state.get("chars"), "bpe": state.get("tokenizer_json")}.get(saved.kind)
    if vocabulary is not None and config.data.get("vocabulary") != vocabulary:
        return [f"--data.vocabulary (the checkpoint's is that of {saved.describe()})"]
    return []


def check_checkpoint_reader(strategy, ckpt_path: str) -> None:
    """ValueError unless the Trainer's strategy reads `ckpt_path` through this project's safe readers: ShardedStrategy
    (DCP folders through project.formats.dcp), or a strategy that leaves reading to the AtomicCheckpointIO plugin.
    Others (plain ModelParallelStrategy, FSDP, DeepSpeed) would hand a DCP folder to torch's default reader."""
    if isinstance(strategy, ShardedStrategy):
        return
    if type(strategy).load_checkpoint is Strategy.load_checkpoint and isinstance(strategy.checkpoint_io,
                                                                                 AtomicCheckpointIO):
        return
    raise ValueError(f"--trainer.strategy {type(strategy).__name__} (with {type(strategy.checkpoint_io).__name__}) "
                     f"would read checkpoint {ckpt_path} with a loader that unpickles it unchecked: use "
                     "configs/strategy/tp.yaml (project.training.strategy.ShardedStrategy), ddp or one device, and "
                     "keep project.training.checkpointing.AtomicCheckpointIO in --trainer.plugins")


def resolve_named_checkpoint(config, subcommand: str) -> None:
    """`--ckpt_path last|best`: that checkpoint of the newest run of this config's logger (project.formats.runs:
    for a sharded run, `last` is its newest complete step folder), or, with --checkpoint.dirpath, in that folder.

    Lightning's own "last" looks in the new run's (empty) version folder; this one finds the newest run, and for
    `fit` sets the logger's version to it, so the resumed run's curves and checkpoints continue in the same folder.
    """
    which = config.ckpt_path
    dirpath = config.get("checkpoint.dirpath")
    init = logger_init_args(config)
    if dirpath:
        path = checkpoint_in(Path(dirpath), which)
    elif init is not None and init.get("save_dir") is not None and init.get("name") is not None:
        path = find_checkpoint(which, init.save_dir, init.name)
    else:  # no logger: ModelCheckpoint writes to <default_root_dir>/checkpoints
        path = checkpoint_in(Path(config.trainer.get("default_root_dir") or ".") / CHECKPOINTS, which)
    config.ckpt_path = str(path)
    version = path.parent.parent.name.removeprefix("version_") if path.parent.name == CHECKPOINTS else ""
    if subcommand == "fit" and not dirpath and init is not None and "version" in init and version.isdigit():
        init.version = int(version)  # log into the resumed run's folder (its checkpoints dir included)
    log.info("%s %s", "resuming from" if subcommand == "fit" else "checkpoint:", path)


class FinetuneCLI(GPTCLI):
    """`python -m project finetune fit|validate|test|predict`: FineTuneModule and FineTuneDataModule, with the same
    callbacks, run folders and checkpoint checks as the other commands. The architecture, tokenizer and context
    come from the base model (--model.init_from), so nothing is linked from the data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_callbacks(parser)

    def settle(self, parser: LightningArgumentParser, args, subcommand: str, config, checkpoint: dict) -> None:
        """A fine-tuned checkpoint only: it carries its task, template, classes and base, which LightningCLI
        applies as the model's settings."""
        if checkpoint["hyper_parameters"].get("task") is None:
            raise ValueError(f"checkpoint {config.ckpt_path} is not fine-tuned: fine-tune it with --model.init_from "
                             f"{config.ckpt_path} (--ckpt_path resumes or evaluates a fine-tuned checkpoint)")


def trainer_defaults(run_name: str) -> dict:
    """The Trainer settings of every run: TensorBoard under runs/<run_name>, clipping, atomic checkpoint files."""
    return {
        "logger": {"class_path": "project.training.monitoring.RunLogger",
                   "init_args": {"save_dir": "runs", "name": run_name}},
        "gradient_clip_val": 1.0,
        "plugins": [{"class_path": "project.training.checkpointing.AtomicCheckpointIO"}],  # files written atomically
        "enable_model_summary": False,  # RunReport's start line says the size; Lightning's table mis-sizes bf16
    }



def quiet_library_noise() -> None:
    """Silence, narrowly, what Lightning and torch print on every run that a user can do nothing about."""
    # Lightning 2.6's own pytree helper builds torch's LeafSpec, which torch 2.13 deprecates (fixed in Lightning,
    # not by anything a user of this project changes)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # Lightning advertises its cloud logger at the start of every run
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropAdvert) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(DropAdvert())


class DropAdvert(logging.Filter):
    """Drops Lightning's "💡 Tip: ... litlogger" line (a product advert, not information about the run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def run_lightning(args: list[str] | None, descriptions: dict[str, str] | None = None) -> Trainer:
    """fit/validate/test/predict with `args` (None: LightningCLI reads sys.argv); returns the Trainer.

    `descriptions`: the text each subcommand's --help opens with.
    """
    return run_cli(GPTCLI, GPTModule, TextDataModule, "gpt", args, prog=PROG, descriptions=descriptions)


def run_finetune(args: list[str] | None) -> Trainer:
    """`finetune fit|validate|test|predict` with `args` (None: sys.argv), project/training/finetune.py; returns the
    Trainer."""
    from project.data.finetune import FineTuneDataModule
    from project.training.finetune import FineTuneModule

    return run_cli(FinetuneCLI, FineTuneModule, FineTuneDataModule, "finetune", args, prog=f"{PROG} finetune")


def run_cli(cli_class: type[LightningCLI], module_class, datamodule_class, run_name: str, args: list[str] | None,
            *, prog: str, descriptions: dict[str, str] | None = None) -> Trainer:
    """One LightningCLI run with the project's parser, defaults and quiet libraries; returns the Trainer."""
    quiet_library_noise()
    return cli_class(
        module_class,
        datamodule_class,
        args=args,
        trainer_defaults=trainer_defaults(run_name),
        save_config_kwargs={"overwrite": True},
        parser_class=OneLineErrorParser,
        parser_kwargs={"default_env": False, "prog": prog,
                       **{name: {"description": text} for name, text in (descriptions or {}).items()}},
    ).trainer
