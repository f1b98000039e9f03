"""The teaching notebooks (notebooks/*.ipynb): each executes top to bottom, and each is stored without outputs.

Executed with nbclient in a fresh kernel (this interpreter) whose working directory is a temporary folder, so a
notebook can write nothing into the repository. Each notebook has NOTEBOOK_TIMEOUT seconds in all; a failing cell
fails the test with the cell number, its source and the traceback.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from conftest import REPO, SHARED_DATA

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NOTEBOOK_TIMEOUT = 180  # seconds per notebook, all cells together
CHAPTERS = ["01-tokens-and-embeddings", "02-attention", "03-the-transformer-block", "04-training",
            "05-generation-and-sharing", "06-your-own-tokenizer", "07-scaling-out",
            "08-fine-tuning-for-classification", "09-instruction-fine-tuning-with-lora",
            "appendix-a-manual-derivatives"]


def test_chapters_present_and_listed_in_the_guide():
    assert [p.stem for p in NOTEBOOKS] == CHAPTERS
    guide = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    positions = [guide.find(f"({name}.ipynb)") for name in CHAPTERS]
    assert all(p >= 0 for p in positions), f"notebooks/README.md must link every chapter: {CHAPTERS}"
    assert positions == sorted(positions), "notebooks/README.md must list the chapters in order"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing "
                       f"(jupyter nbconvert --clear-output --inplace {path.relative_to(REPO)})")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # the kernel inherits this environment: offline data, offline hub, this checkout importable
    if (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        monkeypatch.setenv("PROJECT_SHARED_DATA", str(SHARED_DATA))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "agg")
    # the models are tiny: a second thread gains little, and on a busy 2-core runner oversubscribed OpenMP
    # threads made the training cells several times slower (measured 25 s with one thread vs > 90 s with two)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' scratch folders land here and are cleaned up
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=NOTEBOOK_TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{path.name} ran past {NOTEBOOK_TIMEOUT} s before cell {index}")
            client.timeout = max(1, int(remaining))  # the rest of the notebook's budget
            try:
                client.execute_cell(cell, index)
            except CellTimeoutError:
                pytest.fail(f"{path.name}: cell {index} ran past the notebook's {NOTEBOOK_TIMEOUT} s budget:\n"
                            f"{cell.source}")
            except (CellExecutionError, DeadKernelError) as err:
                message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # strip ANSI colours from the traceback
                pytest.fail(f"{path.name}: cell {index} failed:\n{message}", pytrace=False)
    assert not any(REPO.glob("notebooks/**/lightning_logs")), "a notebook wrote into the repository"
