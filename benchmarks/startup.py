"""Start-up time of the commands: wall seconds from launch to exit (or, for `serve`, to listening), medians.

Each command runs in a fresh process, repeats interleaved; with `--baseline DIR` (another checkout of this
repository, e.g. `git worktree add ../baseline <commit>`) the same commands of that tree run side by side, so the
table compares both on the same machine at the same time. A tiny checkpoint is trained first (configs/debug.yaml,
a few steps) and every command uses it:

    generate   --ckpt_path CKPT --prompt ROMEO: --generation.max_new_tokens 1
    export     --ckpt_path CKPT --format gguf --out <new folder>
    evaluate   --ckpt_path CKPT --text <1,000 characters>
    serve      --ckpt_path CKPT --port <free port>       (until the port accepts a connection)
    --help, fit --help, generate --help

    python benchmarks/startup.py --baseline ../baseline --repeats 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def timed(tree: Path, args: list[str], cwd: Path, serve_port: int | None = None) -> float:
    """Seconds for `python -m project ARGS` of `tree` to exit (to listen on `serve_port`, when given)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "project", *args], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if serve_port is None:
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{tree}: {' '.join(args)} failed:\n{err[-2000:]}")
        return time.perf_counter() - start
    try:
        while not listening(serve_port):
            if process.poll() is not None:
                raise RuntimeError(f"{tree}: serve exited:\n{process.stderr.read()[-2000:]}")
            time.sleep(0.05)
        return time.perf_counter() - start
    finally:
        process.terminate()
        process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with, side by side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commands", nargs="+", default=None, help="a subset of the command labels")
    parser.add_argument("--data-path", default=str(SHARED / "tinyshakespeare" / "input.txt"))
    args = parser.parse_args(argv)
    trees = {"this tree": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    tiny = [sys.executable, "-m", "project", "fit", "--config", str(REPO / "configs" / "debug.yaml"),
            "--data.path", args.data_path, "--data.data_dir", str(work / "data"), "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false"]
    subprocess.run(tiny, cwd=work, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    ckpt = str(next(work.glob("runs/*/version_0/checkpoints/last.ckpt")))
    (work / "sample.txt").write_text(Path(args.data_path).read_text(encoding="utf-8")[:1000], encoding="utf-8")
    counter = iter(range(10**6))
    commands = {
        "--help": lambda: (["--help"], None),
        "fit --help": lambda: (["fit", "--help"], None),
        "generate --help": lambda: (["generate", "--help"], None),
        "generate": lambda: (["generate", "--ckpt_path", ckpt, "--prompt", "ROMEO:",
                              "--generation.max_new_tokens", "1"], None),
        "export (gguf)": lambda: (["export", "--ckpt_path", ckpt, "--format", "gguf", "--out",
                                   str(work / f"gguf-{next(counter)}")], None),
        "evaluate (text)": lambda: (["evaluate", "--ckpt_path", ckpt, "--text", str(work / "sample.txt")], None),
        "serve (to listening)": lambda: (lambda port: (["serve", "--ckpt_path", ckpt, "--port", str(port)], port))(
            free_port()),
    }
    labels = args.commands or list(commands)
    seconds: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for label in labels:
            order = list(trees.items()) if repeat % 2 == 0 else list(trees.items())[::-1]  # interleaved, alternating
            for name, tree in order:
                command, port = commands[label]()
                seconds.setdefault((label, name), []).append(timed(tree, command, work, port))
                print(f"{label:22s} {name:10s} {seconds[(label, name)][-1]:6.2f} s", file=sys.stderr, flush=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"
    print(f"\nmedian of {args.repeats} interleaved runs each (wall seconds); load average now {load}\n")
    header = " | ".join(f"{name} (s)" for name in trees)
    print(f"| command | {header} |" + (" this / baseline |" if "baseline" in trees else ""))
    print("|---|" + "---:|" * len(trees) + ("---:|" if "baseline" in trees else ""))
    for label in labels:
        medians = {name: statistics.median(seconds[(label, name)]) for name in trees}
        row = " | ".join(f"{medians[name]:.2f}" for name in trees)
        ratio = f" {medians['this tree'] / medians['baseline']:.2f} |" if "baseline" in trees else ""
        print(f"| `{label}` | {row} |{ratio}")


if __name__ == "__main__":
    main()
