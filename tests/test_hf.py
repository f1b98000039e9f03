"""Hugging Face export/import: exact logit parity, greedy generation, tokenizers, CLI, init_from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from project.generate import GenerationSettings, generate  # noqa: E402
from project.formats.hf import export_hf, gpt_from_hf, hf_family, hf_tokenizer  # noqa: E402
from project.model import GPT, GPTConfig  # noqa: E402
from project.training.module import GPTModule  # noqa: E402
from project.tokenizer import CharTokenizer, TiktokenTokenizer, train_bpe  # noqa: E402

from conftest import GPT2_STYLE, LLAMA_STYLE, run_cli, tiny_gpt  # noqa: E402

TINY = dict(block_size=24, n_layer=2, n_head=4, n_embd=32)
CONFIGS = {
    "gpt2": dict(GPT2_STYLE, gelu_approximate="tanh"),
    "gpt2-untied-erf": dict(GPT2_STYLE, gelu_approximate="none", tie_embeddings=False, mlp_hidden=48),
    "llama-gqa-untied": dict(LLAMA_STYLE, n_kv_head=2, tie_embeddings=False, rope_base=500.0),
    "llama-mqa-tied-bias": dict(LLAMA_STYLE, n_kv_head=1, bias=True, norm_eps=1e-6),
}
TEXT = "Hello, world!\nCafé — naïve 日本語 🙂  tabs\tand  spaces\n\n it's 1234567 they'll"


def random_gpt(chars: CharTokenizer, seed: int = 0, **options) -> GPT:
    """A tiny model with large random weights (norm gains and biases too), so any mapping slip shows."""
    return tiny_gpt(chars.vocab_size, seed, spread=0.2, **TINY, **options)


@pytest.mark.parametrize("name", CONFIGS)
def test_export_logits_and_greedy_generation_match(name, chars, tmp_path):
    model = random_gpt(chars, **CONFIGS[name])
    out = export_hf(model, chars, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected_cls = "GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_cls

    idx = torch.randint(chars.vocab_size, (3, TINY["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)).abs().max().item()
    assert diff < 1e-4, f"{name}: max logit difference {diff}"

    prompt = idx[:1, :5]
    new = TINY["block_size"] - prompt.size(1)
    ours = generate(model, prompt, GenerationSettings(max_new_tokens=new, temperature=0))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
    assert theirs.tolist() == ours.tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_export_round_trip_is_exact(family, chars, tmp_path):
    # a model saved by transformers itself -> ours -> exported again: the same tensors bit for bit
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=chars.vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4)
        hf = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=chars.vocab_size, max_position_embeddings=16, hidden_size=32,
                                          intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
        hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "orig")
    model = gpt_from_hf(tmp_path / "orig")
    assert hf_family(model.config) == family
    idx = torch.randint(chars.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf.eval()(idx).logits - model(idx)).abs().max().item() < 1e-4

    export_hf(model, chars, tmp_path / "again")
    original, exported = load_file(tmp_path / "orig" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key

    # and ours -> HF -> ours gives back our exact state dict
    again = gpt_from_hf(tmp_path / "again")
    assert again.config == model.config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_bpe_tokenizer_matches_tiktoken(tmp_path):
    ours = TiktokenTokenizer("gpt2")
    hf_tokenizer(ours).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode(TEXT)
    assert tok(TEXT)["input_ids"] == ids
    assert tok.decode(ids) == TEXT
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ours.eot_id == 50256


def test_trained_bpe_export_gives_autotokenizer_the_same_ids(shakespeare_path, tmp_path):
    """Exported with a model, a trained BPE loads in stock transformers with identical ids, seen text or not."""
    from project.formats.checkpoint import load_model

    text = shakespeare_path.read_text()
    ours = train_bpe(text[:200_000], 700)
    torch.manual_seed(0)
    export_hf(GPT(GPTConfig(vocab_size=ours.vocab_size, **TINY)).eval(), ours, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for sample in (text[500_000:520_000], TEXT, "\x00\x1b[0m \u200b\U0010fffd"):
        ids = ours.encode(sample)
        assert tok(sample)["input_ids"] == ids
        assert tok.decode(ids) == sample
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ours.eot_id
    reloaded = load_model(tmp_path / "hf").tokenizer  # serve/generate from the exported folder
    assert reloaded.encode(TEXT) == ours.encode(TEXT) and reloaded.vocab_size == 700


def test_char_tokenizer_matches(chars, shakespeare_path, tmp_path):
    hf_tokenizer(chars).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    snippet = shakespeare_path.read_text()[:2000]
    ids = chars.encode(snippet)
    assert "\n" in snippet and " " in snippet
    assert tok(snippet)["input_ids"] == ids
    assert tok.decode(ids) == snippet


@pytest.mark.parametrize(("options", "message"), [
    (dict(positions="rope"), "rope with layernorm cannot be represented"),
    (dict(positions="rope", norm="rmsnorm"), "rope with gelu cannot be represented"),
    (dict(norm="rmsnorm", mlp="swiglu"), "learned positions with rmsnorm cannot be represented"),
    (dict(bias=False), "learned positions with bias=false cannot be represented"),
    (dict(n_kv_head=2), "learned positions with n_kv_head=2 cannot be represented"),
])
def test_unsupported_combination_refused(options, message, chars, tmp_path):
    model = GPT(GPTConfig(vocab_size=chars.vocab_size, **TINY, **options))
    with pytest.raises(ValueError, match=message):
        export_hf(model, chars, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_cli(trained_run, tmp_path):
    out = tmp_path / "hf"
    result = run_cli("export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tok.decode(tok("ROMEO:\n")["input_ids"]) == "ROMEO:\n"
    pipe = transformers.pipeline("text-generation", model=str(out))
    text = pipe("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 8

    # an existing export is kept unless --overwrite true
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = run_cli("export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(out), cwd=tmp_path)
    assert refused.returncode != 0
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = run_cli("export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(out), "--overwrite", "true",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]


def test_init_from_hf_directory(chars, tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=chars.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    ours = GPTConfig(vocab_size=chars.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32,
                     gelu_approximate="tanh")
    module = GPTModule(ours, init_from=str(tmp_path / "gpt2")).eval()
    module.configure_model()  # the HF weights are read here (on each rank only its slices, when sharded)
    idx = torch.randint(chars.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (module(idx) - hf(idx).logits).abs().max().item() < 1e-4

    # a shorter context keeps the first positions; a different architecture is refused naming HF's values
    short = GPTModule(GPTConfig(**{**ours.to_dict(), "block_size": 8}), init_from=str(tmp_path / "gpt2")).eval()
    short.configure_model()
    with torch.no_grad():
        assert (short(idx[:, :8]) - hf(idx[:, :8]).logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match=r"n_layer=4 \(HF: 2\).*The HF model is: .*n_layer=2"):
        GPTModule(GPTConfig(**{**ours.to_dict(), "n_layer": 4}), init_from=str(tmp_path / "gpt2"))
