"""Shared test setup: offline data from ../shared/data, tiny model configs, a trained tiny checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def run_main(capsys, *args: str) -> tuple[int | str | None, str]:
    """Run the command line in this process (faster than run_cli): its exit status and stderr."""
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
    return exit_info.value.code, capsys.readouterr().err


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
