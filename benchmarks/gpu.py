"""GPT-2 124M on one GPU, trained the way a user trains it, then sampled and exported from its checkpoint.

    python benchmarks/gpu.py --data-path .gpu/data/tinyshakespeare/input.txt --tiktoken-cache .gpu/data/tiktoken
    python benchmarks/gpu.py --cpu-smoke --out smoke.json       # the same script end to end on a CPU (the tests)
    python benchmarks/gpu.py --validation-memory --device cpu --batch-sizes 2,4    # only the validation step's peak

1. `fit` through the project's own command line (`configs/gpt2-124m.yaml`: bf16-mixed, torch.compile, batch 16 x
   1024 tokens x 2 accumulated) for `--steps` optimizer steps, with a probe callback that records the device's
   peak memory and profiles one training micro-batch for the attention kernel actually run. Tokens/s and MFU come
   from the run's own logs (`train/tokens_per_sec`, `train/mfu`: project/training/monitoring.py), the falling
   loss from `train/loss`. MFU is given against the GPU's datasheet bf16 dense peak and against a bf16 matmul
   measured on the spot; FLOPs per token are GPT.flops_per_token's 6 N + 12 L C T (PaLM's convention, which
   counts the whole attention matrix, not its causal half).
2. The validation step's peak memory on the 124M model, as the project computes it now (the loss in row
   chunks, perplexity from the loss) and as it did before (a float32 copy of all logits for the loss, another
   for torchmetrics' Perplexity): `torch.cuda.max_memory_allocated` on a GPU; on a CPU the peak resident-set
   growth, each variant in a fresh process.
3. `generate` and `export` (transformers format, its logits compared with ours) from the run's last.ckpt.

Everything printed is also written as JSON (`--out`). A GPU machine without a package index needs the three
wheels of ../shared/wheels/gpu/ (see its README) and the data copied beside the checkout (TinyShakespeare and
the tiktoken cache). `--cpu-smoke` runs every step on a CPU with configs/debug.yaml's tiny model and a few steps:
its numbers say nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bf16 dense peaks from the datasheets (FLOP/s), by a name the device's contains; H200 has H100's compute
DATASHEET_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "GH200": 989.4e12, "A100": 312e12, "L40S": 362.05e12,
                  "L4": 121e12}
ATTENTION_WORDS = ("scaled_dot_product", "flash", "fmha", "attention", "sdpa", "cudnn_attn")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def environment(device) -> dict:
    """What ran: versions, the device, and which attention backends torch may choose from."""
    import lightning

    info = {"torch": torch.__version__, "lightning": lightning.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cuda": torch.version.cuda}
    if device.type == "cuda":
        info["sdpa_backends_enabled"] = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
                                         for name in ("flash", "mem_efficient", "cudnn", "math")}
    return info


def datasheet_peak(device_name: str) -> float | None:
    return next((peak for name, peak in DATASHEET_BF16.items() if name in device_name), None)


# --- 1. training ------------------------------------------------------------------------------------------------


class Probe(Callback):
    """Added to the benchmark's fit (`--trainer.callbacks+=__main__.Probe`): the device's peak memory over the
    training, and one profiled training micro-batch: the attention operators and kernels that really ran."""

    def __init__(self, profile_step: int = 5) -> None:
        self.profile_step = profile_step
        self.profiler = None
        self.attention: list[str] = []
        self.peak_allocated_mib = self.peak_reserved_mib = None

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.profiler is None and not self.attention and trainer.global_step >= self.profile_step:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.profiler is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.profiler.__exit__(None, None, None)
        names = {event.key for event in self.profiler.key_averages()}
        self.attention = sorted(n for n in names if any(word in n.lower() for word in ATTENTION_WORDS))
        self.profiler = None

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            self.peak_allocated_mib = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            self.peak_reserved_mib = torch.cuda.max_memory_reserved(pl_module.device) / 2**20
        else:
            self.peak_allocated_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def train(args, device, work: Path) -> dict:
    from project.cli import run_lightning
    from project.training.monitoring import measure_matmul_flops

    name = environment(device)["device_name"]
    datasheet = datasheet_peak(name)
    measured = measure_matmul_flops(torch.bfloat16, size=8192 if device.type == "cuda" else 1024,
                                    repeats=20 if device.type == "cuda" else 3, device=device)
    peak = datasheet or measured
    fit = ["fit", "--config", str(args.config), "--trainer.max_steps", str(args.steps),
           "--trainer.val_check_interval", str(args.steps), "--trainer.limit_val_batches", str(args.val_batches),
           "--trainer.log_every_n_steps", str(args.log_every), "--trainer.default_root_dir", str(work),
           "--trainer.enable_progress_bar", "false", "--trainer.max_time", f"00:00:{args.budget_seconds // 60:02d}:{args.budget_seconds % 60:02d}",
           "--data.data_dir", str(work / "data"), "--throughput.peak_flops", str(peak),
           "--samples.max_new_tokens", str(args.sample_tokens),
           "--trainer.callbacks+=__main__.Probe", "--trainer.callbacks.profile_step", str(args.profile_step)]
    if args.data_path:
        fit += ["--data.path", str(args.data_path)]
    if device.type == "cpu":
        fit += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
                "--model.compile", str(args.compile).lower(), "--data.num_workers", "0"]
    log(f"fit: {' '.join(fit[1:])}")
    start = time.perf_counter()
    trainer = run_lightning(fit)
    seconds = time.perf_counter() - start
    probe = next(cb for cb in trainer.callbacks if isinstance(cb, Probe))
    run_dir = Path(trainer.log_dir)
    scalars = read_scalars(run_dir)
    speeds = [v for _, v in scalars.get("train/tokens_per_sec", [])]
    steady = speeds[2:] or speeds  # the first intervals hold the compilation
    tokens_per_sec = statistics.median(steady) if steady else None
    flops_per_token = trainer.lightning_module.model.flops_per_token(trainer.datamodule.block_size)
    mfu = (lambda p: tokens_per_sec * flops_per_token / p if tokens_per_sec and p else None)
    return {
        "steps": trainer.global_step, "seconds": seconds, "run_dir": str(run_dir),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "tokens_per_sec": tokens_per_sec, "tokens_per_sec_by_interval": speeds,
        "flops_per_token": flops_per_token, "peak_flops_datasheet": datasheet, "peak_flops_measured_matmul": measured,
        "mfu_datasheet": mfu(datasheet), "mfu_measured_matmul": mfu(measured),
        "loss": scalars.get("train/loss", []), "val_loss": scalars.get("val/loss", []),
        "peak_memory_allocated_mib": probe.peak_allocated_mib, "peak_memory_reserved_mib": probe.peak_reserved_mib,
        "attention_kernels": probe.attention,
    }


# --- 2. the validation step's memory --------------------------------------------------------------------------


def model_config(config_path: Path, vocab_size: int):
    import yaml

    from project.model import GPTConfig

    settings = yaml.safe_load(config_path.read_text(encoding="utf-8"))["model"]["config"]
    return GPTConfig(**{**settings, "vocab_size": vocab_size})


def validation_step_peak_mib(variant: str, config, batch_size: int, device) -> float:
    """Peak memory of one validation step (bf16 autocast, no grad) beyond what was allocated before it
    (benchmarks/train.py's PeakMemory: allocated device memory, or on a CPU the resident set sampled every 5 ms).

    "after": GPTModule.validation_step as it is (the loss in row chunks, perplexity from the loss). "before": the
    step this project had until now: the loss on a float32 copy of all logits, then torchmetrics' Perplexity on
    another (which takes a float32 softmax of them)."""
    import torch.nn.functional as F
    from torchmetrics.text import Perplexity

    from project.training.module import GPTModule
    from train import PeakMemory  # benchmarks/train.py, beside this script

    torch.manual_seed(0)
    module = GPTModule(config)
    module.configure_model()
    module = module.to(device).eval()
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    perplexity = Perplexity().to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16), PeakMemory(device) as peak:
        if variant == "after":
            module.validation_step((x, y), 0)
        else:
            logits = module(x)
            module.eval_loss.update(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), weight=y.numel())
            perplexity.update(logits.float(), y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return peak.peak_mib


def validation_memory(config_path: Path, vocab_size: int, batch_sizes: list[int], device) -> list[dict]:
    """Both variants at each batch size; on a CPU each measurement in a fresh process, with large blocks returned
    to the OS when freed (so the resident set follows what is allocated)."""
    rows = []
    for batch_size in batch_sizes:
        row = {"batch_size": batch_size}
        for variant in ("before", "after"):
            if device.type == "cuda":
                config = model_config(config_path, vocab_size)
                row[variant] = validation_step_peak_mib(variant, config, batch_size, device)
                continue
            command = [sys.executable, __file__, "--measure-validation-step", variant, "--config", str(config_path),
                       "--vocab-size", str(vocab_size), "--batch-sizes", str(batch_size), "--device", "cpu"]
            done = subprocess.run(command, capture_output=True, text=True, check=True,
                                  env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            row[variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
        log(f"validation step, batch {batch_size}: before {row['before']:,.0f} MiB, after {row['after']:,.0f} MiB")
        rows.append(row)
    return rows


# --- 3. generate and export --------------------------------------------------------------------------------------


def run_command(*words: str) -> tuple[str, float]:
    """`python -m project WORDS...` in this process: its standard output and seconds."""
    from project.commands import main

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        main(list(words))
    return out.getvalue(), time.perf_counter() - start


def generate_and_export(checkpoint: str, device, work: Path, new_tokens: int) -> dict:
    from project.formats.checkpoint import load_checkpoint

    text, generate_seconds = run_command("generate", "--ckpt_path", checkpoint, "--prompt", "ROMEO:",
                                         "--generation.max_new_tokens", str(new_tokens),
                                         "--generation.temperature", "0", "--device", device.type)
    log(f"generate: {generate_seconds:.1f} s, {text.strip()[:80]!r}")
    export_dir = work / "export"
    _, export_seconds = run_command("export", "--ckpt_path", checkpoint, "--out", str(export_dir))
    result = {"generate_seconds": generate_seconds, "generated": text, "export_seconds": export_seconds,
              "export_files": sorted(p.name for p in export_dir.iterdir())}
    try:
        import transformers
    except ImportError:
        return result
    ours = load_checkpoint(checkpoint)
    ids = torch.tensor([ours.tokenizer.encode("ROMEO:")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), local_files_only=True).eval()
    with torch.no_grad():
        result["export_max_logit_difference"] = (theirs(ids).logits - ours.model(ids)).abs().max().item()
    log(f"export: {export_seconds:.1f} s; transformers' logits within {result['export_max_logit_difference']:.1e}")
    return result


# --- the run -------------------------------------------------------------------------------------------------------


def summary(result: dict) -> str:
    env, fit = result["environment"], result.get("train")
    lines = [f"{env['device_name']}, torch {env['torch']}, lightning {env['lightning']}"]
    if fit:
        first = fit["loss"][0] if fit["loss"] else (None, float("nan"))
        last = fit["loss"][-1] if fit["loss"] else (None, float("nan"))
        percent = lambda value: f"{100 * value:.1f}%" if value else "n/a"
        lines += [
            f"trained {fit['steps']} steps in {fit['seconds']:.0f} s: {fit['tokens_per_sec'] or 0:,.0f} tokens/s "
            f"(median after the first intervals), MFU {percent(fit['mfu_datasheet'])} of the datasheet peak, "
            f"{percent(fit['mfu_measured_matmul'])} of a measured bf16 matmul "
            f"({fit['peak_flops_measured_matmul'] / 1e12:.2f} TFLOP/s)",
            f"train/loss {first[1]:.3f} (step {first[0]}) -> {last[1]:.3f} (step {last[0]})",
            f"peak memory: {fit['peak_memory_allocated_mib'] or 0:,.0f} MiB allocated"
            + (f", {fit['peak_memory_reserved_mib']:,.0f} MiB reserved" if fit["peak_memory_reserved_mib"] else ""),
            f"attention: {', '.join(fit['attention_kernels']) or 'none seen'}",
        ]
    for row in result.get("validation_memory", []):
        lines.append(f"validation step, batch {row['batch_size']}: {row['before']:,.0f} MiB before, "
                     f"{row['after']:,.0f} MiB now")
    if "sharing" in result:
        lines.append(f"generate {result['sharing']['generate_seconds']:.1f} s, export "
                     f"{result['sharing']['export_seconds']:.1f} s, exported logits within "
                     f"{result['sharing'].get('export_max_logit_difference', float('nan')):.1e}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "gpt2-124m.yaml")
    parser.add_argument("--data-path", type=Path, help="the corpus (default: TinyShakespeare under the work folder)")
    parser.add_argument("--tiktoken-cache", type=Path, help="tiktoken's cache folder (sets TIKTOKEN_CACHE_DIR)")
    parser.add_argument("--work", type=Path, default=Path("gpu-benchmark"), help="folder for runs and exports")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps to train")
    parser.add_argument("--budget-seconds", type=int, default=300, help="the fit stops after this long (max_time)")
    parser.add_argument("--log-every", type=int, default=10, help="logging interval in steps (tokens/s readings)")
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--profile-step", type=int, default=20, help="the step whose first micro-batch is profiled")
    parser.add_argument("--sample-tokens", type=int, default=64, help="tokens of the text sample after validation")
    parser.add_argument("--generate-tokens", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="on a CPU: compile too (the GPU config always does)")
    parser.add_argument("--batch-sizes", default="16", help="validation memory: batch sizes, comma-separated")
    parser.add_argument("--vocab-size", type=int, default=50257, help="validation memory: the model's vocabulary")
    parser.add_argument("--validation-memory", action="store_true", help="only measure the validation step")
    parser.add_argument("--cpu-smoke", action="store_true", help="everything on a CPU, tiny model, a few steps")
    parser.add_argument("--measure-validation-step", choices=("before", "after"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.config, args.steps, args.log_every = "cpu", REPO / "configs" / "debug.yaml", 6, 2
        args.val_batches, args.profile_step, args.sample_tokens, args.generate_tokens = 2, 2, 8, 16
        args.batch_sizes, args.vocab_size = "2", 65
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiktoken_cache:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(args.tiktoken_cache.resolve())

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.measure_validation_step:  # one measurement in this (fresh) process: see validation_memory
        peak = validation_step_peak_mib(args.measure_validation_step, model_config(args.config, args.vocab_size),
                                        batch_sizes[0], device)
        print(json.dumps({"peak_mib": peak}))
        return {}
    result = {"environment": environment(device), "arguments": {k: str(v) for k, v in vars(args).items()}}
    log(json.dumps(result["environment"]))
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.validation_memory:
        result["train"] = train(args, device, args.work.resolve())
    result["validation_memory"] = validation_memory(args.config, args.vocab_size, batch_sizes, device)
    if not args.validation_memory:
        result["sharing"] = generate_and_export(result["train"]["checkpoint"], device, args.work.resolve(),
                                                args.generate_tokens)
    print(summary(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
