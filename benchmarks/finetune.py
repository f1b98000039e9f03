"""Fine-tuning benchmarks; results and hardware are in benchmarks/README.md ("Fine-tuning").

Quality (default), on the TinyShakespeare sets (`python -m project finetune-data`), through the real command line
(`python -m project finetune ...` with configs/finetune/*.yaml), every run the same number of steps:
  classification   test accuracy from the pretrained base, from the same architecture with random weights, and
                   the majority class's share of the same test texts
  instructions     test loss on the responses of the base (before any step), after full fine-tuning, after LoRA
The base is pretrained first on the sets' pretrain.txt (TinyShakespeare without the validation and test speeches),
or given with --base.

Speed (--speed; run it alone, through /work/bin/quiet): LoRA against full fine-tuning of the same base in one
process, interleaved repeats: trainable parameters, optimizer state, median step time (forward, backward, AdamW).

    python benchmarks/finetune.py --pretrain-steps 600              # quality, pretraining the base first
    python benchmarks/finetune.py --base runs/base/version_0/checkpoints/last.ckpt --steps 300
    python benchmarks/finetune.py --speed --base CKPT
    python benchmarks/finetune.py --quick                           # smoke test: a tiny base, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

import torch  # noqa: E402

CONFIGS = REPO / "configs" / "finetune"


def project(*args: str, cwd: Path) -> str:
    """`python -m project ARGS` in a subprocess; what it printed (its stderr's tail on failure)."""
    result = subprocess.run([sys.executable, "-m", "project", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(f"python -m project {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_folder(work: Path, name: str) -> list[str]:
    """Logger flags putting a run at work/runs/NAME/version_0 (removed first, so reruns replace it)."""
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    return ["--trainer.logger.init_args.save_dir", str(work / "runs"), "--trainer.logger.init_args.name", name,
            "--trainer.enable_progress_bar", "false"]


def finetune(work: Path, name: str, subcommand: str, configs: list[str], *args: str) -> dict[str, list[float]]:
    """One `python -m project finetune` run; the scalars it logged (`fit`) or printed (`validate`, `test`: they
    write no run folder)."""
    flags = [f for config in configs for f in ("--config", str(CONFIGS / config))]
    printed = project("finetune", subcommand, *flags, *args, *run_folder(work, name), cwd=work)
    if subcommand != "fit":
        return {tag: [float(value)] for tag, value in re.findall(r"((?:val|test)/\w+)\W+([-+\d.eE]+)", printed)}
    return scalars(work / "runs" / name / "version_0")


def last_checkpoint(work: Path, name: str) -> str:
    return str(work / "runs" / name / "version_0" / "checkpoints" / "last.ckpt")


def random_twin(base: str, out: Path) -> str:
    """A checkpoint with the base's architecture and tokenizer but freshly initialised weights."""
    from project.formats.checkpoint import read_checkpoint
    from project.model import GPT, GPTConfig

    checkpoint = read_checkpoint(base)
    torch.manual_seed(1337)
    model = GPT(GPTConfig(**checkpoint["hyper_parameters"]["config"]))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": checkpoint["hyper_parameters"]["config"]},
                "tokenizer": checkpoint["tokenizer"]}, out)
    return str(out)


def majority_share(base: str, data: Path) -> tuple[float, int]:
    """The most frequent training label's share of the test texts that fit the base's context, and their number."""
    from collections import Counter

    from project.data.finetune import read_records
    from project.formats.checkpoint import load_model

    loaded = load_model(base)
    fits = lambda r: len(loaded.tokenizer.encode(r.text)) <= loaded.model.config.block_size  # noqa: E731
    train = [r for r in read_records(data / "speakers" / "train.csv", "classify") if fits(r)]
    test = [r for r in read_records(data / "speakers" / "test.csv", "classify") if fits(r)]
    majority = Counter(r.label for r in train).most_common(1)[0][0]
    return sum(r.label == majority for r in test) / len(test), len(test)


def quality(args, work: Path, base: str, data: Path) -> dict:
    steps = ["--trainer.max_steps", str(args.steps)]
    classify = {}
    for name, weights in (("pretrained", base), ("random", random_twin(base, work / "random.ckpt"))):
        finetune(work, f"classify-{name}", "fit", ["classify.yaml"], "--model.init_from", weights, *steps, *args.extra)
        tested = finetune(work, f"classify-{name}-test", "test", ["classify.yaml"],
                          "--ckpt_path", last_checkpoint(work, f"classify-{name}"))
        classify[name] = {"test/acc": tested["test/acc"][-1], "test/loss": tested["test/loss"][-1]}
    share, texts = majority_share(base, data)
    classify["majority"] = {"test/acc": share, "texts": texts}
    instruct = {"base": finetune(work, "instruct-base-test", "test", ["instruct.yaml"], "--model.init_from", base)}
    for name, configs in (("full", ["instruct.yaml"]), ("lora", ["instruct.yaml", "lora.yaml"])):
        fit = finetune(work, f"instruct-{name}", "fit", configs, "--model.init_from", base, *steps, *args.extra)
        instruct[name] = finetune(work, f"instruct-{name}-test", "test", configs,
                                  "--ckpt_path", last_checkpoint(work, f"instruct-{name}"))
        instruct[name]["val/loss"] = fit["val/loss"]
    return {"classify": classify, "instruct": {k: {"test/loss": v["test/loss"][-1], "val/loss": v.get("val/loss")}
                                               for k, v in instruct.items()}}


def speed(args, base: str, data: Path) -> dict:
    """LoRA vs full fine-tuning steps on the same batches, interleaved repeats, medians."""
    import yaml

    from project.data.finetune import Example, instruction_batch, read_records
    from project.lora import LoRASettings
    from project.training.finetune import FineTuneModule
    from project.training.optim import OptimizerSettings, build_optimizer

    lora = yaml.safe_load((CONFIGS / "lora.yaml").read_text())["model"]["lora"]
    variants = {"full": None, "lora": LoRASettings(**lora)}
    modules, optimizers = {}, {}
    for name, settings in variants.items():
        torch.manual_seed(0)
        module = FineTuneModule(task="instruct", init_from=base, template="instruct", lora=settings).train()
        module.configure_model()  # the base's weights (and the adapters), as the Trainer does
        modules[name] = module
        optimizers[name], _ = build_optimizer(module.optimized_module(), OptimizerSettings(), total_steps=1000)
    module = modules["full"]
    limit = module.config.block_size + 1
    examples = [Example(*module.template.encode(r.messages, module.tokenizer))
                for r in read_records(data / "instruct" / "train.jsonl", "instruct", template=module.template)]
    examples = [e for e in examples if len(e.ids) <= limit]
    batches = [instruction_batch(examples[i:i + args.batch_size], module.tokenizer.eot_id)
               for i in range(0, args.batch_size * (args.timed_steps + args.warmup), args.batch_size)]

    def run(name: str) -> float:
        module, optimizer = modules[name], optimizers[name]
        for i, (x, y) in enumerate(batches):
            if i == args.warmup:
                start = time.perf_counter()
            loss = module.loss(module(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / args.timed_steps

    times = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
            times[name].append(run(name))
    results = {}
    for name, module in modules.items():
        state = sum(t.numel() * t.element_size() for s in optimizers[name].state.values() for t in s.values()
                    if torch.is_tensor(t))
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        results[name] = {"trainable": trainable, "optimizer_state_bytes": state,
                         "step_ms": 1000 * statistics.median(times[name]), "step_ms_all": [1000 * t for t in times[name]]}
    results["tokens_per_batch"] = statistics.mean(int(x.numel()) for x, _ in batches)
    results["threads"] = torch.get_num_threads()
    return results


def pretrain(args, work: Path, data: Path) -> str:
    """The base: configs/shakespeare.yaml (or debug.yaml with --quick) on pretrain.txt, for --pretrain-steps."""
    config = "debug.yaml" if args.quick else "shakespeare.yaml"
    extra = ["--data.tokenizer", "bpe:300", "--model.config.block_size", "128"] if args.quick else []
    project("fit", "--config", str(REPO / "configs" / config), "--data.path", str(data / "pretrain.txt"),
            "--data.data_dir", str(work / "data"), "--trainer.max_steps", str(args.pretrain_steps),
            "--trainer.max_time", "null", *extra, *run_folder(work, "base"), cwd=work)
    return last_checkpoint(work, "base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-finetune", help="folder for the data, runs and results")
    parser.add_argument("--data-path", default=str(SHARED / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--base", help="a pretrained checkpoint (default: pretrain one for --pretrain-steps)")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every run")
    parser.add_argument("--speed", action="store_true", help="LoRA vs full step time and memory (run it quiet)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny base, a few steps")
    args = parser.parse_args()
    args.extra = []
    if args.quick:
        args.pretrain_steps, args.steps, args.timed_steps, args.repeats, args.warmup = 10, 4, 2, 2, 1
        args.extra = ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2"]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data" / "finetune"  # where configs/finetune/*.yaml read it, relative to the runs' folder
    if not (data / "meta.json").is_file():
        from project.data.shakespeare_tasks import build_finetune_data

        build_finetune_data(out=str(data), path=args.data_path)
    base = str(Path(args.base).resolve()) if args.base else pretrain(args, work, data)
    print(f"base: {base}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {"base": base, "load_before": os.getloadavg()}
    if args.speed:
        results["speed"] = speed(args, base, data)
        print("| fine-tuning | trainable parameters | optimizer state (MiB) | step (ms, median) | all repeats (ms) |")
        print("|---|---:|---:|---:|---|")
        for name in ("full", "lora"):
            r = results["speed"][name]
            print(f"| {name} | {r['trainable']:,} | {r['optimizer_state_bytes'] / 2**20:.2f} | {r['step_ms']:.1f} | "
                  f"{', '.join(f'{t:.1f}' for t in r['step_ms_all'])} |")
        print(f"batch {args.batch_size}, {results['speed']['tokens_per_batch']:.0f} tokens a batch on average, "
              f"{results['speed']['threads']} threads")
    else:
        results["quality"] = quality(args, work, base, data)
        classify, instruct = results["quality"]["classify"], results["quality"]["instruct"]
        print(f"| classifier ({args.steps} steps) | test accuracy |\n|---|---:|")
        for name in ("pretrained", "random", "majority"):
            print(f"| {name} | {classify[name]['test/acc']:.3f} |")
        print(f"({classify['majority']['texts']} test texts)\n")
        print(f"| instructions ({args.steps} steps) | test response loss (nats) |\n|---|---:|")
        for name in ("base", "full", "lora"):
            print(f"| {name} | {instruct[name]['test/loss']:.3f} |")
    results["load_after"] = os.getloadavg()
    (work / ("speed.json" if args.speed else "quality.json")).write_text(json.dumps(results, indent=2) + "\n")
    print(f"load average after: {results['load_after'][0]:.2f}")


if __name__ == "__main__":
    main()
