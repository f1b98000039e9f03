"""Training speed and quality benchmarks; results and hardware are in benchmarks/README.md ("Training").

Speed (default): training tokens/s of each config's model, side by side in one process, interleaved repeats:
  (a) lightning  GPTModule + TextDataModule under a Trainer set up as `python -m project fit` sets it up
                 (precision, gradient clipping, log_every_n_steps, throughput monitor; no validation/checkpoints)
  (b) plain      the same model, optimizer, schedule, clipping and autocast in a hand-written PyTorch loop
  (c) naive      (b) with textbook attention (explicit causal mask + softmax) instead of scaled_dot_product_attention
  (d) compiled   (b) with the model under torch.compile (only with --compile; its compilation falls in the warmup)
Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the peak resident-set growth during the run
(sampled every 5 ms), as torch's CPU allocator is invisible to tracemalloc.

Quality (--quality): trains architecture x optimizer through the real CLI for a wall-clock budget and
tabulates the final val/bpb from TensorBoard.

    python benchmarks/train.py                      # speed, both configs
    python benchmarks/train.py --compile            # speed, plus the torch.compile'd plain loop
    python benchmarks/train.py --quality --budget-minutes 10
    python benchmarks/train.py --quick              # smoke test: tiny model, a few steps
    python benchmarks/train.py --baseline           # seconds for nanoGPT's CPU recipe: the machine's yardstick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

CONFIGS = {"gpt2": REPO / "configs" / "shakespeare.yaml", "llama": REPO / "configs" / "llama-shakespeare.yaml"}
VARIANTS = ("lightning", "plain", "naive")


def naive_attention_forward(self, x, rope=None, input_pos=None, kv_cache=None, slot=0):
    """Textbook causal self-attention: a drop-in replacement for CausalSelfAttention.forward (training path)."""
    B, T, _ = x.shape
    q, k, v = self.qkv_heads(x, rope)
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # grouped-query heads: share each k/v head
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, -1)
    return self.resid_dropout(self.proj(y))


class PeakMemory:
    """Peak memory growth over a block, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.peak, self.stop = self.rss(), self.rss(), threading.Event()

        def sample():
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, self.rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak_mib = (max(self.peak, self.rss()) - self.base) / 2**20


def load_setup(name: str, args) -> dict:
    cfg = yaml.safe_load(CONFIGS[name].read_text())
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    if args.quick:  # a tiny model: the script's plumbing, not its numbers
        model["config"].update(block_size=32, n_layer=1, n_embd=48)
        data["batch_size"] = 4
    return {"model": model, "data": data, "precision": trainer.get("precision", "32-true"),
            "log_every_n_steps": trainer.get("log_every_n_steps", 50)}


def make_datamodule(setup: dict, args):
    from project.data.datamodule import TextDataModule

    dm = TextDataModule(path=args.data_path, data_dir=args.data_dir, block_size=setup["model"]["config"]["block_size"],
                        **setup["data"])
    dm.prepare_data()
    dm.setup("fit")
    return dm


def make_module(setup: dict, vocab_size: int):
    from project.model import GPTConfig
    from project.training.module import GPTModule

    torch.manual_seed(1337)
    model = dict(setup["model"])
    config = GPTConfig(**{**model.pop("config"), "vocab_size": vocab_size})
    module = GPTModule(config, **model)
    module.configure_model()  # the weights (the Trainer would call it; a second call does nothing)
    return module


def autocast_dtype(precision: str):
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


def run_lightning(setup, dm, device, steps: int, warmup: int) -> float:
    """Seconds for `steps` timed training steps (after `warmup`) under the Trainer."""
    from lightning.pytorch import Callback, Trainer

    from project.training.monitoring import TokenThroughput

    class Clock(Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, *args):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    module = make_module(setup, dm.vocab_size)
    trainer = Trainer(
        accelerator=device.type, devices=1, max_steps=warmup + steps, precision=setup["precision"],
        gradient_clip_val=1.0, log_every_n_steps=setup["log_every_n_steps"], limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TokenThroughput(peak_flops=1e12), clock],
    )
    trainer.fit(module, datamodule=dm)
    return clock.times[-1] - clock.times[warmup - 1]


def run_plain(setup, dm, device, steps: int, warmup: int, compile: bool = False) -> float:
    """The same training step without Lightning: autocast, loss, backward, clip, step, schedule."""
    from project.training.optim import build_optimizer

    module = make_module(setup, dm.vocab_size).to(device)
    model = module.model.train()
    if compile:
        model.compile()  # as GPTModule.configure_model does with model.compile: true

    optimizer, scheduler = build_optimizer(model, module.optimizer_settings, total_steps=warmup + steps,
                                           fused=device.type in ("cuda", "cpu"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dtype = autocast_dtype(setup["precision"])
    times = []
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == warmup + steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        plain_step(model, optimizer, scheduler, params, x, y, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return times[-1] - times[warmup - 1]


def plain_step(model, optimizer, scheduler, params, x, y, dtype) -> None:
    """One training step without Lightning: autocast (when `dtype`), loss, backward, clip at 1.0, step, schedule."""
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


def run_naive(setup, dm, device, steps: int, warmup: int) -> float:
    from project.model import CausalSelfAttention

    original = CausalSelfAttention.forward
    CausalSelfAttention.forward = naive_attention_forward
    try:
        return run_plain(setup, dm, device, steps, warmup)
    finally:
        CausalSelfAttention.forward = original


def run_compiled(setup, dm, device, steps: int, warmup: int) -> float:
    return run_plain(setup, dm, device, steps, warmup, compile=True)


RUNNERS = {"lightning": run_lightning, "plain": run_plain, "naive": run_naive, "compiled": run_compiled}


def speed(args) -> None:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    steps, warmup, repeats = (2, 1, 1) if args.quick else (args.steps, args.warmup, args.repeats)
    results: dict[tuple[str, str], list[float]] = {}
    memory: dict[tuple[str, str], list[float]] = {}
    setups = {name: load_setup(name, args) for name in args.configs}
    datamodules = {name: make_datamodule(setups[name], args) for name in args.configs}
    variants = VARIANTS + ("compiled",) if args.compile else VARIANTS
    for r in range(repeats):
        for name in args.configs:
            setup, dm = setups[name], datamodules[name]
            tokens = steps * dm.batch_size * dm.block_size
            order = variants if r % 2 == 0 else variants[::-1]  # interleaved, alternating order
            for variant in order:
                with PeakMemory(device) as mem:
                    seconds = RUNNERS[variant](setup, dm, device, steps, warmup)
                results.setdefault((name, variant), []).append(tokens / seconds)
                memory.setdefault((name, variant), []).append(mem.peak_mib)
                print(f"repeat {r} {name:6s} {variant:9s} {tokens / seconds:9.0f} tokens/s  "
                      f"peak +{mem.peak_mib:.0f} MiB", file=sys.stderr, flush=True)
    print(f"\ndevice {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{steps} timed steps after {warmup} warmup, median of {repeats} interleaved repeats\n")
    print("| config | path | tokens/s (median) | vs plain loop | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|")
    for name in args.configs:
        plain = statistics.median(results[(name, "plain")])
        for variant in variants:
            tps = statistics.median(results[(name, variant)])
            print(f"| {name} | {variant} | {tps:,.0f} | {tps / plain:.3f} | "
                  f"{statistics.median(memory[(name, variant)]):,.0f} |")
    for name in args.configs:
        lit, plain, naive = (statistics.median(results[(name, v)]) for v in VARIANTS)
        loader = loader_tokens_per_second(datamodules[name], batches=50)
        print(f"\n{name}: Lightning overhead {100 * (plain / lit - 1):+.1f}% vs the plain loop; "
              f"scaled_dot_product_attention is {plain / naive:.2f}x the naive attention's speed; "
              f"the train loader alone yields {loader:,.0f} tokens/s, {loader / lit:,.0f}x what training consumes")
        if args.compile:
            print(f"{name}: torch.compile is {statistics.median(results[(name, 'compiled')]) / plain:.2f}x the plain "
                  "loop's speed (steady state, compilation excluded)")


def nanogpt_recipe_seconds(args, iterations: int, evaluate: bool = True) -> float:
    """Seconds for `iterations` of nanoGPT's documented CPU recipe (characters, 4 layers x 4 heads x 128,
    block 64, batch 12, float32 AdamW, with `evaluate` an estimate on 2 x 20 batches every 250 iterations)
    run with this project's GPT in a plain loop."""
    from project.data.datamodule import TextDataModule
    from project.model import GPT, GPTConfig

    dm = TextDataModule(path=args.data_path, data_dir=args.data_dir, tokenizer="char", block_size=64, batch_size=12)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(1337)
    model = GPT(GPTConfig(vocab_size=dm.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    val_batches = iter(dm.val_dataloader())
    start = time.perf_counter()
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if evaluate and i % 250 == 0:  # nanoGPT estimates the loss on 20 batches of each split
            model.eval()
            with torch.no_grad():
                for _ in range(40):
                    vx, vy = next(val_batches, (x, y))
                    F.cross_entropy(model(vx).flatten(0, 1), vy.flatten())
            model.train()
        if i == iterations:
            break
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - start


def nanogpt_cpu_baseline(args) -> None:
    """Time nanoGPT's 2000-iteration CPU recipe: the yardstick wall-clock budgets are scaled by (the issue's
    "10 minutes" means 10 minutes on a machine where this recipe takes about 100 s)."""
    iterations = 20 if args.quick else 2000
    seconds = nanogpt_recipe_seconds(args, iterations)
    print(f"nanoGPT CPU recipe: {iterations} iterations in {seconds:.1f} s (torch threads {torch.get_num_threads()}); "
          f"10 reference minutes = {seconds / 100 * 10 * iterations / 2000:.1f} minutes here")


# training settings compared by --steps-per-budget: (label, tokenizer, model.config overrides, batch size)
SWEEP = [
    ("gpt2 6x192", "gpt2", {}, 16),
    ("bpe:1024 6x192", "bpe:1024", {}, 16),
    ("bpe:2048 6x192", "bpe:2048", {}, 16),
    ("bpe:4096 6x192", "bpe:4096", {}, 16),
    ("bpe:8192 6x192", "bpe:8192", {}, 16),
    ("char 6x192", "char", {}, 16),
    ("bpe:4096 6x256", "bpe:4096", {"n_embd": 256, "n_head": 8}, 16),
    ("bpe:4096 8x256", "bpe:4096", {"n_layer": 8, "n_embd": 256, "n_head": 8}, 16),
    ("bpe:4096 4x256", "bpe:4096", {"n_layer": 4, "n_embd": 256, "n_head": 8}, 16),
    ("bpe:2048 6x256", "bpe:2048", {"n_embd": 256, "n_head": 8}, 16),
]


TRAIN_SECONDS = 570  # of the 10-minute budget; start-up, validations and samples take the rest


def steps_per_budget(args) -> None:
    """Training steps of each SWEEP setting (the default config's optimizer and precision) that fit in 10
    reference minutes, from step times measured side by side with nanoGPT's recipe in this process.

    Quality per step does not depend on the machine, so training each setting for its step count gives the
    quality a 10-minute budget buys on the reference machine, however busy this one is.
    """
    setups = []
    for label, tokenizer, overrides, batch_size in SWEEP[:2] if args.quick else SWEEP:
        if args.settings and label not in args.settings:
            continue
        setup = load_setup("gpt2", args)
        setup["model"]["config"].update(overrides)
        setup["data"].update(tokenizer=tokenizer, batch_size=batch_size)
        setups.append((label, setup, make_datamodule(setup, args)))
    device = torch.device("cpu")
    per_step = {label: [] for label, _, _ in setups}
    recipe = []  # seconds per nanoGPT iteration
    for _ in range(args.repeats):
        recipe.append(nanogpt_recipe_seconds(args, 3 if args.quick else 30, evaluate=False) / (3 if args.quick else 30))
        for label, setup, dm in setups:
            per_step[label].append(run_plain(setup, dm, device, args.steps, args.warmup) / args.steps)
    reference_iteration = 100 / 2000  # seconds per recipe iteration on the reference machine
    scale = reference_iteration / statistics.median(recipe)
    print(f"nanoGPT recipe here: {statistics.median(recipe) * 2000:.0f} s per 2000 iterations")
    print("| setting | tokens/step | ms/step here | reference ms/step | steps in 570 s | tokens/s (reference) |")
    print("|---|---:|---:|---:|---:|---:|")
    budget = {}
    for label, setup, dm in setups:
        step = statistics.median(per_step[label])
        tokens = setup["data"]["batch_size"] * setup["model"]["config"]["block_size"]
        budget[label] = {"steps": int(TRAIN_SECONDS / (step * scale)), "tokens_per_second": tokens / (step * scale),
                         "bytes_per_token": dm.bytes_per_token("val")}
        print(f"| {label} | {tokens} | {step * 1e3:.0f} | {step * scale * 1e3:.0f} | {budget[label]['steps']} "
              f"| {budget[label]['tokens_per_second']:,.0f} |")
    Path(args.budget_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.budget_file).write_text(json.dumps(budget, indent=1))


def budget_quality(args) -> None:
    """Train SWEEP settings through the real CLI for the steps that 10 reference minutes buy (read from
    --steps-per-budget's file), several runs at once with one thread each. Quality per step does not depend on
    how fast or busy the machine is, so this measures a 10-minute budget even on a shared machine."""
    budget = json.loads(Path(args.budget_file).read_text())
    save_dir = Path(args.save_dir).resolve()
    runs = {}
    for label, tokenizer, overrides, batch_size in SWEEP:
        if label not in budget or (args.settings and label not in args.settings):
            continue
        checks = 4  # validations per run, the last one at the final step
        steps = 4 if args.quick else int(budget[label]["steps"] * args.budget_fraction) // checks * checks
        name = label.replace(":", "").replace(" ", "-")
        command = [sys.executable, "-m", "project", "fit", "--config", str(CONFIGS["gpt2"]),
                   "--data.tokenizer", tokenizer, "--data.batch_size", str(batch_size), "--data.data_dir", args.data_dir,
                   "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps // checks),
                   "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", name,
                   "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false"]
        if args.quick:  # a tiny model: the plumbing, not the numbers
            overrides = {"n_layer": 1, "n_embd": 48, "n_head": 2, "block_size": 32}
            command += ["--trainer.limit_val_batches", "2", "--samples.max_new_tokens", "5"]
        for key, value in overrides.items():
            command += [f"--model.config.{key}", str(value)]
        if args.data_path:
            command += ["--data.path", args.data_path]
        runs[label] = (name, steps, command)
    pending, active, finished = list(runs), {}, {}
    while pending or active:
        while pending and len(active) < args.parallel:
            label = pending.pop(0)
            print("$ " + " ".join(runs[label][2][1:]), file=sys.stderr, flush=True)
            active[label] = (time.perf_counter(), subprocess.Popen(
                runs[label][2], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}))
        time.sleep(5)
        for label, (start, process) in list(active.items()):
            if process.poll() is not None:
                if process.returncode != 0:
                    print(process.stderr.read()[-3000:], file=sys.stderr)
                finished[label] = (time.perf_counter() - start) / 60
                del active[label]
    print("| setting | steps | val/bpb @25% | @50% | @75% | final | tokens/s (reference) | bytes/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, (name, steps, _) in runs.items():
        bpb = [f"{v:.3f}" for _, v in last_scalars(save_dir / name / "version_0").get("val/bpb", [])]
        bpb = (["-"] * 4 + bpb)[-4:]
        print(f"| {label} | {steps} | {' | '.join(bpb)} | {budget[label]['tokens_per_second']:,.0f} "
              f"| {budget[label]['bytes_per_token']:.2f} |")


def loader_tokens_per_second(dm, batches: int) -> float:
    """Tokens/s of the training DataLoader by itself (its workers included): is data loading a bottleneck?"""
    loader = iter(dm.train_dataloader())
    next(loader)  # worker start-up is a one-off cost, not throughput
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(loader)
    return batches * x.numel() / (time.perf_counter() - start)


def last_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def quality_command(arch: str, optimizer: str, args, save_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "project", "fit", "--config", str(CONFIGS[arch]),
               "--model.optimizer.name", optimizer, "--trainer.logger.init_args.save_dir", str(save_dir),
               "--trainer.logger.init_args.name", f"{arch}-{optimizer}", "--trainer.logger.init_args.version", "0",
               "--data.data_dir", args.data_dir]
    if args.data_path:
        command += ["--data.path", args.data_path]
    if args.quick:
        command += ["--model.config.n_layer", "1", "--model.config.n_embd", "48", "--model.config.block_size", "32",
                    "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches",
                    "2", "--trainer.log_every_n_steps", "1", "--samples.max_new_tokens", "5"]
    else:
        minutes = args.budget_minutes
        command += ["--trainer.max_time", f"00:00:{int(minutes):02d}:{round(60 * (minutes % 1)):02d}"]
    return command


def quality(args) -> None:
    save_dir = Path(args.save_dir).resolve()
    rows = []
    for arch in args.configs:
        for optimizer in ("adamw", "muon"):
            command = quality_command(arch, optimizer, args, save_dir)
            print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
            minutes = (time.perf_counter() - start) / 60
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                rows.append(f"| {arch} | {optimizer} | failed (exit {result.returncode}) | | | | |")
                continue
            logged = last_scalars(save_dir / f"{arch}-{optimizer}" / "version_0")
            bpb = logged.get("val/bpb", [(0, float("nan"))])
            tps = [v for _, v in logged.get("train/tokens_per_sec", [])]
            steps = max((s for _, s in [(0, 0)] + [(v, s) for s, v in logged.get("train/loss", [])]), default=0)
            rows.append(f"| {arch} | {optimizer} | {bpb[-1][1]:.4f} (step {bpb[-1][0]}) | {min(v for _, v in bpb):.4f} "
                        f"| {steps} | {f'{statistics.median(tps):,.0f}' if tps else 'n/a'} | {minutes:.1f} |")
    budget = "quick" if args.quick else f"{args.budget_minutes:g} min"
    print(f"\nquality, budget {budget} per run (TensorBoard logs in {save_dir})\n")
    print("| architecture | optimizer | final val/bpb | best val/bpb | steps | train tokens/s | wall min |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-path", default=str(SHARED / "tinyshakespeare" / "input.txt")
                        if (SHARED / "tinyshakespeare" / "input.txt").is_file() else None)
    parser.add_argument("--data-dir", default=str(REPO / "data"))
    parser.add_argument("--quick", action="store_true", help="tiny model and a few steps: checks the plumbing")
    parser.add_argument("--compile", action="store_true", help="speed: add the torch.compile'd plain loop")
    parser.add_argument("--quality", action="store_true", help="architecture x optimizer val/bpb under a budget")
    parser.add_argument("--baseline", action="store_true", help="time nanoGPT's CPU recipe (the budget yardstick)")
    parser.add_argument("--steps-per-budget", action="store_true",
                        help="steps of each tokenizer/shape setting that fit 10 reference minutes")
    parser.add_argument("--budget-quality", action="store_true",
                        help="train SWEEP settings for the steps --steps-per-budget found (one thread per run)")
    parser.add_argument("--settings", nargs="*", help="only these SWEEP labels")
    parser.add_argument("--parallel", type=int, default=2, help="--budget-quality: runs at once")
    parser.add_argument("--budget-fraction", type=float, default=1.0,
                        help="--budget-quality: train for this fraction of the 10-minute step budget")
    parser.add_argument("--budget-file", default=str(REPO / "runs" / "steps-per-budget.json"))
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="--quality: wall-clock per run")
    parser.add_argument("--save-dir", default=str(REPO / "runs" / "quality"), help="--quality: TensorBoard logs")
    args = parser.parse_args(argv)
    if args.baseline:
        nanogpt_cpu_baseline(args)
    elif args.steps_per_budget:
        steps_per_budget(args)
    elif args.budget_quality:
        budget_quality(args)
    elif args.quality:
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
