"""Generation throughput: our KV cache vs our no-cache path vs Hugging Face `GPT2LMHeadModel.generate`.

All three run greedy decoding on the same random GPT-2-style weights (copied into a transformers GPT2 model
here; nothing comes from the hub), in one process, with interleaved repeats; the table reports medians.
Two more rows sample as the CLI does by default (temperature 0.8, top-k 200), ours with the KV cache and HF's.

A further row runs our KV-cached decoding with `compile=True` (each single-token step under torch.compile); its
one-off compile time is printed apart and left out of its tokens/s.

At batch 1, llama.cpp (llama-cpp-python, when importable) decodes greedily from the same weights exported to an
f32 GGUF file by `project.formats.gguf` (the mapping `export --format gguf` uses), in this process, with as many
threads as torch and its default (float16) KV cache. Its vocabulary is a stand-in (one character per id):
decoding speed does not depend on the tokenizer.

    python benchmarks/generate.py                      # configs/shakespeare.yaml's model (4,096-token BPE), block 128
    python benchmarks/generate.py --model char         # configs/shakespeare-char.yaml's model (65 characters), block 256
    python benchmarks/generate.py --model gpt2         # configs/shakespeare.yaml's shape with GPT-2's 50,257 tokens
    python benchmarks/generate.py --quick              # a small smoke run (seconds)

Tokens/s counts new tokens only (batch * max_new_tokens / wall time), prefill included.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch  # noqa: E402

from project.generate import GenerationSettings, generate  # noqa: E402
from project.formats.hf import to_hf_model  # noqa: E402 (the same weight mapping as `export`)
from project.model import GPT, GPTConfig  # noqa: E402
from project.tokenizer import CharTokenizer  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# a shipped config's model and its vocabulary size on TinyShakespeare
MODELS = {"bpe": ("shakespeare.yaml", 4096), "char": ("shakespeare-char.yaml", 65), "gpt2": ("shakespeare.yaml", 50257)}
REPO = Path(__file__).resolve().parents[1]


def model_config(name: str) -> GPTConfig:
    """The model of a shipped config (its context too: the prompt and the new tokens default to half of it each)."""
    import yaml

    file, vocab_size = MODELS[name]
    shape = yaml.safe_load((REPO / "configs" / file).read_text())["model"]["config"]
    return GPTConfig(**{**shape, "vocab_size": vocab_size, "dropout": 0.0})


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
    parser.add_argument("--skip-sampling", action="store_true", help="greedy rows only (no top-k rows)")
    parser.add_argument("--model", choices=list(MODELS), default="bpe",
                        help="whose model: configs/shakespeare.yaml (bpe, the default; gpt2: with GPT-2's vocabulary) "
                             "or configs/shakespeare-char.yaml (char)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compiled decoding row")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="leave out llama.cpp on the exported GGUF")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)
        prompt_len, new_tokens, repeats = args.prompt_len or 16, args.new_tokens or 16, args.repeats or 1
    else:
        config = model_config(args.model)
        half = config.block_size // 2
        prompt_len, new_tokens, repeats = args.prompt_len or half, args.new_tokens or half, args.repeats or 5
    nocache_repeats = args.nocache_repeats or min(repeats, 3)
    nocache_batches = set(args.nocache_batch_sizes or args.batch_sizes)
    torch.manual_seed(0)
    model = GPT(config).eval()
    hf = None if args.skip_hf else to_hf_model(model)

    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len)) for b in args.batch_sizes}
    if hf is not None:  # the copied weights give the same logits
        with torch.inference_mode():
            x = prompts[args.batch_sizes[0]]
            diff = (model(x) - hf(x).logits).abs().max().item()
        print(f"max |logits ours - HF| on the prompt: {diff:.2e}", flush=True)

    def ours(use_kv_cache: bool, sample: bool = False, compile: bool = False):
        def run(idx):
            if sample:
                sampled = GenerationSettings(max_new_tokens=new_tokens, temperature=0.8, top_k=200, seed=0)
                return generate(model, idx, sampled)
            return generate(model, idx, GenerationSettings(max_new_tokens=new_tokens, temperature=0.0),
                            use_kv_cache=use_kv_cache, compile=compile)
        return run

    def hf_generate(sample: bool = False):
        sampling = {"do_sample": True, "temperature": 0.8, "top_k": 200} if sample else {"do_sample": False}
        def run(idx):
            with torch.inference_mode():
                return hf.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, use_cache=True, pad_token_id=0, **sampling)
        return run

    # greedy rows are compared with HF greedy; the sampled rows with HF sampled
    methods = {"ours, KV cache": ours(True), "ours, no cache": ours(False)}
    baseline = {"ours, KV cache": "HF generate", "ours, no cache": "HF generate", "HF generate": "HF generate"}
    if not args.skip_compile:
        methods["ours, KV, compile"] = ours(True, compile=True)
        baseline["ours, KV, compile"] = "HF generate"
    if hf is not None:
        methods["HF generate"] = hf_generate()
    llama = None
    if not args.skip_llama_cpp and 1 in args.batch_sizes:
        llama = llama_cpp_on_gguf(model, workdir := tempfile.TemporaryDirectory())
    if llama is not None:
        methods["llama.cpp, f32"] = llama_cpp_greedy(llama, new_tokens)
        baseline["llama.cpp, f32"] = "HF generate"
    if not args.skip_sampling:
        methods["ours, KV, top-k"] = ours(True, sample=True)
        baseline["ours, KV, top-k"] = baseline["HF, top-k"] = "HF, top-k"
        if hf is not None:
            methods["HF, top-k"] = hf_generate(sample=True)
    times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in methods for b in args.batch_sizes}
    outputs: dict[tuple[str, int], torch.Tensor] = {}

    def skipped(name: str, b: int) -> bool:
        return (name == "ours, no cache" and b not in nocache_batches) or (name.startswith("llama.cpp") and b != 1)

    warmup: dict[tuple[str, int], float] = {}
    for name, fn in methods.items():  # warm-up (and outputs for the agreement check)
        for b in args.batch_sizes:
            if skipped(name, b):
                continue
            start = time.perf_counter()
            outputs[name, b] = fn(prompts[b])[:, prompt_len:]
            warmup[name, b] = time.perf_counter() - start
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
          f"vocab {config.vocab_size}; prompt {prompt_len} + {new_tokens} new tokens, greedy "
          f"(top-k rows: temperature 0.8, top-k 200)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; "
          f"median of {repeats} (no cache: {nocache_repeats}) interleaved runs\n")
    header = f"| {'method':<17} | {'batch':>5} | {'median s':>9} | {'tokens/s':>9} | {'vs HF':>6} | {'vs no cache':>11} |"
    against_llama: dict[str, float] = {}
    greedy = ("ours, KV cache", "ours, no cache", "HF generate", "ours, KV, compile", "llama.cpp, f32")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for b in args.batch_sizes:
        tps = {m: b * new_tokens / statistics.median(times[m, b]) for m in methods if times[m, b]}
        if b == 1 and "llama.cpp, f32" in tps:
            against_llama = {m: tps[m] / tps["llama.cpp, f32"] for m in ("ours, KV cache", "ours, KV, compile") if m in tps}
        for m in methods:
            if m not in tps:
                print(f"| {m:<17} | {b:>5} | {'-':>9} | {'-':>9} | {'-':>6} | {'-':>11} |")
                continue
            vs_hf = f"{tps[m] / tps[baseline[m]]:.2f}x" if baseline[m] in tps else "-"
            vs_nc = f"{tps[m] / tps['ours, no cache']:.2f}x" if "ours, no cache" in tps and m in greedy else "-"
            print(f"| {m:<17} | {b:>5} | {statistics.median(times[m, b]):>9.3f} | {tps[m]:>9.1f} | {vs_hf:>6} | {vs_nc:>11} |")
    same = [f"{m} b{b}: {(outputs[m, b] == outputs['ours, KV cache', b]).float().mean().item():.0%}"
            for m in greedy[1:] for b in args.batch_sizes if (m, b) in outputs]
    print("\ngreedy tokens equal to ours with KV cache: " + ", ".join(same))
    if against_llama:
        print("batch 1 against llama.cpp (same f32 weights): "
              + ", ".join(f"{m} {ratio:.2f}x" for m, ratio in against_llama.items()))
    if 1 in args.batch_sizes:
        floor = matmul_floor_seconds(model)
        line = (f"a batch-1 step's matrix products alone (torch's F.linear on each weight, in order): "
                f"{floor * 1e3:.3f} ms, at most {1 / floor:,.0f} tokens/s for any step built on them")
        if times.get(("llama.cpp, f32", 1)):
            line += f"; llama.cpp's whole token: {statistics.median(times['llama.cpp, f32', 1]) / new_tokens * 1e3:.3f} ms"
        print(line)
    if "ours, KV, compile" in methods:
        print("compiled decoding, first call (compilation + one run): "
              + ", ".join(f"batch {b}: {warmup['ours, KV, compile', b]:.1f} s" for b in args.batch_sizes))
    if llama is not None:
        llama.close()
        workdir.cleanup()


def matmul_floor_seconds(model: GPT, calls: int = 300) -> float:
    """Median seconds of one batch-1 decoding step's matrix products alone: F.linear with each of `model`'s linear
    weights (the tied head included) on one row, in the model's order, so every weight is read once as in a step:
    the floor under any decoding step that computes them with torch's kernels."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    rows = [torch.randn(1, module.in_features) for module in linears]
    seconds = []
    with torch.inference_mode():
        for _ in range(calls):
            start = time.perf_counter()
            for module, row in zip(linears, rows):
                torch.nn.functional.linear(row, module.weight, module.bias)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[calls // 10:])


def llama_cpp_on_gguf(model: GPT, workdir: tempfile.TemporaryDirectory):
    """llama.cpp (llama-cpp-python) on `model` exported to an f32 GGUF file, or None where it is not installed."""
    try:
        import llama_cpp
    except (ImportError, OSError) as err:
        print(f"llama.cpp row left out: llama-cpp-python cannot be imported ({err})", flush=True)
        return None
    from project.formats.gguf import export_gguf

    stand_in = CharTokenizer("".join(chr(0x100 + i) for i in range(model.config.vocab_size)))
    path = export_gguf(model, stand_in, Path(workdir.name) / "gguf", dtype="f32")
    threads = torch.get_num_threads()
    return llama_cpp.Llama(model_path=str(path), n_ctx=model.config.block_size, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def llama_cpp_greedy(llama, new_tokens: int):
    """Greedy decoding of one prompt (1, T) in llama.cpp, prefill included: (1, T + new_tokens) ids."""
    def run(idx):
        llama.reset()
        new = itertools.islice(llama.generate(idx[0].tolist(), temp=0.0, top_k=1), new_tokens)
        return torch.cat([idx, torch.tensor([list(new)])], dim=1)
    return run


if __name__ == "__main__":
    main()
