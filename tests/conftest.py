"""Shared test setup: offline data from ../shared/data, tiny models and recipes, a trained tiny checkpoint, running
the command line, reading TensorBoard scalars. Test files define no helper that another test file needs."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROJECT_SHARED_DATA", REPO.parent / "shared" / "data"))
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
# configs/debug.yaml trains the session's `trained_run`: tests read its values from here, never retype them
DEBUG_CONFIG = yaml.safe_load((REPO / "configs" / "debug.yaml").read_text(encoding="utf-8"))

# offline: tiktoken reads its BPE files from the shared cache; hub lookups and analytics are off
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# no test reaches the internet: HTTPS goes to a closed loopback port and fails at once. (litdata 0.2.44 asks PyPI
# for a newer release whenever a StreamingDataset is built, and has no switch; loopback servers stay reachable.)
os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost,::1")


# the two exportable recipes, as GPTConfig options
GPT2_STYLE = dict(positions="learned", norm="layernorm", mlp="gelu", bias=True)
LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)


def tiny_gpt(vocab_size: int = 50, seed: int = 0, *, spread: float | None = None, **config):
    """A small GPT in eval mode: 2 layers, 4 heads, 32 wide, a 16-token context unless `config` says otherwise.

    With `spread`, every weight is redrawn from N(0, spread) (norm gains around 1), so logits differ clearly from
    token to token and any slip in a weight mapping shows in the outputs.
    """
    from project.model import GPT, GPTConfig

    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=4, n_embd=32)
    model = GPT(GPTConfig(**{**sizes, **config}))
    if spread is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, spread)
    return model.eval()


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every TensorBoard scalar a run folder holds, by tag."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"offline TinyShakespeare missing at {SHAKESPEARE}: set PROJECT_SHARED_DATA")
    return SHAKESPEARE


@pytest.fixture
def data_dir(tmp_path: Path, shakespeare_path: Path) -> Path:
    """A data folder holding a local TinyShakespeare, as if downloaded before."""
    target = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    target.parent.mkdir(parents=True)
    shutil.copy(shakespeare_path, target)
    return tmp_path / "data"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a server or a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m project ...` in a subprocess, as a user would (`env`: extra environment variables)."""
    return subprocess.run([sys.executable, "-m", "project", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def run_main(capsys, *args: str, stdout: bool = False) -> tuple:
    """Run the command line in this process (faster than run_cli): its exit status and stderr (and, with `stdout`,
    its stdout third)."""
    from project.commands import main

    # logging handlers made at import time hold the stderr of an earlier test's capture: point them here
    handlers = [h for logger in logging.Logger.manager.loggerDict.values() for h in getattr(logger, "handlers", [])
                if type(h) is logging.StreamHandler]
    previous = [h.stream for h in handlers]
    for handler in handlers:
        handler.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
            sys.exit(0)
    finally:
        for handler, stream in zip(handlers, previous):
            handler.stream = stream
    captured = capsys.readouterr()
    return (exit_info.value.code, captured.err, captured.out) if stdout else (exit_info.value.code, captured.err)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shakespeare_path: Path) -> dict:
    """A tiny character model trained once per session through the real CLI (configs/debug.yaml)."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "data" / "tinyshakespeare" / "input.txt"
    data.parent.mkdir(parents=True)
    shutil.copy(shakespeare_path, data)
    result = run_cli("fit", "--config", str(REPO / "configs" / "debug.yaml"), "--data.data_dir", str(root / "data"),
                     cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = root / "runs" / "gpt" / "version_0"
    return {"root": root, "run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt", "stdout": result.stdout,
            "stderr": result.stderr}


@pytest.fixture(scope="session")
def loaded(trained_run):
    """The trained tiny checkpoint, loaded for inference."""
    from project.formats.checkpoint import load_model

    return load_model(trained_run["ckpt"])


@pytest.fixture(scope="session")
def scheduler(loaded):
    """A started scheduler decoding on the trained tiny checkpoint (4 slots, eager steps), for the page's tests."""
    from project.serve.scheduler import Scheduler

    scheduler = Scheduler(loaded.model, slots=4).start()
    yield scheduler
    scheduler.close()


@pytest.fixture(scope="session")
def chars(shakespeare_path: Path):
    """TinyShakespeare's 65-character vocabulary."""
    from project.tokenizer import CharTokenizer

    return CharTokenizer.from_text(shakespeare_path.read_text())
