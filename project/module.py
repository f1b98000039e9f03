"""GPTModule: the LightningModule that trains, evaluates and samples a GPT."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from project.generate import GenerationSettings, complete_batch
from project.model import GPT, GPTConfig
from project.optim import build_optimizer
from project.tokenizer import Tokenizer, tokenizer_from_state

TRAIN_LOSS, VAL_LOSS, VAL_PPL, VAL_BPB = "train/loss", "val/loss", "val/ppl", "val/bpb"


def check_optimizer_values(*, learning_rate: float, muon_lr: float, min_lr_ratio: float, warmup_steps: int,
                           weight_decay: float) -> None:
    """ValueError naming the flag for a value the optimizer or its schedule cannot do what was meant with."""
    for name, value in (("learning_rate", learning_rate), ("muon_lr", muon_lr)):
        if not 0 < value < float("inf"):
            raise ValueError(f"--model.{name} must be a positive number, got {value}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"--model.min_lr_ratio must be in [0, 1] (a fraction of the peak), got {min_lr_ratio}")
    if warmup_steps < 0:
        raise ValueError(f"--model.warmup_steps must be >= 0 (0 = no warmup), got {warmup_steps}")
    if not weight_decay >= 0:
        raise ValueError(f"--model.weight_decay must be >= 0, got {weight_decay}")


class GPTModule(LightningModule):
    """Next-token language modelling on top of `project.model.GPT`.

    Args:
        config: the model architecture (vocab_size is linked from the data module by the CLI).
        learning_rate: peak AdamW learning rate after warmup.
        min_lr_ratio: the cosine schedule's floor, as a fraction of the peak.
        warmup_steps: linear warmup steps.
        weight_decay: AdamW decay on weight matrices and embeddings (never on biases and norms).
        betas: AdamW betas.
        optimizer: "adamw" for every parameter, or "muon": torch.optim.Muon for the blocks' weight matrices
            (attention q/k/v/proj, MLP fc/gate/proj) and AdamW (learning_rate, weight_decay) for embeddings,
            the LM head, norms and biases, as the modded-nanogpt speedruns do. Both follow the same schedule.
        muon_lr: Muon's peak learning rate (Keller Jordan's "original" shape scaling, sqrt(max(1, rows/cols))).
        muon_momentum: Muon's (Nesterov) momentum.
        muon_weight_decay: Muon's decoupled weight decay (multiplied by its learning rate, like AdamW's).
        compile: compile the model with torch.compile (pays on GPUs; measured not to on small CPU runs).
        generation: sampling settings for `predict` and the text samples logged during training.
        activation_checkpointing: recompute each block's activations in backward (under ModelParallelStrategy).
        init_from: a local transformers GPT-2/Llama directory whose weights initialise the model; its
            architecture must match config (block_size may be shorter). Not stored in the hyperparameters, so
            checkpoints never depend on that directory.
    """

    def __init__(
        self,
        config: GPTConfig,
        learning_rate: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        compile: bool = False,
        generation: GenerationSettings | None = None,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        config = GPTConfig(**config) if isinstance(config, dict) else config
        check_optimizer_values(learning_rate=learning_rate, muon_lr=muon_lr, min_lr_ratio=min_lr_ratio,
                               warmup_steps=warmup_steps, weight_decay=weight_decay)
        generation = GenerationSettings(**generation) if isinstance(generation, dict) else generation or GenerationSettings()
        # plain dicts, so checkpoints load with torch.load(weights_only=True). Sampling settings are left
        # out: LightningCLI applies checkpoint hyperparameters over the command line when --ckpt_path is set
        self.save_hyperparameters({
            "config": asdict(config), "learning_rate": learning_rate, "min_lr_ratio": min_lr_ratio,
            "warmup_steps": warmup_steps, "weight_decay": weight_decay, "betas": list(betas), "compile": compile,
            "optimizer": optimizer, "muon_lr": muon_lr, "muon_momentum": muon_momentum,
            "muon_weight_decay": muon_weight_decay,
        })
        self.config, self.generation = config, generation
        self.activation_checkpointing = activation_checkpointing
        self.model = GPT(config)
        if init_from is not None:
            from project.hf import load_hf_weights

            load_hf_weights(self.model, init_from)  # ValueError naming the HF config when it does not match
        self.tokenizer: Tokenizer | None = None  # from the data module, or restored from a checkpoint
        self.val_bytes_per_token: float | None = None
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()

    # --- lifecycle -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # ModelParallelStrategy: tensor parallel + FSDP2, see project/parallel.py
            from project.parallel import parallelize

            parallelize(self.model, self.device_mesh, self.activation_checkpointing, compile=self.hparams.compile)
            return
        if self.hparams.compile:
            self.model.compile()  # in place: parameter names (and checkpoint keys) stay unprefixed

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            return
        if stage in ("fit", "validate", "test"):
            self.tokenizer = datamodule.tokenizer
            self.val_bytes_per_token = datamodule.val_bytes_per_token

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state_dict()
        if self.val_bytes_per_token is not None:
            checkpoint["val_bytes_per_token"] = self.val_bytes_per_token

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "tokenizer" in checkpoint:
            self.tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
        self.val_bytes_per_token = checkpoint.get("val_bytes_per_token", self.val_bytes_per_token)

    @property
    def flops_per_batch(self) -> int | None:
        """Training FLOPs of one batch, read by the throughput monitor for MFU."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
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
        self.val_loss.update(self.loss(logits, y), weight=y.numel())
        self.val_ppl.update(logits.float(), y)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log(VAL_LOSS, loss, prog_bar=True, sync_dist=False)
        self.log(VAL_PPL, self.val_ppl.compute())
        if self.val_bytes_per_token:
            # nats/token -> bits/token -> bits/byte of the original text: comparable across tokenizers
            self.log(VAL_BPB, loss / math.log(2) / self.val_bytes_per_token)
        self.val_loss.reset()
        self.val_ppl.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("test/loss", loss)
        self.log("test/ppl", self.val_ppl.compute())
        if self.val_bytes_per_token:
            self.log("test/bpb", loss / math.log(2) / self.val_bytes_per_token)
        self.val_loss.reset()
        self.val_ppl.reset()

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
            from project.parallel import clip_grad_norm_  # sharded and replicated gradients mixed

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

    def configure_optimizers(self):
        hp = self.hparams
        # a loss scaler (fp16 "16-mixed") unscales before clipping; a fused AdamW would unscale inside its own
        # step, and Lightning refuses to clip gradients for such an optimizer
        loss_scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        optimizer, scheduler = build_optimizer(
            self.model, total_steps=self.trainer.estimated_stepping_batches, optimizer=hp.get("optimizer", "adamw"),
            learning_rate=hp.learning_rate, min_lr_ratio=hp.min_lr_ratio, warmup_steps=hp.warmup_steps,
            weight_decay=hp.weight_decay, betas=tuple(hp.betas), muon_lr=hp.muon_lr, muon_momentum=hp.muon_momentum,
            muon_weight_decay=hp.muon_weight_decay, fused=self.device.type in ("cuda", "cpu") and not loss_scaled,
            sharded=self.device_mesh is not None,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
