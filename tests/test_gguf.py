"""GGUF export, checked by llama.cpp itself (llama-cpp-python): logits, greedy tokens, tokenizers, CLI, refusals.

Tolerances, float32 GGUF against our float32 forward, every position of a 48-token sequence (llama.cpp run with
a float32 KV cache; its default float16 cache adds ~1e-2): Llama within 1e-4 (measured ~1e-5); GPT-2 within 1e-2
(measured ~2.5e-3), because ggml's CPU GELU reads a float16 lookup table.
Greedy agreement of f16 / q8_0 files, next-token argmax at each of 64 positions of our own greedy sequence,
measured on these random models: f16 98-100 %, q8_0 91-100 %; asserted >= 90 % and >= 80 %.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import GPT2_STYLE, LLAMA_STYLE, tiny_gpt
from project.commands import main
from project.generate import GenerationSettings, generate
from project.formats.gguf import export_gguf, gguf_tensors, interleave_rope_rows
from project.model import GPT, GPTConfig, apply_rope, rope_cache
from project.tokenizer import CharTokenizer, TiktokenTokenizer, train_bpe

try:
    import llama_cpp
except (ImportError, OSError) as err:  # no wheel installed, or one built for another machine
    llama_cpp, LLAMA_CPP_ERROR = None, f"{type(err).__name__}: {err}"
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python cannot be imported (install ../shared/wheels/llama_cpp_python-*.whl, "
    f"see its README): {LLAMA_CPP_ERROR if llama_cpp is None else ''}")

TINY = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)  # rows of 64 values: q8_0 quantizes every matrix
CONFIGS = {
    "gpt2-tied": GPT2_STYLE,
    "gpt2-untied": dict(GPT2_STYLE, tie_embeddings=False, mlp_hidden=96),
    "llama-gqa-tied": dict(LLAMA_STYLE, n_kv_head=2),
    "llama-gqa-untied-bias": dict(LLAMA_STYLE, n_kv_head=2, tie_embeddings=False, bias=True, rope_base=500.0),
}
F32_TOLERANCE = {"gpt2": 1e-2, "llama": 1e-4}
MIN_AGREEMENT = {"f16": 0.9, "q8_0": 0.8}


def random_gpt(vocab_size: int, seed: int = 0, **options) -> GPT:
    """A tiny model with large random weights (norm gains and biases too), so any mapping slip shows."""
    return tiny_gpt(vocab_size, seed, spread=0.2, **TINY, **options)


@contextlib.contextmanager
def llama(path: Path, **options):
    """llama.cpp on one file: all logits kept, a float32 KV cache (so only the weights' precision differs)."""
    f32 = int(gguf.GGMLQuantizationType.F32)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=TINY["block_size"], logits_all=True, type_k=f32, type_v=f32,
                          n_threads=1, verbose=False, **options)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == n:
            return tokens
    return tokens


@needs_llama_cpp
@pytest.mark.parametrize("name", CONFIGS)
def test_f32_logits_and_greedy_tokens_match_llama_cpp(name, chars, tmp_path):
    model = random_gpt(chars.vocab_size, **CONFIGS[name])
    path = export_gguf(model, chars, tmp_path / "gguf")
    idx = torch.randint(chars.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    prompt, new = idx[:, :8], TINY["block_size"] - 8
    ours = generate(model, prompt, GenerationSettings(max_new_tokens=new, temperature=0))[0, 8:].tolist()
    with torch.no_grad():
        expected = model(idx)[0]
    with llama(path) as llm:
        assert llm.metadata["general.architecture"] == name.split("-")[0]
        diff = (llama_logits(llm, idx[0].tolist()) - expected).abs().max().item()
        assert diff < F32_TOLERANCE[name.split("-")[0]], f"{name}: max logit difference {diff:.2e}"
        assert llama_greedy(llm, prompt[0].tolist(), new) == ours


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("name", ["gpt2-untied", "llama-gqa-tied"])
def test_reduced_precision_agrees_on_most_greedy_tokens(name, dtype, chars, tmp_path):
    model = random_gpt(chars.vocab_size, **CONFIGS[name])
    path = export_gguf(model, chars, tmp_path / dtype, dtype=dtype)
    f32_size = export_gguf(model, chars, tmp_path / "f32").stat().st_size
    assert path.stat().st_size < 0.6 * f32_size  # the matrices really are stored smaller
    seq = generate(model, torch.tensor([chars.encode("ROMEO:\n")]),
                   GenerationSettings(max_new_tokens=TINY["block_size"] - 7, temperature=0))
    with torch.no_grad():
        ours = model(seq)[0].argmax(-1)
    with llama(path) as llm:
        theirs = llama_logits(llm, seq[0].tolist()).argmax(-1)
    agreement = (theirs == ours).float().mean().item()
    assert agreement >= MIN_AGREEMENT[dtype], f"{name} {dtype}: greedy tokens agree at {agreement:.0%} of positions"


def test_precision_per_tensor(chars, tmp_path):
    model = random_gpt(chars.vocab_size, **CONFIGS["gpt2-untied"])
    kinds = {}
    for dtype in ("f32", "f16", "q8_0"):
        reader = gguf.GGUFReader(export_gguf(model, chars, tmp_path / dtype, dtype=dtype))
        kinds[dtype] = {t.name: t.tensor_type.name for t in reader.tensors}
        assert reader.get_field("general.file_type").contents() == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    assert set(kinds["f32"].values()) == {"F32"}
    for dtype, matrix_type in (("f16", "F16"), ("q8_0", "Q8_0")):
        assert kinds[dtype]["blk.0.attn_qkv.weight"] == kinds[dtype]["output.weight"] == matrix_type
        # vectors and the learned position table stay float32
        assert kinds[dtype]["blk.0.attn_qkv.bias"] == kinds[dtype]["position_embd.weight"] == "F32"


def test_q8_0_falls_back_to_f16_for_rows_it_cannot_block(chars, tmp_path):
    model = random_gpt(chars.vocab_size, **dict(CONFIGS["gpt2-untied"], mlp_hidden=80))  # down rows: 80 values
    reader = gguf.GGUFReader(export_gguf(model, chars, tmp_path / "q", dtype="q8_0"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == "F16" and kinds["blk.0.ffn_up.weight"] == "Q8_0"


def test_rope_rows_are_interleaved_per_head():
    # llama.cpp rotates pairs (2i, 2i+1); rotating the permuted rows that way equals our rotate-half, permuted
    config = GPTConfig(vocab_size=8, block_size=8, n_head=2, n_embd=16, positions="rope")
    cos, sin = rope_cache(config)
    x = torch.randn(1, 2, 8, 8)  # (B, H, T, D)
    ours = apply_rope(x, cos, sin)
    perm = interleave_rope_rows(torch.arange(16), 2).view(2, 8)[0]  # per head: the new order of each head's dims
    xi = x[..., perm]
    angles = cos[:, : 4].repeat_interleave(2, -1), sin[:, : 4].repeat_interleave(2, -1)
    pairs = torch.stack([-xi[..., 1::2], xi[..., 0::2]], dim=-1).flatten(-2)  # (-x1, x0) for each pair
    theirs = xi * angles[0] + pairs * angles[1]
    torch.testing.assert_close(theirs, ours[..., perm])


def test_tensor_names_follow_the_table(chars):
    names = set(gguf_tensors(random_gpt(chars.vocab_size, **CONFIGS["llama-gqa-untied-bias"])))
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.bias", "blk.1.ffn_gate.weight",
            "blk.1.attn_k.weight", "blk.1.attn_output.bias"} <= names
    tied = set(gguf_tensors(random_gpt(chars.vocab_size, **CONFIGS["gpt2-tied"])))
    assert "output.weight" not in tied and {"position_embd.weight", "blk.0.attn_qkv.weight"} <= tied


@needs_llama_cpp
def test_character_tokenizer_is_exact_in_llama_cpp(chars, shakespeare_path, tmp_path):
    path = export_gguf(random_gpt(chars.vocab_size, **CONFIGS["gpt2-tied"]), chars, tmp_path / "c")
    text = shakespeare_path.read_text()[:20000]
    with llama(path, vocab_only=True) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == chars.encode(text)
        assert llm.detokenize(chars.encode(text)).decode() == text
        assert llm.token_eos() == -1  # no character ends generation
    assert "stop" not in (tmp_path / "c" / "Modelfile").read_text()


def test_character_tokenizer_escapes_control_characters(tmp_path):
    chars = CharTokenizer("\t\n\\ab\x01é")
    path = export_gguf(random_gpt(len(chars.chars), **CONFIGS["gpt2-tied"]), chars, tmp_path / "c")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.tokens").contents() == ["\\t", "\\n", "\\\\", "a", "b", "\\x01", "é"]


@needs_llama_cpp
def test_gpt2_bpe_tokenizer_matches_tiktoken(tmp_path, shakespeare_path):
    tok = TiktokenTokenizer("gpt2")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    path = export_gguf(model, tok, tmp_path / "bpe")
    text = "Hello, world!\nCafé — naïve 日本語 🙂  tabs\tand  spaces\n\n it's 1234567 they'll\\ x  \n"
    text += shakespeare_path.read_text()[:5000]
    with llama(path, vocab_only=True) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
        assert llm.detokenize(tok.encode(text)).decode() == text
        assert llm.token_eos() == tok.eot_id and llm.token_bos() == tok.eot_id
    assert 'PARAMETER stop "<|endoftext|>"' in (tmp_path / "bpe" / "Modelfile").read_text()


@needs_llama_cpp
def test_trained_bpe_tokenizes_and_decodes_like_ours_in_llama_cpp(tmp_path, shakespeare_path):
    """A byte-level BPE trained on the corpus (`bpe:N`) becomes llama.cpp's gpt2 tokenizer, id for id."""
    corpus = shakespeare_path.read_text(encoding="utf-8")
    tok = train_bpe(corpus[:200_000], 400)
    model = random_gpt(tok.vocab_size)
    path = export_gguf(model, tok, tmp_path / "trained")
    text = corpus[500_000:503_000] + "\nCafé — naïve 日本語 🙂  tabs\tand  spaces\n"  # text the merges never saw
    prompt = tok.encode("ROMEO:\nBut soft, what light")
    with llama(path) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
        assert llm.detokenize(tok.encode(text)).decode() == text
        assert llm.token_eos() == tok.eot_id
        greedy = GenerationSettings(max_new_tokens=24, temperature=0)
        ours = generate(model, torch.tensor([prompt]), greedy)[0, len(prompt):].tolist()
        assert llama_greedy(llm, prompt, 24) == ours


@pytest.mark.parametrize(("options", "message"), [
    (dict(GPT2_STYLE, gelu_approximate="none"), "tanh GELU"),
    (dict(LLAMA_STYLE, norm="layernorm"), "rope with layernorm cannot be represented"),
])
def test_unrepresentable_model_refused(options, message, chars, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_gguf(random_gpt(chars.vocab_size, **options), chars, tmp_path / "x")
    assert not (tmp_path / "x" / "model.gguf").exists()


def test_tokenizer_larger_than_model_refused(chars, tmp_path):
    model = GPT(GPTConfig(vocab_size=chars.vocab_size - 1, block_size=8, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match=f"tokenizer has {chars.vocab_size} tokens but the model only {chars.vocab_size - 1}"):
        export_gguf(model, chars, tmp_path / "x")


def test_export_cli(trained_run, tmp_path, capsys):
    out = tmp_path / "gguf"
    args = ["export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(out), "--format", "gguf"]
    main([*args, "--dtype", "q8_0"])
    assert "exported" in capsys.readouterr().out
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.get_field("general.file_type").contents() == 7
    assert reader.get_field("gpt2.context_length").contents() == 32
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and "PARAMETER num_ctx 32\n" in modelfile
    assert "PARAMETER num_predict 16\n" in modelfile  # a reply within the context, whatever Ollama pads it to

    for bad, expected in (
        ([], "model.gguf exists: pass --overwrite true"),  # an existing export is kept
        (["--dtype", "q4_k"], "Parser key \"dtype\""),
        (["--format", "onnx"], "Parser key \"format\""),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *bad])
        assert exit_info.value.code != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error:") and expected in lines[-1], lines[-3:]
    main([*args, "--overwrite", "true"])
    assert gguf.GGUFReader(out / "model.gguf").get_field("general.file_type").contents() == 0

    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(tmp_path / "hf"), "--dtype", "f16"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --dtype f16 applies to --format gguf only: the hf format is always f32")


@needs_llama_cpp
def test_llama_cpp_runs_an_export_within_its_context_and_aborts_past_it(trained_run, tmp_path, capsys):
    """What the README says of llama.cpp and a learned-position model: the export's own command (prompt + half the
    context) runs, and a reply past the context aborts the process (GGML_ASSERT), though n_ctx=0 starts from the
    context the file states, as llama.cpp rounds n_ctx up to a multiple of 256. In subprocesses: the abort is real."""
    main(["export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(tmp_path / "gguf"), "--format", "gguf"])
    out = capsys.readouterr().out
    assert "context 32 tokens" in out and "num_predict 16" in out and "max_tokens=16" in out
    script = ("import sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_ctx=0, n_threads=1, verbose=False); "
              "usage = llm.create_completion('ROMEO:', max_tokens=int(sys.argv[2]), temperature=0.0)['usage']; "
              "print(llm.n_ctx(), usage['prompt_tokens'] + usage['completion_tokens'])")
    path = str(tmp_path / "gguf" / "model.gguf")
    within = subprocess.run([sys.executable, "-c", script, path, "16"], capture_output=True, text=True, timeout=120)
    assert within.returncode == 0, within.stderr[-2000:]
    n_ctx, used = map(int, within.stdout.split())
    assert n_ctx == 256 and 16 < used <= 32  # llama.cpp's context is padded; the model's is not
    past = subprocess.run([sys.executable, "-c", script, path, "100"], capture_output=True, text=True, timeout=120)
    assert past.returncode != 0 and "GGML_ASSERT(i01 >= 0 && i01 < ne01)" in past.stderr


def test_export_cli_refuses_a_model_llama_cpp_cannot_represent(chars, tmp_path, capsys):
    model = random_gpt(chars.vocab_size, **dict(GPT2_STYLE, gelu_approximate="none"))
    ckpt = tmp_path / "erf.ckpt"  # what load_checkpoint reads from a checkpoint of `fit`
    torch.save({"hyper_parameters": {"config": model.config.to_dict()}, "tokenizer": chars.state_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "gguf"), "--format", "gguf"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: llama.cpp's gpt2 architecture uses the tanh GELU") and err.count("\n") == 1
    assert not (tmp_path / "gguf" / "model.gguf").exists()
