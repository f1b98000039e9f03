"""The default config on a busy machine: `fit` under a shortened time budget while busy loops hold cores.

Each run is the real command line, `python -m project fit --config configs/shakespeare.yaml --trainer.max_time
<budget>` (the config's max_steps: 1,000), one after the other, while `--loads` busy loops this script starts
(pure-Python `while True: pass` processes) each hold a core. With `--baseline DIR` (another checkout, e.g. the
commit before a change) its runs interleave with this tree's. `--variants` adds environment settings to this
tree's runs, e.g. `OMP_NUM_THREADS=2` to keep torch's own thread count. Read from each run's TensorBoard events:
steps done, the learning rate of the last step as a share of the peak, the final val/loss and val/bpb.

    python benchmarks/busy.py --baseline ../baseline --minutes 2 --loads 1 --variants OMP_NUM_THREADS=2
    python benchmarks/busy.py --baseline ../baseline --minutes 4 --loads 1 --env OMP_NUM_THREADS=1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from math import nan
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def last_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def fit(tree: Path, env: dict[str, str], minutes: float, work: Path, name: str, args) -> dict:
    save_dir = work / "runs"
    command = [sys.executable, "-m", "project", "fit", "--config", str(tree / "configs" / "shakespeare.yaml"),
               "--trainer.max_time", f"00:00:{int(minutes):02d}:{round(60 * (minutes % 1)):02d}",
               "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", name,
               "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false",
               "--data.data_dir", str(work / "data")]
    if args.data_path:
        command += ["--data.path", args.data_path]
    if args.log_every:
        command += ["--trainer.log_every_n_steps", str(args.log_every)]
    before = loadavg()
    start = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tree), **env})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    logged = last_scalars(save_dir / name / "version_0")
    lr = next((logged[t] for t in logged if "lr" in t and "muon" in t), None)  # train/lr_muon, or lr-...muon before
    # the last step: the final validation's (the training scalars come every log_every_n_steps)
    return {"steps": max(s for series in logged.values() for s, _ in series), "lr": lr[-1][1] / max(v for _, v in lr) if lr else nan,
            "val_loss": logged["val/loss"][-1][1], "val_bpb": logged["val/bpb"][-1][1], "wall": wall,
            "load": f"{before} -> {loadavg()}", "stderr": result.stderr}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout, run side by side")
    parser.add_argument("--minutes", type=float, default=2.0, help="the time budget of each run (max_time)")
    parser.add_argument("--loads", type=int, default=1, help="busy loops running meanwhile")
    parser.add_argument("--variants", nargs="*", default=[], help="extra runs of this tree with VAR=VALUE set")
    parser.add_argument("--env", nargs="*", default=[], help="VAR=VALUE set for every run (e.g. OMP_NUM_THREADS=1)")
    parser.add_argument("--data-path", default=str(SHARED / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--log-every", type=int, help="--trainer.log_every_n_steps (the config's 10 by default)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="busy-"))
    common = dict(v.split("=", 1) for v in args.env)
    runs = [("this tree", REPO, common)]
    runs += [(f"this tree, {v}", REPO, {**common, **dict([v.split("=", 1)])}) for v in args.variants]
    if args.baseline:
        runs.insert(0, ("baseline", args.baseline.resolve(), common))
    # tokenize once (a bpe:4096 tokenizer and token store), so no run pays for it
    subprocess.run([sys.executable, "-m", "project", "fit", "--config", str(REPO / "configs" / "shakespeare.yaml"),
                    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--samples.max_new_tokens", "0",
                    "--trainer.logger.init_args.save_dir", str(work / "warmup"),
                    "--data.data_dir", str(work / "data"), "--data.path", args.data_path],
                   cwd=work, check=False, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.loads)]
    results = {}
    try:
        time.sleep(5)
        for index, (label, tree, env) in enumerate(runs):
            results[label] = fit(tree, env, args.minutes, work, f"run{index}", args)
            r = results[label]
            print(f"{label}: {r['steps']} steps, lr {r['lr']:.2f} of peak, val/bpb {r['val_bpb']:.3f}, "
                  f"{r['wall']:.0f} s wall, load {r['load']}", file=sys.stderr, flush=True)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    print(f"\n`fit --config configs/shakespeare.yaml --trainer.max_time` {args.minutes:g} min each, {args.loads} busy "
          f"loop(s) holding cores, runs one after the other{', with ' + ' '.join(args.env) if args.env else ''}\n")
    print("| tree | steps | last LR / peak | val/loss | val/bpb | wall s | load average before -> after |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, r in results.items():
        print(f"| {label} | {r['steps']} | {r['lr']:.2f} | {r['val_loss']:.3f} | {r['val_bpb']:.3f} | {r['wall']:.0f} "
              f"| {r['load']} |")


if __name__ == "__main__":
    main()
