"""Generation: KV-cache correctness, sampling filters, stops, streaming, the CLI and the benchmark smoke run."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import GPT2_STYLE, LLAMA_STYLE, REPO, run_cli, tiny_gpt
from project.generate import (
    GenerationSettings,
    InvalidSetting,
    complete_batch,
    generate,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
)
from project.decoding import Decoder
from project.model import GPT, GPTConfig, KVCache
from project.tokenizer import CharTokenizer, TiktokenTokenizer

CONFIGS = {"gpt2": GPT2_STYLE, "llama": dict(LLAMA_STYLE, n_kv_head=2)}


def sampling(max_new_tokens: int, **kwargs) -> GenerationSettings:
    """Settings as generate's old keyword defaults: plain sampling (temperature 1, no top-k) unless given."""
    return GenerationSettings(max_new_tokens=max_new_tokens, **{"temperature": 1.0, "top_k": None, **kwargs})


class Eot:
    """Just an end-of-text id, for the scripted model (generate reads it from the tokenizer)."""

    def __init__(self, eot_id: int) -> None:
        self.eot_id = eot_id


def tiny_model(kind: str, vocab_size: int = 50) -> GPT:
    """A tiny GPT-2- or Llama-style model (grouped-query attention) whose logits differ clearly between tokens."""
    return tiny_gpt(vocab_size, spread=0.3, **CONFIGS[kind])


class ScriptedModel(nn.Module):
    """A fake GPT that emits a fixed continuation per row, whatever it is fed (with or without a cache).

    The next token after a sequence of length n is script[row, n - prompt_len] (then token 0 forever); with a KV
    cache, the row is the cache slot.
    """

    def __init__(self, script: list[list[int]], prompt_len: int, vocab_size: int, block_size: int = 256) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=4)
        self.lm_head = nn.Linear(4, vocab_size, bias=False)  # only read for the KV cache's device and dtype
        width = max(len(row) for row in script)
        self.script = torch.tensor([row + [0] * (width - len(row)) for row in script])
        self.prompt_len = prompt_len

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
                kv_cache=None, slot: int = 0) -> torch.Tensor:
        B, T = idx.shape
        if input_pos is None:
            lengths = torch.full((B,), T)
        else:  # one position per row for single tokens, else the positions of every row
            lengths = input_pos.expand(B) + 1 if T == 1 else torch.full((B,), int(input_pos[-1]) + 1)
        next_ids = torch.zeros(B, dtype=torch.long)
        for b, (row, step) in enumerate(zip(range(slot, slot + B), (lengths - self.prompt_len).tolist())):
            if row < self.script.size(0) and 0 <= step < self.script.size(1):
                next_ids[b] = self.script[row, step]
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1].scatter_(1, next_ids[:, None], 10.0)
        return logits[:, -1:] if last_only else logits


# --- the KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("prompt_len", [1, 5, 15])  # 15 = block_size - 1
def test_cached_logits_match_full_forward(kind, prompt_len):
    model = tiny_model(kind)
    block = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (3, block))
    with torch.no_grad():
        full = model(idx)  # (B, block, V): causal, so position t only sees tokens <= t
        cache = KVCache(model, slots=3)
        prefill = model(idx[:, :prompt_len], input_pos=torch.arange(prompt_len), kv_cache=cache)
        torch.testing.assert_close(prefill, full[:, :prompt_len], atol=1e-5, rtol=1e-5)
        for t in range(prompt_len, block):
            step = model(idx[:, t : t + 1], input_pos=torch.tensor([t]), kv_cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[:, 0], model(idx[:, : t + 1])[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_last_logits_only(kind):
    model = tiny_model(kind)
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)
        cached = model(idx, input_pos=torch.arange(7), last_only=True, kv_cache=KVCache(model, slots=2))
    assert cached.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(cached, full[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("prompt_len", [1, 6, 16])
def test_greedy_same_with_and_without_cache_past_block_size(kind, prompt_len):
    model = tiny_model(kind)
    block = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (2, prompt_len))
    new = 2 * block + 3  # the window slides well past the context
    cached = generate(model, idx, sampling(new, temperature=0.0), use_kv_cache=True)
    uncached = generate(model, idx, sampling(new, temperature=0.0), use_kv_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, uncached)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiled_decode_step_matches_eager_decoding(kind):
    """torch.compile'd single-token steps: the full forward's logits at every position, the same greedy tokens
    (also once the window slides past block_size), and top-k sampling identical for the same seed."""
    model = tiny_model(kind)
    block = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (2, block))
    with torch.inference_mode():
        full = model(idx)
    decoder = Decoder(model, slots=2, compile=True)
    decoder.prefill(0, idx[:, :3])
    for t in range(3, block):  # one graph serves every position: the cache keeps its shape
        decoder.tokens[:2] = idx[:, t]
        torch.testing.assert_close(decoder.step(2)[1], full[:, t], atol=1e-5, rtol=1e-5)
    prompt = idx[:, :4]
    eager = generate(model, prompt, sampling(2 * block, temperature=0.0))
    assert torch.equal(generate(model, prompt, sampling(2 * block, temperature=0.0), compile=True), eager)
    sampled = dict(temperature=1.0, top_k=10, seed=3)
    assert torch.equal(generate(model, prompt, sampling(block, **sampled), compile=True),
                       generate(model, prompt, sampling(block, **sampled)))
    with pytest.raises(ValueError, match="compile needs the KV cache"):
        generate(model, prompt, sampling(2), compile=True, use_kv_cache=False)


# --- sampling filters ------------------------------------------------------------------------------


def kept(filtered: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in filtered.reshape(-1, filtered.size(-1))]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0], [0.0, -1.0, 7.0, 2.0, 1.0]])
    assert kept(top_k_filter(logits, 2)) == [[3, 4], [2, 3]]
    assert kept(top_k_filter(logits, 1)) == [[3], [2]]
    assert kept(top_k_filter(logits, 99)) == [[0, 1, 2, 3, 4]] * 2  # k past the vocabulary keeps all
    out = top_k_filter(logits, 2)
    assert torch.equal(out[0, [3, 4]], logits[0, [3, 4]])  # kept values are untouched


def test_top_k_ties_at_the_boundary_are_all_kept():
    logits = torch.tensor([5.0, 3.0, 3.0, 0.0])
    assert kept(top_k_filter(logits, 2)) == [[0, 1, 2]]
    assert kept(top_k_filter(logits, 3)) == [[0, 1, 2]]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[[2, 0, 3, 1]]  # probs [0.15, 0.5, 0.05, 0.3]
    assert kept(top_p_filter(logits, 0.45)) == [[1]]
    assert kept(top_p_filter(logits, 0.6)) == [[1, 3]]  # 0.5 + 0.3 >= 0.6
    assert kept(top_p_filter(logits, 0.85)) == [[0, 1, 3]]
    assert kept(top_p_filter(logits, 0.99)) == [[0, 1, 2, 3]]
    assert kept(top_p_filter(logits, 1.0)) == [[0, 1, 2, 3]]
    assert kept(top_p_filter(logits, 1e-9)) == [[1]]  # tiny p: only the most likely token


def test_top_p_edge_cases():
    # p = 1.0 keeps everything, even tokens whose probability underflows next to a dominant one
    logits = torch.tensor([[50.0, 0.0, -3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert kept(top_p_filter(logits, 1.0)) == [[0, 1, 2, 3]] * 2
    # ties at the boundary are all kept; rows are independent
    tied = torch.tensor([[0.4, 0.3, 0.3], [0.1, 0.2, 0.7]]).log()
    assert kept(top_p_filter(tied, 0.5)) == [[0, 1, 2], [2]]
    # already-masked tokens stay masked
    masked = torch.tensor([2.0, float("-inf"), 1.0, float("-inf")])
    assert kept(top_p_filter(masked, 1.0)) == [[0, 2]]


def test_sample_next_respects_the_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    ids = sample_next(logits, 1.0, 2, None, gen)
    assert set(ids.tolist()) == {3, 4}
    ids = sample_next(logits, 5.0, None, 1e-6, gen)
    assert set(ids.tolist()) == {3}


def test_sample_next_draws_from_the_filtered_distribution():
    # sample_next draws among the top-k candidates only; the law must still be softmax(filters(logits / T))
    logits = torch.tensor([0.0, 2.0, 1.0, 3.0, 2.5, -1.0, 0.5, 1.5])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    for top_k, top_p in [(4, None), (5, 0.7), (None, 0.8), (8, None)]:
        expected = logits / 0.9
        if top_k is not None:
            expected = top_k_filter(expected, top_k)
        if top_p is not None:
            expected = top_p_filter(expected, top_p)
        expected = expected.softmax(-1)
        draws = sample_next(logits.expand(n, -1), 0.9, top_k, top_p, gen)
        frequencies = torch.bincount(draws, minlength=logits.numel()).float() / n
        assert set(draws.unique().tolist()) == set(expected.nonzero().flatten().tolist()), (top_k, top_p)
        torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_temperature_zero_and_top_k_one_equal_greedy(kind):
    model = tiny_model(kind)
    idx = torch.randint(0, model.config.vocab_size, (2, 4))
    greedy = generate(model, idx, sampling(20, temperature=0.0))
    assert torch.equal(generate(model, idx, sampling(20, temperature=0.0, top_k=50, top_p=0.5, seed=3)), greedy)
    assert torch.equal(generate(model, idx, sampling(20, temperature=1.3, top_k=1, seed=3)), greedy)
    assert torch.equal(generate(model, idx, sampling(20, temperature=1.3, top_p=1e-9, seed=3)), greedy)
    # greedy is the argmax of the full forward at every step
    seq = idx
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy[:, : seq.size(1)], seq)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_seed_fixes_the_sample(use_kv_cache):
    model = tiny_model("gpt2")
    idx = torch.randint(0, model.config.vocab_size, (2, 3))
    a = generate(model, idx, sampling(30, seed=1), use_kv_cache=use_kv_cache)
    assert torch.equal(a, generate(model, idx, sampling(30, seed=1), use_kv_cache=use_kv_cache))
    assert not torch.equal(a, generate(model, idx, sampling(30, seed=2), use_kv_cache=use_kv_cache))
    torch.manual_seed(123)  # the seed is local: the global RNG state does not matter
    assert torch.equal(a, generate(model, idx, sampling(30, seed=1), use_kv_cache=use_kv_cache))
    # cache and no cache give the same sample for the same seed
    other = generate(model, idx, sampling(30, seed=1, temperature=1.0), use_kv_cache=not use_kv_cache)
    assert torch.equal(a, other)


def test_seed_fixes_the_streamed_text():
    model = tiny_model("gpt2", vocab_size=27)
    tok = CharTokenizer("\nabcdefghijklmnopqrstuvwxyz")
    settings = lambda seed: GenerationSettings(max_new_tokens=30, temperature=1.0, top_k=None, seed=seed)  # noqa: E731
    a = "".join(stream(model, tok, "abc", settings(1)))
    assert a == "".join(stream(model, tok, "abc", settings(1)))
    assert a != "".join(stream(model, tok, "abc", settings(2)))


# --- invalid input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(seed=2**64), "seed must be a whole number from 0 to"),
    (dict(stop=["ok", ""]), "stop strings must not be empty"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(max_new_tokens=-1), "max_new_tokens must be a whole number >= 0"),
])
def test_invalid_sampling_values_raise(kwargs, message):
    """GenerationSettings checks itself when made, so nothing can sample with a value out of range."""
    with pytest.raises(InvalidSetting, match=message) as refused:
        GenerationSettings(**kwargs)
    assert refused.value.field == next(iter(kwargs))  # the API answers with this field's param


def test_invalid_prompts_raise():
    model = tiny_model("gpt2")
    block = model.config.block_size
    with pytest.raises(ValueError, match="prompt must be a non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), sampling(5))
    with pytest.raises(ValueError, match=f"prompt has {block + 1} tokens but the model's context is {block}"):
        generate(model, torch.zeros(1, block + 1, dtype=torch.long), sampling(5))
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="prompt is empty"):
        stream(model, tok, "", GenerationSettings())
    with pytest.raises(ValueError, match="prompt is empty"):
        complete_batch(model, tok, ["a", ""], GenerationSettings())
    with pytest.raises(ValueError, match="context is 16"):
        stream(model, tok, "a" * (block + 1), GenerationSettings())
    with pytest.raises(ValueError, match="stop strings need the tokenizer"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), sampling(5, stop=["x"]))


# --- stopping --------------------------------------------------------------------------------------

EOT = 9


def test_eot_ends_generation_and_pads_finished_rows():
    model = ScriptedModel([[1, 2, EOT, 3, 4, 5], [1, 2, 3, 4, EOT, 5]], prompt_len=2, vocab_size=10)
    idx = torch.tensor([[7, 7], [8, 8]])
    for use_kv_cache in (True, False):
        out = generate(model, idx, sampling(20, temperature=0.0), tokenizer=Eot(EOT), use_kv_cache=use_kv_cache)
        assert out.tolist() == [[7, 7, 1, 2, EOT, EOT, EOT], [8, 8, 1, 2, 3, 4, EOT]]
    # without eot_id the script just runs to max_new_tokens
    assert generate(model, idx, sampling(8, temperature=0.0)).shape == (2, 10)


def test_stop_strings_end_generation():
    tok = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz")
    script = [tok.encode("hello world and more"), tok.encode("hi\nthere world x")]
    model = ScriptedModel(script, prompt_len=1, vocab_size=tok.vocab_size)
    out = generate(model, torch.tensor(tok.encode("ab")).view(2, 1), sampling(30, temperature=0.0, stop=["world"]),
                   tokenizer=tok)
    texts = [tok.decode(row) for row in out[:, 1:].tolist()]
    assert texts[0].startswith("hello world") and texts[1].startswith("hi\nthere world")
    assert out.size(1) == 1 + len("hi\nthere world")  # ends once every row has a stop string
    assert texts[0][len("hello world"):] == "\n" * (len(texts[0]) - len("hello world"))  # padded with id 0
    settings = GenerationSettings(max_new_tokens=30, temperature=0.0, stop=["world"])
    assert complete_batch(model, tok, ["a"], settings) == ["hello "]
    pieces = list(stream(model, tok, "a", settings))
    assert "".join(pieces) == "hello "


def test_stream_holds_back_a_possible_stop_string():
    tok = CharTokenizer("\nabcdefghijklmnopqrstuvwxyz")
    model = ScriptedModel([tok.encode("abcwoxyzwor")], prompt_len=1, vocab_size=tok.vocab_size)
    settings = GenerationSettings(max_new_tokens=11, temperature=0.0, stop=["world"])
    pieces = list(stream(model, tok, "a", settings))
    assert "".join(pieces) == "abcwoxyzwor"  # no stop: everything comes out, in the end
    assert all("wor" not in p for p in pieces[:-1])


# --- streaming text --------------------------------------------------------------------------------

TEXT = "日本語 🙂 ok"


def test_stream_multibyte_characters_split_across_bpe_tokens():
    tok = TiktokenTokenizer("gpt2")
    ids = tok.encode(TEXT)
    # the case is real: some tokens are parts of characters, not valid UTF-8 on their own
    assert any(_invalid_utf8(tok.decode_bytes([i])) for i in ids)
    model = ScriptedModel([ids + [tok.eot_id]], prompt_len=1, vocab_size=tok.vocab_size)
    settings = GenerationSettings(max_new_tokens=len(ids) + 5, temperature=0.0)
    for use_kv_cache in (True, False):
        pieces = list(stream(model, tok, "A", settings, use_kv_cache=use_kv_cache))
        assert "".join(pieces) == TEXT
        assert len(pieces) > 1
        for piece in pieces:  # each piece is whole characters: no replacement characters, no surrogates
            assert piece and "\ufffd" not in piece
            assert piece.encode("utf-8").decode("utf-8") == piece
    assert complete_batch(model, tok, ["A"], settings) == [TEXT]
    out = generate(model, torch.tensor([tok.encode("A")]), sampling(len(ids) + 5, temperature=0.0), tokenizer=tok)
    assert tok.decode(out[0, 1:-1].tolist()) == TEXT and out[0, -1] == tok.eot_id


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_stream_concatenates_to_the_non_streamed_text():
    model = tiny_model("llama", vocab_size=27)
    tok = CharTokenizer("\nabcdefghijklmnopqrstuvwxyz")
    settings = GenerationSettings(max_new_tokens=40, temperature=0.9, top_k=10, seed=5)
    streamed = "".join(stream(model, tok, "hello", settings))
    assert streamed == complete_batch(model, tok, ["hello"], settings)[0]
    assert len(streamed) == 40


# --- the training path is untouched ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_leaves_the_model_as_it_was(kind):
    model = tiny_model(kind).train()
    keys = list(model.state_dict())
    buffers = [name for name, _ in model.named_buffers()]
    tok = CharTokenizer("".join(chr(ord("0") + i) for i in range(50)))
    generate(model, torch.zeros(2, 3, dtype=torch.long), sampling(25, temperature=1.0, seed=0))
    list(stream(model, tok, "012", GenerationSettings(max_new_tokens=5)))
    pieces = stream(model, tok, "012", GenerationSettings(max_new_tokens=50))
    next(pieces)  # a consumer that stops early
    pieces.close()
    for m in (model,):
        assert m.training
        assert list(m.state_dict()) == keys
        assert [name for name, _ in m.named_buffers()] == buffers
        assert not any("cache" in name for name, _ in m.named_modules())
    model.eval()
    generate(model, torch.zeros(1, 3, dtype=torch.long), sampling(3))
    assert not model.training
    for training in (True, False):  # nothing to generate: the caller's mode still comes back unchanged
        model.train(training)
        prompt = torch.zeros(1, 3, dtype=torch.long)
        assert torch.equal(generate(model, prompt, sampling(0)), prompt)
        assert "".join(stream(model, tok, "012", GenerationSettings(max_new_tokens=0))) == ""
        assert model.training is training
    # gradients still flow through the training forward afterwards
    model.train()
    loss = model(torch.zeros(2, 5, dtype=torch.long)).logsumexp(-1).mean()
    loss.backward()
    assert model.wte.weight.grad is not None


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_generate_streams_reproducible_text(trained_run):
    args = ("generate", "--ckpt_path", str(trained_run["ckpt"]), "--prompt", "ROMEO:", "--generation.seed", "1",
            "--stream", "true", "--generation.max_new_tokens", "60")
    first = run_cli(*args, "--compile", "true", cwd=trained_run["root"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("ROMEO:") and "compiled the decoding step in" in first.stderr
    assert len(first.stdout) > len("ROMEO:") + 10
    second = run_cli(*args, cwd=trained_run["root"])  # 60 tokens: not compiled by default
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout and "compiled" not in second.stderr


def test_generate_runs_in_bfloat16(trained_run, capsys):
    from project.commands import generate_command

    args = dict(ckpt_path=str(trained_run["ckpt"]), prompt="ROMEO:", compile=False,
                generation=GenerationSettings(max_new_tokens=20, temperature=0))
    generate_command(**args)
    f32 = capsys.readouterr().out
    generate_command(**args, dtype="bfloat16")
    bf16 = capsys.readouterr().out
    assert f32.startswith("ROMEO:") and bf16.startswith("ROMEO:") and len(bf16) == len(f32)  # 20 characters each
    # (how far bfloat16 logits move: tests/test_decoding.py and benchmarks/README.md)


def test_benchmark_quick_prints_the_table():
    args = [sys.executable, str(REPO / "benchmarks" / "generate.py"), "--quick"]
    if importlib.util.find_spec("transformers") is None:
        args.append("--skip-hf")
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| method" in out and "tokens/s" in out
    for name in ("ours, KV cache", "ours, no cache", "ours, KV, top-k", "ours, KV, compile"):
        assert out.count(f"| {name}") == 2  # batch 1 and batch 8
    assert "ours, KV, compile b1: 100%" in out and "ours, KV, compile b8: 100%" in out
    if "--skip-hf" not in args:
        assert out.count("| HF generate") == 2 and out.count("| HF, top-k") == 2
        assert "HF generate b1: 100%" in out  # greedy tokens agree with HF's
    assert math.isfinite(float(out.split("| ours, KV cache")[1].split("|")[3]))
