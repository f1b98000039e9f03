"""Training and generation tokens/s against torch's thread count, on a quiet and on a loaded machine.

The machine is loaded by busy loops this script starts itself (`--loads 0 1 2`: none, one, two pure-Python
`while True: pass` processes, each holding a core). For each load, each thread setting runs in a fresh process
(torch reads its thread settings once), settings interleaved and repeated, medians reported:

- `1`, `2`, ...: `OMP_NUM_THREADS=N`; `2-passive`: also `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep, not spin)
- `auto`: nothing set; the process calls `project.threads.configure_threads`, as every command does, and the
  table shows the count it chose.

Training: the default config's model (configs/shakespeare.yaml: 6 x 6 x 192, bpe:4096 vocabulary, batch 16 x 128,
Muon + AdamW, bf16 autocast) in benchmarks/train.py's plain loop: `--steps` timed steps after `--warmup` ones, or
as many as `--max-seconds` allow (a thrashing setting can be 100x slower).
Generation: the same model in float32, greedy, KV cache, batch 1, a 64-token prompt and `--new-tokens` new ones.

    python benchmarks/threads.py                      # loads 0, 1, 2; threads 1, 2, auto; 2 repeats
    python benchmarks/threads.py --settings 1 2 2-passive auto --loads 0 1
    python benchmarks/threads.py --quick              # a tiny smoke run (no figures worth reading)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def worker(args) -> None:
    """One measurement in this process: print a JSON line {threads, train, generate} (tokens/s)."""
    started = None
    if args.setting == "auto":
        from project.threads import CpuSample

        started = CpuSample.now()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    import train as train_benchmark
    from project.generate import GenerationSettings, generate
    from project.training.optim import build_optimizer

    if started is not None:
        from project.threads import configure_threads

        configure_threads(started)
    setup = train_benchmark.load_setup("gpt2", args)  # configs/shakespeare.yaml
    dm = train_benchmark.make_datamodule(setup, args)
    module = train_benchmark.make_module(setup, dm.vocab_size)
    model = module.model.train()
    optimizer, scheduler = build_optimizer(model, module.optimizer_settings, total_steps=1000, fused=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dtype = train_benchmark.autocast_dtype(setup["precision"])
    timed, start = 0, 0.0
    for step, (x, y) in enumerate(dm.train_dataloader()):  # benchmarks/train.py's plain loop, stopped by time
        train_benchmark.plain_step(model, optimizer, scheduler, params, x, y, dtype)
        if step == args.warmup - 1:
            start = time.perf_counter()
        elif step >= args.warmup:
            timed += 1
            if timed == args.steps or time.perf_counter() - start > args.max_seconds:
                break
    train_tokens = timed * dm.batch_size * dm.block_size / (time.perf_counter() - start)
    model.eval()
    prompt_length = min(64, model.config.block_size // 2)
    prompt = torch.randint(0, dm.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, GenerationSettings(max_new_tokens=4, temperature=0.0))  # warm up
    start = time.perf_counter()
    generate(model, prompt, GenerationSettings(max_new_tokens=args.new_tokens, temperature=0.0))
    generate_tokens = args.new_tokens / (time.perf_counter() - start)
    print(json.dumps({"threads": torch.get_num_threads(), "train": train_tokens, "generate": generate_tokens,
                      "train_steps": timed}))


def run_worker(setting: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if setting != "auto":
        threads, _, policy = setting.partition("-")
        env["OMP_NUM_THREADS"] = threads
        if policy:
            env["OMP_WAIT_POLICY"] = policy.upper()
    command = [sys.executable, __file__, "--worker", "--setting", setting, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds), "--new-tokens", str(args.new_tokens),
               "--data-dir", args.data_dir]
    if args.data_path:
        command += ["--data-path", args.data_path]
    if args.quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise RuntimeError(f"worker {setting} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy loops running meanwhile")
    parser.add_argument("--settings", nargs="+", default=["1", "2", "auto"], help="OMP_NUM_THREADS values, or auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="stop timing training steps after this")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--data-path", default=str(SHARED / "tinyshakespeare" / "input.txt")
                        if (SHARED / "tinyshakespeare" / "input.txt").is_file() else None)
    parser.add_argument("--data-dir", default=str(REPO / "data"))
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps: checks the plumbing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.new_tokens, args.repeats = 1, 1, 8, 1
    if args.worker:
        return worker(args)

    results: dict[tuple[int, str], list[dict]] = {}
    loads: dict[int, list[str]] = {}
    for load in args.loads:
        loops = [busy_loop() for _ in range(load)]
        try:
            time.sleep(0 if args.quick else 5)
            loads[load] = [loadavg()]
            for repeat in range(args.repeats):
                order = args.settings if repeat % 2 == 0 else args.settings[::-1]  # interleaved, alternating
                for setting in order:
                    measured = run_worker(setting, args)
                    results.setdefault((load, setting), []).append(measured)
                    print(f"load {load} setting {setting}: {measured}", file=sys.stderr, flush=True)
            loads[load].append(loadavg())
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
    import torch

    print(f"\n{os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"training {args.steps} timed steps after {args.warmup}, generation {args.new_tokens} new tokens; "
          f"median of {args.repeats} interleaved repeats\n")
    print("| busy loops | threads | train tokens/s | vs best | generate tokens/s | vs best "
          "| load average (1, 5, 15 min) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for load in args.loads:
        medians = {s: {k: statistics.median(r[k] for r in results[(load, s)]) for k in ("train", "generate")}
                   for s in args.settings}
        best = {k: max(m[k] for m in medians.values()) for k in ("train", "generate")}
        for setting in args.settings:
            m = medians[setting]
            chosen = sorted({r["threads"] for r in results[(load, setting)]})
            label = f"auto ({', '.join(map(str, chosen))})" if setting == "auto" else setting
            print(f"| {load} | {label} | {m['train']:,.0f} | {m['train'] / best['train']:.2f} | {m['generate']:,.0f} "
                  f"| {m['generate'] / best['generate']:.2f} | {' -> '.join(loads[load])} |")


if __name__ == "__main__":
    main()
