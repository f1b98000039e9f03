"""LoRA adapters in PEFT's format, for the transformers export of their base model.

    python -m project export --ckpt_path runs/.../lora.ckpt --out adapter --format peft

writes `adapter_config.json` and `adapter_model.safetensors`, which load with

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_EXPORT), "adapter")

where BASE_EXPORT is the base exported with `python -m project export` (or the transformers folder the model was
fine-tuned from), and give the project's logits. The names come from the same table as the model export
(`project.formats.hf.WEIGHT_NAMES`). LoRA matrices are never transposed: PEFT's lora_A is (r, in) and lora_B
(out, r) for GPT-2's Conv1D layers too (`fan_in_fan_out` only transposes the merged update).

GPT-2 fuses q, k and v into one `c_attn`, while the project adapts each separately. Separate adapters (Aq, Bq),
(Ak, Bk), (Av, Bv) of rank r are exactly one adapter of rank k*r on c_attn (k of the three targeted), with
A = [Aq; Ak; Av] stacked and B block-diagonal, since B A = [Bq Aq; Bk Ak; Bv Av]; its alpha is k*alpha so the
scale alpha / r stays (`rank_pattern`, `alpha_pattern`). B has zero rows where a projection is not targeted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from project.files import atomic_path, atomic_write
from project.formats.hf import WEIGHT_NAMES, check_export_target, hf_family
from project.lora import LoRALinear, LoRASettings
from project.model import GPT

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the transformers model twice


def peft_adapter(model: GPT, settings: LoRASettings) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of the LoRA layers of `model` under transformers' names."""
    family = hf_family(model.config)
    names = WEIGHT_NAMES[family]
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for i, block in enumerate(model.blocks):
        prefix = PEFT_PREFIX + names.block_prefix.format(i=i)
        for ours, theirs in names.block.items():  # one of our layers is one of theirs (norms never have LoRA)
            layer = block.get_submodule(ours)
            if isinstance(layer, LoRALinear):
                tensors[f"{prefix}{theirs}.lora_A.weight"] = layer.lora_A.detach()
                tensors[f"{prefix}{theirs}.lora_B.weight"] = layer.lora_B.detach()
                targets.add(theirs)
        for theirs, members in names.fused.items():  # GPT-2's c_attn <- q, k, v: see the module docstring
            layers = [block.get_submodule(ours) for ours in members]
            adapted = [layer for layer in layers if isinstance(layer, LoRALinear)]
            if not adapted:
                continue
            rank = settings.r * len(adapted)
            lora_b = torch.zeros(sum(layer.out_features for layer in layers), rank, dtype=adapted[0].lora_B.dtype)
            row = column = 0
            for layer in layers:
                if isinstance(layer, LoRALinear):
                    lora_b[row:row + layer.out_features, column:column + settings.r] = layer.lora_B.detach()
                    column += settings.r
                row += layer.out_features
            tensors[f"{prefix}{theirs}.lora_A.weight"] = torch.cat([layer.lora_A.detach() for layer in adapted])
            tensors[f"{prefix}{theirs}.lora_B.weight"] = lora_b
            targets.add(theirs)
            if len(adapted) > 1:
                rank_pattern[theirs], alpha_pattern[theirs] = rank, settings.alpha * len(adapted)
    if not tensors:
        raise ValueError("this model has no LoRA layers: export the model itself (--format hf)")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": settings.r,
        "lora_alpha": settings.alpha, "lora_dropout": settings.dropout, "target_modules": sorted(targets),
        "fan_in_fan_out": names.conv1d, "bias": "none", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True,
    }
    return {k: v.to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, config


def export_peft(model: GPT, settings: LoRASettings, out: str | Path, *, base: str | None = None,
                overwrite: bool = False) -> Path:
    """Write the LoRA adapters of `model` to folder `out` in PEFT's format; `base` (a transformers folder, or
    None) is recorded as `base_model_name_or_path`."""
    from safetensors.torch import save_file

    out = check_export_target(out, overwrite)
    tensors, config = peft_adapter(model, settings)
    config["base_model_name_or_path"] = base
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ADAPTER_WEIGHTS) as staging:
        save_file(tensors, staging, metadata={"format": "pt"})
    atomic_write(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
