"""Serving throughput and latency: 1, 4, 8 and 20 concurrent clients of `serve`'s OpenAI API.

A server process serves random weights of the default config's model (configs/shakespeare.yaml: 6 x 6 x 192,
vocabulary 4,096, block 128) exactly as `serve` does (one scheduler, `--slots` KV-cache slots, the step compiled at
start-up, whose time is printed apart); this process runs the clients. Every level sends the same requests (prompt k:
random token ids, greedy, a fixed number of new tokens, no end-of-text), split round-robin over its clients, each
client sending its next request when the last one is answered. Reported per level: aggregate tokens/s (new tokens /
wall time), p50 and p95 request latency, the aggregate against one client's, and whether every response is the one
the single client got (greedy decoding: it must be).

    python benchmarks/serve.py                   # 40 requests of 64 new tokens after a 64-token prompt per level
    python benchmarks/serve.py --quick           # a tiny model, a few requests: a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_config(quick: bool):
    import yaml

    from project.model import GPTConfig

    if quick:
        return GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)
    shape = yaml.safe_load((REPO / "configs" / "shakespeare.yaml").read_text())["model"]["config"]
    return GPTConfig(**{**shape, "vocab_size": 4096, "dropout": 0.0})


def serve(args) -> None:
    """The server process: random weights of the model, served as `serve` does, until killed."""
    import torch
    import uvicorn

    from project.formats.checkpoint import LoadedCheckpoint
    from project.model import GPT
    from project.serve.server import build_server
    from project.tokenizer import CharTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = model_config(args.quick)
    model = GPT(config).eval()
    # a stand-in vocabulary of one character per id: requests send token ids, responses come back as their text
    tokenizer = CharTokenizer("".join(chr(0x100 + i) for i in range(config.vocab_size)))
    app = build_server(LoadedCheckpoint(model, tokenizer, Path("random-weights")), model_name="bench",
                       slots=args.slots, max_waiting=1000, compile=not args.no_compile)
    scheduler = app.state.scheduler
    print(f"server: {args.slots} slots, step compiled in {scheduler.compile_seconds:.1f} s, rows exact: "
          f"{scheduler.exact}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few requests: a smoke run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 20])
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 40; quick: 8)")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--no-compile", action="store_true", help="eager decoding steps")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)

    import httpx

    from project.model import GPTConfig  # noqa: F401 (fails early where the project is not importable)

    config = model_config(args.quick)
    requests = args.requests or (8 if args.quick else 40)
    half = config.block_size // 2
    prompt_len, new_tokens = args.prompt_len or half, args.new_tokens or half
    port = args.port or free_port()
    command = [sys.executable, __file__, "--serve", "--port", str(port), "--slots", str(args.slots), "--threads",
               str(args.threads)] + (["--quick"] if args.quick else []) + (["--no-compile"] if args.no_compile else [])
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        rng = random.Random(0)
        prompts = [[rng.randrange(config.vocab_size) for _ in range(prompt_len)] for _ in range(requests)]
        body = {"model": "bench", "max_tokens": new_tokens, "temperature": 0}

        def ask(client: httpx.Client, k: int) -> tuple[str, float, int]:
            start = time.perf_counter()
            response = client.post(url, json={**body, "prompt": prompts[k]}, timeout=600)
            response.raise_for_status()
            answer = response.json()
            return answer["choices"][0]["text"], time.perf_counter() - start, answer["usage"]["completion_tokens"]

        def level(clients: int) -> tuple[float, list[float], dict[int, str]]:
            results: dict[int, tuple[str, float, int]] = {}

            def client_loop(c: int) -> None:
                with httpx.Client() as client:
                    for k in range(c, requests, clients):
                        results[k] = ask(client, k)

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(client_loop, range(clients)))
            wall = time.perf_counter() - start
            tokens = sum(r[2] for r in results.values())
            return tokens / wall, [r[1] for r in results.values()], {k: r[0] for k, r in results.items()}

        level(min(4, max(args.clients)))  # warm-up: connections, first requests
        print(f"\nServing: {config.n_layer} x {config.n_head} x {config.n_embd}, vocab {config.vocab_size}, block "
              f"{config.block_size}; {requests} requests of {prompt_len} prompt + {new_tokens} new tokens, greedy, "
              f"per level; {args.slots} slots, {args.threads} server thread(s), "
              f"{'eager' if args.no_compile else 'compiled'} steps\n")
        print("| clients | tokens/s | vs 1 client | p50 latency s | p95 latency s | same as 1 client |")
        print("|---|---|---|---|---|---|")
        alone, single = None, None
        for clients in args.clients:
            rate, latencies, texts = level(clients)
            if single is None:
                alone, single = texts, rate
            latencies.sort()
            p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
            same = sum(texts[k] == alone[k] for k in texts)
            print(f"| {clients} | {rate:,.0f} | {rate / single:.2f}x | {statistics.median(latencies):.2f} | {p95:.2f} "
                  f"| {same}/{len(texts)} |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
