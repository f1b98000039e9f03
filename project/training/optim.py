"""Optimizers and the learning-rate schedule, built from a plain GPT and `OptimizerSettings`: no Trainer needed.

`OptimizerSettings` is the one place the optimizer's settings are written down: its fields are GPTModule's
`--model.optimizer.*` flags, the checkpoint's hyperparameters, what a resume compares, and what `build_optimizer`
reads. `GPTModule.configure_optimizers` adds what only the Trainer knows (the number of steps, the device, whether
the weights are sharded or the loss is scaled); tests and scripts call `build_optimizer` directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from project.model import GPT


@dataclass
class OptimizerSettings:
    """The optimizer and its learning-rate schedule (warmup, then cosine decay to a floor).

    The schedule runs over the Trainer's steps, or over its time budget (`--trainer.max_time`) when that runs out
    first: see `build_optimizer`.

    Args:
        name: "adamw" for every parameter, or "muon": torch.optim.Muon for the blocks' weight matrices
            (attention q/k/v/proj, MLP fc/gate/proj) and AdamW (learning_rate, weight_decay) for embeddings,
            the LM head, norms and biases, as the modded-nanogpt speedruns do. Both follow the same schedule.
        learning_rate: peak AdamW learning rate after warmup.
        min_lr_ratio: the cosine schedule's floor, as a fraction of the peak.
        warmup_steps: linear warmup steps.
        weight_decay: AdamW decay on weight matrices and embeddings (never on biases and norms).
        betas: AdamW betas.
        muon_lr: Muon's peak learning rate (Keller Jordan's "original" shape scaling, sqrt(max(1, rows/cols))).
        muon_momentum: Muon's (Nesterov) momentum.
        muon_weight_decay: Muon's decoupled weight decay (multiplied by its learning rate, like AdamW's).
    """

    name: Literal["adamw", "muon"] = "adamw"
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        """ValueError naming the flag for a value the optimizer or its schedule cannot do what was meant with."""
        self.betas = tuple(self.betas)
        if self.name not in ("adamw", "muon"):
            raise ValueError(f"--model.optimizer.name must be adamw or muon, got {self.name!r}")
        for name in ("learning_rate", "muon_lr"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"--model.optimizer.{name} must be a positive number, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--model.optimizer.min_lr_ratio must be in [0, 1] (a fraction of the peak), got "
                             f"{self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"--model.optimizer.warmup_steps must be >= 0 (0 = no warmup), got {self.warmup_steps}")
        for name in ("weight_decay", "muon_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--model.optimizer.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"--model.optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"--model.optimizer.muon_momentum must be in [0, 1), got {self.muon_momentum}")

    def to_dict(self) -> dict:
        """Plain values for the checkpoint's hyperparameters (betas as a list)."""
        return {**asdict(self), "betas": list(self.betas)}


# Muon itself is correct on DTensor weights (their matmuls have whole-matrix semantics, at ~19 collectives per
# matrix and step); what fails is saving: torch's sharded optimizer state dict cannot read CombinedOptimizer's
MUON_SHARDED_ERROR = ("--model.optimizer.name muon is not supported under ModelParallelStrategy (its combined "
                      "Muon + AdamW state cannot be saved as a sharded checkpoint): use --model.optimizer.name adamw, "
                      "or configs/strategy/ddp.yaml")


def warmup_cosine(step: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_lr_ratio` at `total_steps`.

    `step` may be fractional: a time-bound run passes the step its elapsed share of the budget stands for
    (`build_optimizer`'s `time_fraction`).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one, so Lightning's automatic optimization handles them like any optimizer.

    `param_groups` are the inner optimizers' own group dicts: gradient clipping sees every parameter, and an LR
    scheduler on this optimizer scales every group (each from its own initial lr). `state_dict` holds each
    inner optimizer's state dict, so checkpoints save and restore all of them.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        groups = [group for opt in self.optimizers for group in opt.param_groups]
        super().__init__(groups, defaults={})  # the same dicts: an lr written here reaches the inner optimizer
        for opt in self.optimizers:  # add_param_group rebuilt the "params" lists; keep both sides identical
            opt.param_groups[:] = [g for g in self.param_groups if any(g is h for h in opt.param_groups)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)
        # load_state_dict replaces each inner optimizer's group dicts: share the new ones again
        self.param_groups[:] = [group for opt in self.optimizers for group in opt.param_groups]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(opt).__name__ for opt in self.optimizers)})"


def param_groups(model: GPT, muon: bool = False) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by optimizer group: "muon" (blocks' 2-D weights, only when `muon`), "decay"
    (the other matrices and embeddings) and "no_decay" (norms, biases). Each parameter appears once."""
    groups: dict[str, list[torch.nn.Parameter]] = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():  # tied lm_head/wte is listed once, as wte
        if not p.requires_grad:
            continue
        if muon and p.dim() == 2 and name.startswith("blocks."):
            groups["muon"].append(p)
        else:
            groups["decay" if p.dim() >= 2 else "no_decay"].append(p)
    if not muon:
        del groups["muon"]
    return groups


def build_optimizer(model: GPT, settings: OptimizerSettings, total_steps: int, *, fused: bool = False,
                    sharded: bool = False, time_fraction: Callable[[], float] | None = None,
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (or Muon for the blocks' matrices + AdamW for the rest) and its warmup + cosine schedule over
    `total_steps`.

    `time_fraction` (the share of a wall-clock budget used so far, 0 to 1) makes the schedule budget-aware: its
    progress is the larger of the step count and `time_fraction() * total_steps`, so a run that a time limit stops
    before `total_steps` still warms up, decays and ends at the floor as its time runs out.

    `fused` asks for the fused AdamW kernel: pass False under a loss scaler (fp16 "16-mixed"), since a fused step
    unscales gradients itself and so cannot be clipped in between. `sharded` (ModelParallelStrategy: the weights
    are DTensors, saved as sharded checkpoints) refuses Muon with `MUON_SHARDED_ERROR`.
    """
    if sharded and settings.name == "muon":
        raise ValueError(MUON_SHARDED_ERROR)
    params = param_groups(model, muon=settings.name == "muon")
    groups = [{"params": params["decay"], "weight_decay": settings.weight_decay, "name": "decay"},
              {"params": params["no_decay"], "weight_decay": 0.0, "name": "no_decay"}]
    built: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=settings.betas,
                                                     fused=fused)
    if "muon" in params:
        muon = torch.optim.Muon([{"params": params["muon"], "name": "muon"}], lr=settings.muon_lr,
                                weight_decay=settings.muon_weight_decay, momentum=settings.muon_momentum)
        built = CombinedOptimizer([muon, built])

    def multiplier(step: int) -> float:
        progress = step if time_fraction is None else max(step, time_fraction() * total_steps)
        return warmup_cosine(progress, settings.warmup_steps, total_steps, settings.min_lr_ratio)

    return built, torch.optim.lr_scheduler.LambdaLR(built, multiplier)
