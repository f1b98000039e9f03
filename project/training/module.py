"""GPTModule: the LightningModule that trains, evaluates and samples a GPT."""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from project.generate import GenerationSettings, complete_batch
from project.model import GPT, GPTConfig
from project.tokenizer import Tokenizer, tokenizer_from_state
from project.training.optim import OptimizerSettings, build_optimizer

TRAIN_LOSS, VAL_LOSS, VAL_PPL, VAL_BPB = "train/loss", "val/loss", "val/ppl", "val/bpb"


class GPTModule(LightningModule):
    """Next-token language modelling on top of `project.model.GPT`.

    Args:
        config: the model architecture (vocab_size is linked from the data module by the CLI).
        optimizer: the optimizer and its learning-rate schedule (`--model.optimizer.*`).
        compile: compile the model with torch.compile (pays on GPUs; measured not to on small CPU runs).
        generation: sampling settings for `predict` and the text samples logged during training.
        activation_checkpointing: recompute each block's activations in backward (less memory, more compute).
        init_from: a local transformers GPT-2/Llama directory whose weights initialise the model; its
            architecture must match config (block_size may be shorter). Not stored in the hyperparameters, so
            checkpoints never depend on that directory.
    """

    def __init__(
        self,
        config: GPTConfig,
        optimizer: OptimizerSettings = OptimizerSettings(),
        compile: bool = False,
        generation: GenerationSettings = GenerationSettings(),
        activation_checkpointing: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        config = GPTConfig(**config) if isinstance(config, dict) else config
        optimizer = OptimizerSettings(**optimizer) if isinstance(optimizer, dict) else optimizer
        generation = GenerationSettings(**generation) if isinstance(generation, dict) else generation
        # plain dicts, so checkpoints load with torch.load(weights_only=True). Sampling settings are left
        # out: LightningCLI applies checkpoint hyperparameters over the command line when --ckpt_path is set
        self.save_hyperparameters({"config": asdict(config), "optimizer": optimizer.to_dict(), "compile": compile})
        self.config, self.optimizer_settings, self.generation = config, optimizer, generation
        self.model = GPT(config)
        self.model.activation_checkpointing = activation_checkpointing
        if init_from is not None:
            from project.formats.hf import load_hf_weights

            load_hf_weights(self.model, init_from)  # ValueError naming the HF config when it does not match
        self.tokenizer: Tokenizer | None = None  # from the data module, or restored from a checkpoint
        self.bytes_per_token: dict[str, float] = {}  # per evaluation split, for bits per byte
        self.eval_loss = MeanMetric()
        self.eval_ppl = Perplexity()

    # --- lifecycle -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # ModelParallelStrategy: tensor parallel + FSDP2, project/training/parallel.py
            from project.training.parallel import parallelize

            parallelize(self.model, self.device_mesh, compile=self.hparams.compile)
            return
        if self.hparams.compile:
            self.model.compile()  # in place: parameter names (and checkpoint keys) stay unprefixed

    def attached_datamodule(self):
        """The Trainer's data module, or None (no Trainer attached, or no data module)."""
        try:
            return getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            return None

    def setup(self, stage: str) -> None:
        datamodule = self.attached_datamodule()
        if datamodule is not None and stage in ("fit", "validate", "test"):
            self.tokenizer = datamodule.tokenizer
            splits = ("val",) if stage != "test" else ("test",)
            self.bytes_per_token.update({split: datamodule.bytes_per_token(split) for split in splits})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state_dict()
        if self.bytes_per_token:
            checkpoint["bytes_per_token"] = dict(self.bytes_per_token)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "tokenizer" in checkpoint:
            self.tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
        self.bytes_per_token.update(checkpoint.get("bytes_per_token") or {})

    @property
    def flops_per_batch(self) -> int | None:
        """Training FLOPs of one batch, read by the throughput monitor for MFU."""
        datamodule = self.attached_datamodule()
        if datamodule is None:
            return None
        tokens = datamodule.batch_size * datamodule.block_size
        return self.model.flops_per_token(datamodule.block_size) * tokens

    # --- steps ---------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats; logits (B, T, V) are already aligned with targets (B, T)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log(TRAIN_LOSS, loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.eval_loss.update(self.loss(logits, y), weight=y.numel())
        self.eval_ppl.update(logits.float(), y)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def log_evaluation(self, split: str) -> None:
        """Log <split>/loss, <split>/ppl and <split>/bpb (bits per byte of the text) for the epoch, then reset."""
        loss = self.eval_loss.compute()  # already reduced over ranks: torchmetrics syncs its states
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        self.log(f"{split}/ppl", self.eval_ppl.compute())
        if self.bytes_per_token.get(split):
            # nats/token -> bits/token -> bits/byte of the original text: comparable across tokenizers
            self.log(f"{split}/bpb", loss / math.log(2) / self.bytes_per_token[split], prog_bar=split == "val")
        self.eval_loss.reset()
        self.eval_ppl.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict]:
        """Complete each prompt of the batch with the `generation` settings."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer: predict from a checkpoint (--ckpt_path) written by `fit`")
        completions = complete_batch(self.model, self.tokenizer, batch, self.generation)
        settings = self.generation.to_dict()
        return [{"prompt": p, "completion": c, "settings": settings} for p, c in zip(batch, completions)]

    # --- optimisation --------------------------------------------------------------------------------

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.device_mesh is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            from project.training.parallel import clip_grad_norm_  # sharded and replicated gradients mixed

            clip_grad_norm_(self.model.parameters(), gradient_clip_val)
            return
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # no loss scaling (bf16-mixed, 32-true): the gradients are the true ones, so clip them here. Lightning's
            # MixedPrecision refuses to clip for a fused optimizer even under bf16-mixed, where it has no scaler
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimized_module(self) -> torch.nn.Module:
        """The module whose trainable parameters the optimizer updates: the GPT (fine-tuning adds a head)."""
        return self.model

    def configure_optimizers(self):
        # a loss scaler (fp16 "16-mixed") unscales before clipping; a fused AdamW would unscale inside its own
        # step, and Lightning refuses to clip gradients for such an optimizer
        loss_scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        optimizer, scheduler = build_optimizer(
            self.optimized_module(), self.optimizer_settings, total_steps=self.trainer.estimated_stepping_batches,
            fused=self.device.type in ("cuda", "cpu") and not loss_scaled, sharded=self.device_mesh is not None,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
