"""GPTModule: the LightningModule that trains, evaluates and samples a GPT."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Timer
from torchmetrics import MeanMetric

from project.generate import GenerationSettings, complete_batch
from project.model import GPT, GPTConfig
from project.tokenizer import Tokenizer, tokenizer_from_state
from project.training.optim import OptimizerSettings, build_optimizer

VAL_LOSS, VAL_PPL, VAL_BPB = "val/loss", "val/ppl", "val/bpb"  # train/loss: project.training.step_stats


class PerplexityFromLoss(MeanMetric):
    """Perplexity as exp(token-weighted mean cross-entropy): `update(mean_loss, weight=tokens)` per batch.

    The same value as torchmetrics' `Perplexity`, which takes a float32 softmax over all (B, T, V) logits (a
    second full copy of them); this one needs only the loss the step computes anyway. Synced over ranks like
    any torchmetrics metric.
    """

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T), `rows` positions at a time.

    Evaluation has no backward pass to keep the full logits for, so only one chunk at a time is converted to
    float32 and normalised: the peak memory of a validation step is the logits plus one (rows, V) chunk, not
    two more float32 copies of all (B, T, V). The result equals `F.cross_entropy` on the whole batch.
    """
    flat, target = logits.flatten(0, 1), targets.flatten()
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, flat.size(0), rows):
        total += F.cross_entropy(flat[start : start + rows].float(), target[start : start + rows], reduction="sum")
    return total / target.numel()


class GPTModule(LightningModule):
    """Next-token language modelling on top of `project.model.GPT`.

    The GPT is built on the meta device (no memory) and created in `configure_model`, which the Trainer calls:
    under ModelParallelStrategy each rank then allocates and initialises only its own slices of the weights
    (project/training/parallel.py), with the same values as one device for the same seed. Used without a
    Trainer, call `module.configure_model()` once first (`load_from_checkpoint` does).

    The training loss is returned, not logged per step: `project.training.step_stats.StepStats` (which the CLI
    adds) logs its mean over each logging interval with one device-to-host sync.

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
        with torch.device("meta"):  # shapes only; the seed of its initial weights is drawn now (GPT.init_seed)
            self.model = GPT(config)
        self.model.activation_checkpointing = activation_checkpointing
        self.init_from = init_from
        if init_from is not None:
            from project.formats.hf import check_hf_config

            check_hf_config(init_from, config)  # ValueError naming the HF config when it does not match
        self.tokenizer: Tokenizer | None = None  # from the data module, or restored from a checkpoint
        self.bytes_per_token: dict[str, float] = {}  # per evaluation split, for bits per byte
        self.training_text: dict = {}  # the corpus's Split and the training split's fingerprint, for checkpoints
        self.eval_loss = MeanMetric()
        self.eval_ppl = PerplexityFromLoss()

    # --- lifecycle -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Create the weights: shard the meta-device GPT over the strategy's device mesh (ModelParallelStrategy),
        then allocate this rank's part on its device and initialise it from the seed (or `init_from`). Runs once:
        later calls (fit, then test in one process) find the weights in place."""
        from project.training.parallel import materialize, parallelize

        if not any(p.is_meta for p in self.model.parameters()):
            return
        device, trainer = torch.device("cpu"), self.attached_trainer()
        if trainer is not None:
            device = trainer.strategy.root_device
            if trainer.world_size > 1:  # every rank draws the same weights, seeded or not
                self.model.init_seed = trainer.strategy.broadcast(self.model.init_seed)
        if self.device_mesh is not None:
            parallelize(self.model, self.device_mesh, compile=self.hparams.compile)
        elif self.hparams.compile:
            self.model.compile()  # in place: parameter names (and checkpoint keys) stay unprefixed
        materialize(self.model, device, self.pretrained_weights())

    def pretrained_weights(self) -> Iterable[tuple[str, torch.Tensor]] | None:
        """The (name, full tensor) pairs `configure_model` fills the GPT with: `init_from`'s, or None (seeded)."""
        if self.init_from is None:
            return None
        from project.formats.hf import hf_weights

        return hf_weights(self.init_from, self.config).items()

    def cpu(self) -> GPTModule:
        """Lightning moves the module to the CPU when a run ends, also one that failed before `configure_model`
        created the weights: a meta-device GPT has nothing to move then (and would fail, hiding the error)."""
        if any(p.is_meta for p in self.model.parameters()):
            return self
        return super().cpu()

    def attached_trainer(self):
        """The Trainer this module is attached to, or None."""
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer
            return None

    def attached_datamodule(self):
        """The Trainer's data module, or None (no Trainer attached, or no data module)."""
        return getattr(self.attached_trainer(), "datamodule", None)

    def setup(self, stage: str) -> None:
        datamodule = self.attached_datamodule()
        if datamodule is not None and stage in ("fit", "validate", "test"):
            self.tokenizer = datamodule.tokenizer
            splits = ("val",) if stage != "test" else ("test",)
            self.bytes_per_token.update({split: datamodule.bytes_per_token(split) for split in splits})
        if datamodule is not None and stage == "fit":
            lines = datamodule.training_fingerprint()
            self.training_text = {"split": asdict(datamodule.split), **({"lines": lines} if lines is not None else {})}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state_dict()
        if self.bytes_per_token:
            checkpoint["bytes_per_token"] = dict(self.bytes_per_token)
        if self.training_text:  # how the corpus was split, and what the model trained on (`evaluate` checks it)
            checkpoint["training_text"] = self.training_text
        # the latest validation's figures, so a loaded checkpoint can say how good it is (the app's model table)
        logged = self.trainer.callback_metrics
        checkpoint["metrics"] = {name: float(logged[name]) for name in (VAL_LOSS, VAL_PPL, VAL_BPB) if name in logged}

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
        if self.model.wte.weight.is_meta:
            raise RuntimeError("the GPT has no weights yet: call module.configure_model() first (the Trainer does)")
        return self.model(idx)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats; logits (B, T, V) are already aligned with targets (B, T)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self(x), y)  # logged per interval by StepStats, without a host sync per step

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = chunked_cross_entropy(self(x), y)
        self.eval_loss.update(loss, weight=y.numel())
        self.eval_ppl.update(loss, weight=y.numel())

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def log_evaluation(self, split: str) -> None:
        """Log <split>/loss, <split>/ppl and <split>/bpb (bits per byte of the text) for the epoch, then reset."""
        # torchmetrics has reduced these over the ranks already, so every rank logs the same value; sync_dist
        # averages those equal values, which changes nothing and tells Lightning they are global (it warns otherwise)
        loss = self.eval_loss.compute()
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True)
        self.log(f"{split}/ppl", self.eval_ppl.compute(), sync_dist=True)
        if self.bytes_per_token.get(split):
            # nats/token -> bits/token -> bits/byte of the original text: comparable across tokenizers
            self.log(f"{split}/bpb", loss / math.log(2) / self.bytes_per_token[split], prog_bar=split == "val",
                     sync_dist=True)
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
        """Clip by the global gradient norm with torch's `clip_grad_norm_` (`get_total_norm`, then
        `clip_grads_with_norm_`): one reduction when the gradients are DTensors (sharded or replicated over a
        mesh), and no host sync. Lightning's own clipping refuses fused optimizers under mixed precision; the
        gradients are already unscaled here when a loss scaler is used (fp16 "16-mixed")."""
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def optimized_module(self) -> torch.nn.Module:
        """The module whose trainable parameters the optimizer updates: the GPT (fine-tuning adds a head)."""
        return self.model

    def configure_optimizers(self):
        from project.training.parallel import is_sharded

        # a loss scaler (fp16 "16-mixed") unscales before clipping; a fused AdamW would unscale inside its own step
        loss_scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        optimizer, scheduler = build_optimizer(
            self.optimized_module(), self.optimizer_settings, total_steps=self.trainer.estimated_stepping_batches,
            fused=self.device.type in ("cuda", "cpu") and not loss_scaled,
            sharded=self.device_mesh is not None or is_sharded(self.model),
            time_fraction=budget_fraction(self.trainer),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def budget_fraction(trainer) -> Callable[[], float] | None:
    """With `--trainer.max_time`, a function giving the share of that budget used so far (0 to 1), read from the
    Trainer's Timer callback, the clock that stops the run; None without a time limit.

    The schedule follows whichever runs out first, steps or time (`build_optimizer`), so a run stopped by the
    clock ends at the floor learning rate instead of near its peak: on a slow or busy machine the last
    checkpoint is then the best the budget allows. A resumed run continues the clock where it stopped.
    """
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None or timer.time_remaining() is None:
        return None

    def fraction() -> float:
        elapsed = timer.time_elapsed()  # the training stage, resumed time included
        budget = elapsed + timer.time_remaining()
        return min(1.0, elapsed / budget) if budget > 0 else 1.0

    return fraction
