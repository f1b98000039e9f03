"""LoRA (project/lora.py) and its PEFT export (project/formats/peft.py): the update starts at zero, merges exactly, and
PEFT loads it onto the transformers export with the project's logits, for GPT-2's fused c_attn and Llama."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import GPT2_STYLE, LLAMA_STYLE, tiny_gpt
from project.lora import LORA_TARGETS, LoRALinear, LoRASettings, add_lora, lora_layers, lora_state_dict, merge_lora, \
    parameter_counts

ALL_GPT2 = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc", "mlp.proj"]
CASES = {  # name: (recipe, LoRA targets)
    "gpt2-q-v": (GPT2_STYLE, ["attn.q_proj", "attn.v_proj"]),  # c_attn with k's rows of B zero
    "gpt2-k": (GPT2_STYLE, ["attn.k_proj"]),  # c_attn with one third adapted: no rank pattern
    "gpt2-all": (GPT2_STYLE, ALL_GPT2),
    "llama-gqa-all": (dict(LLAMA_STYLE, n_kv_head=2), list(LORA_TARGETS)),
}


def adapted(recipe: dict, targets: list[str], r: int = 2, alpha: float = 6.0):
    """(base, LoRA model) with random, nonzero adapters (B starts at zero: training would move it)."""
    base = tiny_gpt(spread=0.2, **recipe)
    model = add_lora(copy.deepcopy(base), LoRASettings(r=r, alpha=alpha, targets=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return base, model.eval()


def test_zero_update_is_the_base_and_only_adapters_train():
    base = tiny_gpt(spread=0.2)
    model = add_lora(copy.deepcopy(base), LoRASettings(r=4, targets=["attn.q_proj", "mlp.fc"]))
    idx = torch.randint(50, (2, 16))
    assert torch.equal(model(idx), base(idx))  # B = 0: exactly the base
    C, hidden, layers = 32, 128, 2
    expected = layers * 4 * ((C + C) + (C + hidden))  # r (in + out) per adapted layer
    assert parameter_counts(model) == (expected, base.num_params())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    # the base's keys are unchanged: a base state dict loads into the LoRA model as it is
    assert set(base.state_dict()) <= set(model.state_dict())
    assert all(".lora_" in k for k in set(model.state_dict()) - set(base.state_dict()))


@pytest.mark.parametrize("case", CASES)
def test_merged_weights_give_the_same_logits(case):
    base, model = adapted(*CASES[case])
    idx = torch.randint(50, (2, 16))
    merged = merge_lora(model)
    assert not lora_layers(merged) and lora_layers(model)  # a copy: the LoRA model is left as it was
    assert (merged(idx) - model(idx)).abs().max() < 1e-5
    assert (model(idx) - base(idx)).abs().max() > 1e-2  # the update does change the outputs
    layer = model.blocks[0].get_submodule(CASES[case][1][0])
    merged_weight = merged.blocks[0].get_submodule(CASES[case][1][0]).weight
    torch.testing.assert_close(merged_weight, layer.weight + (layer.lora_B @ layer.lora_A) * 6.0 / 2)


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_the_adapters_onto_the_transformers_export(case, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[finetune]')")
    from project.formats.hf import export_hf
    from project.formats.peft import export_peft
    from project.tokenizer import CharTokenizer
    from transformers import AutoModelForCausalLM

    base, model = adapted(*CASES[case])
    export_hf(base, CharTokenizer("".join(chr(65 + i) for i in range(50))), tmp_path / "base")
    export_peft(model, LoRASettings(r=2, alpha=6.0, targets=CASES[case][1]), tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # a misnamed key is only a warning
    idx = torch.randint(50, (2, 16))
    with torch.no_grad():
        ours = model(idx)
        assert (peft_model(idx).logits - ours).abs().max() < 1e-4
        assert (peft_model.merge_and_unload()(idx).logits - ours).abs().max() < 1e-4


@pytest.mark.parametrize("settings, message", [
    (dict(targets=["lm_head"]), "embeddings and LM head are not LoRA targets"),
    (dict(targets=["attn.q_proj", "attn.q_proj"]), "give each layer once"),
    (dict(targets=[]), "give each layer once"),
    (dict(r=0), "r must be a whole number >= 1"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        LoRASettings(**settings)


def test_a_gate_on_a_gelu_model_is_refused():
    with pytest.raises(ValueError, match="mlp.gate is not a layer of this model.*choose from attn.q_proj"):
        add_lora(tiny_gpt(), LoRASettings(targets=["mlp.gate"]))


def test_lora_layer_is_a_linear_layer_with_the_base_parameters():
    base = torch.nn.Linear(8, 6)
    layer = LoRALinear(base, r=2, alpha=4.0)
    assert layer.weight is base.weight and layer.bias is base.bias and isinstance(layer, torch.nn.Linear)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + x @ layer.lora_A.t() @ layer.lora_B.t() * 2.0
    torch.testing.assert_close(layer(x), expected)
