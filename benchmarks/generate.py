"""Generation throughput: our KV cache vs our no-cache path vs Hugging Face `GPT2LMHeadModel.generate`.

All three run greedy decoding on the same random GPT-2-style weights (copied into a transformers GPT2 model
here; nothing comes from the hub), in one process, with interleaved repeats; the table reports medians.

    python benchmarks/generate.py            # 6 layers x 6 heads x 384, block 512, vocab 50257, 256 + 256 tokens
    python benchmarks/generate.py --quick    # a small smoke run (seconds)

Tokens/s counts new tokens only (batch * max_new_tokens / wall time), prefill included.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from project.generate import generate  # noqa: E402
from project.model import GPT, GPTConfig  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def to_hf(model: GPT):
    """A transformers GPT2LMHeadModel with exactly our (GPT-2-style) weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    if cfg.positions != "learned" or cfg.norm != "layernorm" or cfg.mlp != "gelu" or cfg.kv_heads != cfg.n_head:
        raise ValueError("only the GPT-2 recipe maps onto GPT2LMHeadModel")
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.hidden_dim,
        activation_function="gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    t = hf.transformer
    with torch.no_grad():
        t.wte.weight.copy_(model.wte.weight)
        t.wpe.weight.copy_(model.wpe.weight)
        for ours, theirs in zip(model.blocks, t.h):
            a = ours.attn
            # Conv1D stores (in, out); nn.Linear stores (out, in)
            theirs.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T)
            theirs.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            theirs.attn.c_proj.weight.copy_(a.proj.weight.T)
            theirs.attn.c_proj.bias.copy_(a.proj.bias)
            theirs.mlp.c_fc.weight.copy_(ours.mlp.fc.weight.T)
            theirs.mlp.c_fc.bias.copy_(ours.mlp.fc.bias)
            theirs.mlp.c_proj.weight.copy_(ours.mlp.proj.weight.T)
            theirs.mlp.c_proj.bias.copy_(ours.mlp.proj.bias)
            for mine, hf_norm in ((ours.norm1, theirs.ln_1), (ours.norm2, theirs.ln_2)):
                hf_norm.weight.copy_(mine.weight)
                hf_norm.bias.copy_(mine.bias)
        t.ln_f.weight.copy_(model.norm.weight)
        t.ln_f.bias.copy_(model.norm.bias)
        if not cfg.tie_embeddings:
            hf.lm_head.weight.copy_(model.lm_head.weight)
    return hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few tokens: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median reported)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--nocache-repeats", type=int, default=None,
                        help="repeats for the (slow) no-cache path; default min(repeats, 3)")
    parser.add_argument("--nocache-batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes for the no-cache path (default: all; it is O(T^2) per token)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)
        prompt_len, new_tokens, repeats = args.prompt_len or 16, args.new_tokens or 16, args.repeats or 1
    else:
        config = GPTConfig(vocab_size=50257, block_size=512, n_layer=6, n_head=6, n_embd=384)
        prompt_len, new_tokens, repeats = args.prompt_len or 256, args.new_tokens or 256, args.repeats or 5
    nocache_repeats = args.nocache_repeats or min(repeats, 3)
    nocache_batches = set(args.nocache_batch_sizes or args.batch_sizes)
    torch.manual_seed(0)
    model = GPT(config).eval()
    hf = None if args.skip_hf else to_hf(model)

    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len)) for b in args.batch_sizes}
    if hf is not None:  # the copied weights give the same logits
        with torch.inference_mode():
            x = prompts[args.batch_sizes[0]]
            diff = (model(x) - hf(x).logits).abs().max().item()
        print(f"max |logits ours - HF| on the prompt: {diff:.2e}", flush=True)

    def ours(use_kv_cache: bool):
        def run(idx):
            return generate(model, idx, new_tokens, temperature=0.0, use_kv_cache=use_kv_cache)
        return run

    def hf_generate(idx):
        with torch.inference_mode():
            return hf.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    methods = {"ours, KV cache": ours(True), "ours, no cache": ours(False)}
    if hf is not None:
        methods["HF generate"] = hf_generate
    times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in methods for b in args.batch_sizes}
    outputs: dict[tuple[str, int], torch.Tensor] = {}

    def skipped(name: str, b: int) -> bool:
        return name == "ours, no cache" and b not in nocache_batches

    for name, fn in methods.items():  # warm-up (and outputs for the agreement check)
        for b in args.batch_sizes:
            if skipped(name, b):
                continue
            outputs[name, b] = fn(prompts[b])[:, prompt_len:]
    for r in range(repeats):  # interleaved: every method and batch size once per round
        for b in args.batch_sizes:
            for name, fn in methods.items():
                if skipped(name, b) or (name == "ours, no cache" and r >= nocache_repeats):
                    continue
                start = time.perf_counter()
                out = fn(prompts[b])
                times[name, b].append(time.perf_counter() - start)
                assert out.shape == (b, prompt_len + new_tokens), out.shape

    print(f"\nGeneration: {config.n_layer} layers x {config.n_head} heads x {config.n_embd}, block {config.block_size}, "
          f"vocab {config.vocab_size}; prompt {prompt_len} + {new_tokens} new tokens, greedy")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; "
          f"median of {repeats} (no cache: {nocache_repeats}) interleaved runs\n")
    header = f"| {'method':<16} | {'batch':>5} | {'median s':>9} | {'tokens/s':>9} | {'vs HF':>6} | {'vs no cache':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for b in args.batch_sizes:
        tps = {m: b * new_tokens / statistics.median(times[m, b]) for m in methods if times[m, b]}
        for m in methods:
            if m not in tps:
                print(f"| {m:<16} | {b:>5} | {'-':>9} | {'-':>9} | {'-':>6} | {'-':>11} |")
                continue
            vs_hf = f"{tps[m] / tps['HF generate']:.2f}x" if "HF generate" in tps else "-"
            vs_nc = f"{tps[m] / tps['ours, no cache']:.2f}x" if "ours, no cache" in tps else "-"
            print(f"| {m:<16} | {b:>5} | {statistics.median(times[m, b]):>9.3f} | {tps[m]:>9.1f} | {vs_hf:>6} | {vs_nc:>11} |")
    same = [f"{m} b{b}: {(outputs[m, b] == outputs['ours, KV cache', b]).float().mean().item():.0%}"
            for m in methods if m != "ours, KV cache" for b in args.batch_sizes if (m, b) in outputs]
    print("\ngreedy tokens equal to ours with KV cache: " + ", ".join(same))


if __name__ == "__main__":
    main()
