"""FineTuneModule: instruction following or classification, from a pretrained GPT, fully or through LoRA.

    python -m project finetune fit --config configs/finetune-instruct.yaml --model.init_from runs/.../best.ckpt

The base is a checkpoint of this project or a transformers GPT-2/Llama folder (`init_from`); its architecture and
tokenizer are the fine-tuned model's. Two tasks:

- `instruct`: next-token loss on the responses only (prompt tokens are -100 in the targets, project/chat.py), the
  validation loss and perplexity on responses. The prompt template is stored in the checkpoint and used by
  everything that talks to the model afterwards (generate --chat, predict, serve, the exports).
- `classify`: a linear head (no bias, as transformers' `*ForSequenceClassification.score`) on the hidden state of
  each text's last token; cross-entropy, accuracy per split (torchmetrics, micro: the share of texts right).
  `predict` writes each text's label and class probabilities.

What trains: everything (full fine-tuning), the last `train_last_blocks` blocks and the final norm (and the head), or
low-rank adapters (`lora`, project/lora.py) with the base frozen. The trainable and frozen parameter counts are
logged when training starts. A LoRA checkpoint holds only what trained (the adapters, and a classifier's head) and
names its base by path and SHA-256 (`init_from`, `base_sha256`), which is checked whenever it is loaded.

Checkpoints stay plain: `task`, the template's strings, the LoRA settings and the class names are plain values in
the hyperparameters, so they load with `torch.load(weights_only=True)` and never name a class to import.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from project.chat import IGNORE_INDEX, PromptTemplate, prompt_template
from project.data.finetune import Example, pad
from project.formats.checkpoint import load_model, weights_digest
from project.generate import GenerationSettings, complete_batch
from project.lora import LoRASettings, add_lora, is_lora_key, lora_layers, parameter_counts
from project.model import GPT, GPTConfig, architecture_fields
from project.training.module import GPTModule, PerplexityFromLoss
from project.training.optim import OptimizerSettings

log = logging.getLogger(__name__)

TASKS = ("instruct", "classify")
FINETUNE_OPTIMIZER = OptimizerSettings(learning_rate=1e-4, warmup_steps=10, weight_decay=0.0)


class FineTuneModule(GPTModule):
    """Fine-tunes a pretrained GPT to follow instructions or to classify texts.

    Args:
        task: instruct (responses to prompts, through `template`) or classify (a label per text).
        init_from: the base: a .ckpt or checkpoint folder of this project, or a transformers GPT-2/Llama folder
            (an export, or a downloaded model). Required unless --ckpt_path gives a fine-tuned checkpoint.
        base_sha256: the base's SHA-256 (filled in for LoRA checkpoints, whose weights are the base's; a changed
            base is refused).
        template: instruct: the prompt template, a preset (alpaca, instruct) or its fields.
        lora: train low-rank adapters on a frozen base (null: train the weights themselves).
        classes: classify: the labels, in the head's order (filled in from the training data).
        train_last_blocks: train only the last N blocks and the final norm (and a classifier's head); 0 trains
            the head alone; null trains every weight.
        optimizer: AdamW and its schedule (fine-tuning uses AdamW; Muon is for pretraining).
        generation: sampling settings for `predict` (instruct).
        config: the architecture, always the base's (filled in from init_from or the checkpoint).
        compile: compile the model with torch.compile.
        activation_checkpointing: recompute each block's activations in backward.
    """

    def __init__(
        self,
        task: Literal["instruct", "classify"] = "instruct",
        init_from: str | None = None,
        base_sha256: str | None = None,
        template: str | PromptTemplate = "alpaca",
        lora: LoRASettings | None = None,
        classes: list[str] | None = None,
        train_last_blocks: int | None = None,
        optimizer: OptimizerSettings = FINETUNE_OPTIMIZER,
        generation: GenerationSettings = GenerationSettings(temperature=0.0),
        config: GPTConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"--model.task must be one of {', '.join(TASKS)}, got {task!r}")
        optimizer = OptimizerSettings(**optimizer) if isinstance(optimizer, dict) else optimizer
        lora = LoRASettings(**lora) if isinstance(lora, dict) else lora
        if optimizer.name != "adamw":
            raise ValueError("--model.optimizer.name muon is for pretraining (it orthogonalises whole weight "
                             "matrices); fine-tuning uses adamw")
        if lora is not None and train_last_blocks is not None:
            raise ValueError("--model.lora and --model.train_last_blocks are two ways of training fewer weights: "
                             "choose one")
        base = None
        if init_from is not None:
            base = load_model(init_from)  # a LoRA base comes merged; a classifier is refused with one line
            if base_sha256 is not None and weights_digest(init_from) != base_sha256:
                raise ValueError(f"the base {init_from} changed since this model was fine-tuned from it (its SHA-256 "
                                 "differs): use the base it was trained on, or fine-tune again")
            config = same_architecture(GPTConfig(**config) if isinstance(config, dict) else config,
                                       base.model.config, init_from)
        elif config is None:
            raise ValueError("fine-tuning starts from a base model: pass --model.init_from (a .ckpt of this project "
                             "or a transformers GPT-2/Llama folder), or --ckpt_path with a fine-tuned checkpoint")
        super().__init__(config=config, optimizer=optimizer, compile=compile, generation=generation,
                         activation_checkpointing=activation_checkpointing)
        self.task = task
        self.template = prompt_template(template) if task == "instruct" else None
        self.lora, self.classes, self.train_last_blocks = lora, classes, train_last_blocks
        # the base's weights, until `configure_model` fills the (meta-device) GPT with them
        self.base_weights = None if base is None else {name: p.detach() for name, p in base.model.named_parameters()}
        if base is not None:
            self.tokenizer = base.tokenizer
            if self.template is not None and self.tokenizer.eot_id is None:
                raise ValueError(f"instruction fine-tuning needs a tokenizer with an end-of-text token (where a "
                                 f"response ends); the base's is {self.tokenizer.describe()}: use a gpt2 or bpe:N model")
        if lora is not None:
            base_sha256 = base_sha256 or weights_digest(init_from)
        self.save_hyperparameters({
            "task": task,
            # a LoRA checkpoint holds the adapters only: its weights need the base, named here; other
            # checkpoints hold every weight and depend on nothing
            "init_from": None if lora is None else str(Path(init_from).resolve()),
            "base_sha256": None if lora is None else base_sha256,
            "template": None if self.template is None else self.template.to_dict(),
            "lora": None if lora is None else lora.to_dict(),
            "classes": classes,
            "train_last_blocks": train_last_blocks,
            "optimizer": optimizer.to_dict(),
            "config": asdict(config),
            "compile": compile,
        })
        self.eval_ppl = PerplexityFromLoss()
        self.head: nn.Linear | None = None
        if lora is not None:
            add_lora(self.model, lora)  # freezes the base; on the meta device, like the GPT, until configure_model
            self.strict_loading = False  # its checkpoints hold the adapters (and a head) only
        elif train_last_blocks is not None:
            freeze_all_but_last_blocks(self.model, train_last_blocks)
        if classes is not None:
            self.build_head(classes)

    # --- classification head -------------------------------------------------------------------------------

    def build_head(self, classes: list[str]) -> None:
        """The classifier: a linear map from the last token's hidden state to one logit per class."""
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"a classifier needs two or more distinct classes, got {classes}")
        self.classes = list(classes)
        self.hparams["classes"] = self.classes
        device = "cpu" if self.model.wte.weight.is_meta else self.model.wte.weight.device  # moved with the module
        self.head = nn.Linear(self.config.n_embd, len(classes), bias=False, device=device)
        # micro: the share of texts classified right (torchmetrics' default, macro, averages the classes' recalls)
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(num_classes=len(classes), average="micro")
                                                       for _ in range(3))

    def accuracy(self, split: str) -> MulticlassAccuracy:
        return {"train": self.train_acc, "val": self.val_acc, "test": self.test_acc}[split]

    def optimized_module(self) -> nn.Module:
        return self.model if self.head is None else nn.ModuleDict({"model": self.model, "head": self.head})

    def class_logits(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits from each text's last real token (right padding never reaches it: causal)."""
        hidden = self.model.hidden(ids)  # (B, T, C)
        return self.head(hidden[torch.arange(ids.size(0), device=ids.device), lengths - 1])

    # --- lifecycle -----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Create the weights (GPTModule.configure_model) from the base's (`pretrained_weights`), or seeded when a
        fine-tuned checkpoint's own weights are loaded next; then the LoRA adapters' initial values. Runs once."""
        if not any(p.is_meta for p in self.model.parameters()):
            return
        if self.device_mesh is not None:
            raise ValueError("fine-tuning runs on one device per process (or DDP): drop the tensor-parallel / FSDP2 "
                             "strategy (configs/strategy/tp.yaml)")
        super().configure_model()
        for layer in lora_layers(self.model).values():
            layer.reset_lora_parameters()
        self.base_weights = None

    def pretrained_weights(self):
        return None if self.base_weights is None else self.base_weights.items()

    def setup(self, stage: str) -> None:
        """Classify: the head, from the training data's classes when the model has none yet."""
        datamodule = self.attached_datamodule()
        if self.task == "classify" and self.head is None:
            if datamodule is None or datamodule.classes is None:
                raise ValueError("the classifier's classes come from the training data: fine-tune first (fit)")
            self.build_head(datamodule.classes)

    def on_fit_start(self) -> None:
        # a `Trainer.validate` before `fit` (the loss before fine-tuning) leaves inference-mode tensors in the metrics,
        # which fit's validation (run without inference mode) could not update: start them afresh
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
        trainable, frozen = parameter_counts(self)
        what = ("LoRA adapters" if self.lora is not None else f"the last {self.train_last_blocks} blocks"
                if self.train_last_blocks is not None else "every weight")
        log.info("fine-tuning (%s, %s): %s trainable parameters (%.2f%%), %s frozen", self.task, what,
                 f"{trainable:,}", 100 * trainable / (trainable + frozen), f"{frozen:,}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora is not None:  # the base's weights are the base's: keep what trained
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if is_lora_key(k) or k.startswith("head.")}

    @property
    def flops_per_batch(self) -> None:
        return None  # batches vary in length; tokens/s is still measured

    # --- steps ---------------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.task == "classify":
            ids, lengths, targets = batch
            logits = self.class_logits(ids, lengths)
            loss = F.cross_entropy(logits.float(), targets)
            self.train_acc(logits, targets)
            self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        else:
            x, y = batch
            loss = self.loss(self(x), y)  # cross-entropy skips the -100 targets: the responses' tokens only
        return loss  # logged per interval by StepStats

    def validation_step(self, batch, batch_idx: int, split: str = "val") -> None:
        if self.task == "classify":
            ids, lengths, targets = batch
            logits = self.class_logits(ids, lengths)
            self.eval_loss.update(F.cross_entropy(logits.float(), targets), weight=targets.numel())
            self.accuracy(split).update(logits, targets)
            return
        x, y = batch
        logits = self(x)
        weight = int((y != IGNORE_INDEX).sum())  # response tokens: the mean is over them, not over the batch
        if weight:
            loss = self.loss(logits, y)
            self.eval_loss.update(loss, weight=weight)
            self.eval_ppl.update(loss, weight=weight)

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx, split="test")

    def log_evaluation(self, split: str) -> None:
        if self.task == "classify":
            self.log(f"{split}/loss", self.eval_loss.compute(), prog_bar=split == "val")
            self.log(f"{split}/acc", self.accuracy(split).compute(), prog_bar=split == "val")
            self.eval_loss.reset()
            self.accuracy(split).reset()
            return
        super().log_evaluation(split)

    @torch.inference_mode()
    def predict_step(self, batch: list[Example], batch_idx: int) -> list[dict]:
        if self.task == "classify":
            ids = pad([e.ids for e in batch], 0).to(self.device)
            lengths = torch.tensor([len(e.ids) for e in batch], device=self.device)
            probabilities = self.class_logits(ids, lengths).float().softmax(-1).tolist()
            return [{"line": example.record.line, "text": example.record.text,
                     "label": self.classes[max(range(len(p)), key=p.__getitem__)],
                     "probabilities": dict(zip(self.classes, p)), "reference": example.record.label}
                    for example, p in zip(batch, probabilities)]
        completions = complete_batch(self.model, self.tokenizer, [e.ids for e in batch], self.generation)
        settings = self.generation.to_dict()
        eot = self.tokenizer.eot_text
        return [{"line": example.record.line, **example.record.source,
                 "prompt": self.template.render(example.record.messages, eot),
                 "completion": completion, "settings": settings}
                for example, completion in zip(batch, completions)]


def same_architecture(asked: GPTConfig | None, base: GPTConfig, init_from: str) -> GPTConfig:
    """The base's config (with the asked dropout, a training setting); ValueError if `asked` differs in shape."""
    if asked is None:
        return base
    differ = [f"{name}={getattr(asked, name)!r} (base: {getattr(base, name)!r})" for name in architecture_fields()
              if getattr(asked, name) != getattr(base, name)]
    if differ:
        raise ValueError(f"--model.config differs from the base {init_from}: {', '.join(differ)}. The architecture "
                         "of a fine-tuned model is its base's: drop --model.config")
    return GPTConfig(**{**asdict(base), "dropout": asked.dropout})


def freeze_all_but_last_blocks(model: GPT, count: int) -> None:
    """Freeze `model` except its last `count` blocks and its final norm (the classifier's head is not in it)."""
    if not 0 <= count <= len(model.blocks):
        raise ValueError(f"--model.train_last_blocks must be from 0 to {len(model.blocks)} (the model's blocks), "
                         f"got {count}")
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [model.norm, *model.blocks[len(model.blocks) - count:]]
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)

