"""Optimizers and the learning-rate schedule, built from a plain GPT: no Trainer needed.

`GPTModule.configure_optimizers` calls `build_optimizer` with what only the Trainer knows (the number of
steps, the device, whether the weights are sharded or the loss is scaled); tests and scripts call it directly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from project.model import GPT


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""
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


def build_optimizer(
    model: GPT,
    total_steps: int,
    optimizer: Literal["adamw", "muon"] = "adamw",
    learning_rate: float = 1e-3,
    min_lr_ratio: float = 0.1,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    muon_weight_decay: float = 0.0,
    fused: bool = False,
    sharded: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (or Muon for the blocks' matrices + AdamW for the rest) and its warmup + cosine schedule.

    The arguments after `total_steps` are GPTModule's hyperparameters of the same names. `fused` asks for
    the fused AdamW kernel: pass False under a loss scaler (fp16 "16-mixed"), since a fused step unscales
    gradients itself and so cannot be clipped in between. `sharded` (some parameters are DTensors) turns off
    fused and foreach kernels, which refuse a mix of DTensor and plain parameters, and refuses Muon, which
    orthogonalises whole matrices that sharding splits.
    """
    params = param_groups(model, muon=optimizer == "muon")
    groups = [{"params": params["decay"], "weight_decay": weight_decay, "name": "decay"},
              {"params": params["no_decay"], "weight_decay": 0.0, "name": "no_decay"}]
    built: torch.optim.Optimizer = torch.optim.AdamW(
        groups, lr=learning_rate, betas=tuple(betas), fused=fused and not sharded, foreach=False if sharded else None
    )
    if "muon" in params:
        if sharded:
            raise ValueError("optimizer=muon needs whole weight matrices, which sharded strategies split: "
                             "pass --model.optimizer adamw")
        muon = torch.optim.Muon([{"params": params["muon"], "name": "muon"}], lr=muon_lr,
                                weight_decay=muon_weight_decay, momentum=muon_momentum)
        built = CombinedOptimizer([muon, built])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        built, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )
    return built, scheduler
