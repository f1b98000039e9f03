"""Start-up time of the commands: wall seconds from launch to exit (or, for `serve`, to listening), medians.

Each command runs in a fresh process, repeats interleaved; with `--baseline DIR` (another checkout of this
repository, e.g. `git worktree add ../baseline <commit>`) the same commands of that tree run side by side, so the
table compares both on the same machine at the same time. A tiny checkpoint is trained first (configs/debug.yaml,
a few steps) and every command uses it:

    generate   --ckpt_path CKPT --prompt ROMEO: --generation.max_new_tokens 1
    export     --ckpt_path CKPT --format gguf --out <new folder>
    evaluate   --ckpt_path CKPT --text <1,000 characters>
    serve      --ckpt_path CKPT --port <free port> --compile false
               (until the port accepts a connection, and until its page at / answers 200)
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
import urllib.error
import urllib.request
from collections.abc import Callable
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


def page_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return response.status == 200
    except urllib.error.HTTPError:  # 503 while the page is built
        return False


def timed(tree: Path, args: list[str], cwd: Path, serve_port: int | None = None,
          ready: Callable[[int], bool] = listening) -> float:
    """Seconds for `python -m project ARGS` of `tree` to exit (for a server on `serve_port`: until `ready`)."""
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
        while not (listening(serve_port) and ready(serve_port)):
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

    def serve(ready: Callable[[int], bool]) -> Callable[[Path], tuple[list[str], int, Callable[[int], bool]]]:
        def command(tree: Path) -> tuple[list[str], int, Callable[[int], bool]]:
            port = free_port()
            return ["serve", "--ckpt_path", ckpt, "--port", str(port), *no_compile[tree]], port, ready
        return command

    # start-up without the decoding step's compilation (which `serve` states separately), in trees that have it
    no_compile = {tree: ["--compile", "false"] if "--compile" in subprocess.run(
        [sys.executable, "-m", "project", "serve", "--help"], env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=work, capture_output=True, text=True).stdout else [] for tree in trees.values()}
    commands = {
        "--help": lambda tree: (["--help"], None, None),
        "fit --help": lambda tree: (["fit", "--help"], None, None),
        "generate --help": lambda tree: (["generate", "--help"], None, None),
        "generate": lambda tree: (["generate", "--ckpt_path", ckpt, "--prompt", "ROMEO:",
                                   "--generation.max_new_tokens", "1"], None, None),
        "export (gguf)": lambda tree: (["export", "--ckpt_path", ckpt, "--format", "gguf", "--out",
                                        str(work / f"gguf-{next(counter)}")], None, None),
        "evaluate (text)": lambda tree: (["evaluate", "--ckpt_path", ckpt, "--text", str(work / "sample.txt")], None,
                                         None),
        "serve (to listening)": serve(listening),
        "serve (page answers)": serve(page_answers),
    }
    labels = args.commands or list(commands)
    seconds: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for label in labels:
            order = list(trees.items()) if repeat % 2 == 0 else list(trees.items())[::-1]  # interleaved, alternating
            for name, tree in order:
                command, port, ready = commands[label](tree)
                seconds.setdefault((label, name), []).append(timed(tree, command, work, port, ready or listening))
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
