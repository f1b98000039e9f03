"""LoRA (Hu et al., 2021): fine-tune a frozen GPT through a low-rank update of some of its linear layers.

A target layer's weight W (out, in) stays frozen; two small matrices learn instead, A (r, in) and B (out, r), and the
layer computes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T          i.e. the weight W + (alpha / r) B A

B starts at zero, so training starts exactly at the base model. Only r * (in + out) numbers per layer train, instead
of in * out. After training, the update merges into W (`merge_lora`) and the model is a plain GPT again.

The layers are the project's module names inside each block (`LORA_TARGETS`). A LoRA layer keeps the base layer's
weight and bias Parameters under their names, so a state dict holds the base keys unchanged plus `...lora_A` and
`...lora_B`: an adapter is just those keys (`lora_state_dict`). The initialisation is PEFT's (`kaiming_uniform_` A,
zero B), and project/formats/peft.py writes adapters that PEFT loads onto the transformers export.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from project.model import GPT

# every linear layer of a block: attention's q, k, v and output projections; the MLP's up (fc), gate (SwiGLU only)
# and down (proj) projections. The embeddings and the (tied) LM head are not LoRA targets.
LORA_TARGETS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc", "mlp.gate", "mlp.proj")


@dataclass
class LoRASettings:
    """Which layers get a low-rank update, and its size.

    Args:
        r: the rank of the update (A is r x in, B is out x r).
        alpha: scale; the update is multiplied by alpha / r, so changing r keeps its size.
        dropout: dropout on the LoRA branch's input during training.
        targets: layers inside each block, from attn.q_proj, attn.k_proj, attn.v_proj, attn.proj, mlp.fc,
            mlp.gate (SwiGLU models) and mlp.proj. The default, query and value, is the LoRA paper's.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn.q_proj", "attn.v_proj"])

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--model.lora.r must be a whole number >= 1, got {self.r}")
        if not 0 < self.alpha < float("inf"):
            raise ValueError(f"--model.lora.alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--model.lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"--model.lora.targets {self.targets}: give each layer once, from "
                             f"{', '.join(LORA_TARGETS)} (the embeddings and LM head are not LoRA targets)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Linear):
    """A linear layer plus a trainable low-rank update: y = x W^T + b + scaling * dropout(x) A^T B^T.

    Shares the base layer's weight and bias Parameters (frozen by `add_lora`), so the base's state-dict keys stay.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the weight and bias are the base layer's own Parameters
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.scaling = r, alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **like))
        self.reset_lora_parameters()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init (init_lora_weights=True): A Kaiming-uniform, B zero, so the update starts at exactly zero.
        Also what a layer added on the meta device gets once its memory exists."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update to the weight, scaling * B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling


def add_lora(model: GPT, settings: LoRASettings) -> GPT:
    """Freeze every parameter of `model` and replace its target layers, in every block, by LoRALinear (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for target in settings.targets:
            parent_name, _, attr = target.rpartition(".")
            parent = block.get_submodule(parent_name)
            layer = getattr(parent, attr, None)
            if not isinstance(layer, nn.Linear) or isinstance(layer, LoRALinear):
                raise ValueError(f"LoRA target {target} is not a layer of this model (mlp.gate exists in SwiGLU "
                                 f"models only): choose from {', '.join(lora_targets_of(model))}")
            setattr(parent, attr, LoRALinear(layer, settings.r, settings.alpha, settings.dropout))
    return model


def lora_targets_of(model: GPT) -> list[str]:
    """The LoRA targets this model has (mlp.gate only with SwiGLU)."""
    block = model.blocks[0]
    return [t for t in LORA_TARGETS if isinstance(getattr(block.get_submodule(t.rpartition(".")[0]),
                                                          t.rpartition(".")[2], None), nn.Linear)]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of `model` by module name (e.g. "blocks.0.attn.q_proj")."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key is a LoRA matrix (…lora_A or …lora_B)."""
    return key.endswith((".lora_A", ".lora_B"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: only the LoRA matrices of `model`'s state dict."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """A plain GPT (a copy; `model` is left as it is) whose target weights are W + scaling * B A."""
    merged = copy.deepcopy(model)
    for name, layer in lora_layers(merged).items():
        parent_name, _, attr = name.rpartition(".")
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight.copy_(layer.weight + layer.delta_weight().to(layer.weight.dtype))
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        setattr(merged.get_submodule(parent_name), attr, plain)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; a tensor shared by two modules (the tied head) counts once."""
    params = list(module.parameters())  # each shared Parameter once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) - trainable
