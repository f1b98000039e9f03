"""benchmarks/train.py, generate.py, gpu.py, threads.py, startup.py and busy.py run end to end (--quick, --cpu-smoke,
seconds-long budgets: tiny models, a few steps; no timing assertions)."""

import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHAKESPEARE


def run_benchmark(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--quick", "--data-path",
                           str(SHAKESPEARE), "--data-dir", str(cwd / "data"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_speed_table_has_every_config_and_path(tmp_path, shakespeare_path):
    result = run_benchmark("--compile", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for config in ("gpt2", "llama"):
        assert f"{config}: torch.compile is" in result.stdout
        for path in ("lightning", "plain", "naive", "compiled"):
            assert f"| {config} | {path} |" in result.stdout, result.stdout
        assert f"{config}: Lightning overhead" in result.stdout
        loader_speed = result.stdout.split(f"{config}: Lightning overhead")[1].split("yields ")[1].split(" tokens/s")[0]
        assert float(loader_speed.replace(",", "")) > 0


def test_quality_table_has_every_architecture_and_optimizer(tmp_path, shakespeare_path):
    result = run_benchmark("--quality", "--save-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for arch in ("gpt2", "llama"):
        for optimizer in ("adamw", "muon"):
            row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {arch} | {optimizer} |"))
            assert "failed" not in row and "nan" not in row, row


def test_generation_benchmark_has_a_llama_cpp_row(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python cannot be imported (install "
                        "../shared/wheels/llama_cpp_python-*.whl, see its README)", exc_type=ImportError)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generate.py"), "--quick", "--skip-hf",
                             "--skip-compile", "--skip-sampling", "--batch-sizes", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| llama.cpp, f32 "))
    assert float(row.split("|")[4]) > 0, row
    assert "batch 1 against llama.cpp (same f32 weights): ours, KV cache " in result.stdout
    floor = next(line for line in result.stdout.splitlines() if line.startswith("a batch-1 step's matrix products"))
    assert float(floor.split("in order): ")[1].split(" ms")[0]) > 0 and "llama.cpp's whole token: " in floor


@pytest.mark.slow
def test_steps_per_budget_then_quality_for_those_steps(tmp_path, shakespeare_path):
    budget_file = str(tmp_path / "budget.json")
    measured = run_benchmark("--steps-per-budget", "--repeats", "1", "--budget-file", budget_file, cwd=tmp_path)
    assert measured.returncode == 0, measured.stderr[-3000:]
    assert "nanoGPT recipe here:" in measured.stdout and "| gpt2 6x192 |" in measured.stdout
    trained = run_benchmark("--budget-quality", "--budget-file", budget_file, "--save-dir", str(tmp_path / "runs"),
                            cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    row = next(line for line in trained.stdout.splitlines() if line.startswith("| bpe:1024 6x192 |"))
    assert "| 4 |" in row and row.count("-") < 4, row  # 4 steps, and its validations logged val/bpb


@pytest.mark.slow
def test_serving_benchmark_reports_every_level_and_identical_answers(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick", "--no-compile",
                             "--clients", "1", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith(("| 1 |", "| 4 |"))]
    assert len(rows) == 2 and all(float(row[2].replace(",", "")) > 0 for row in rows), result.stdout
    assert all(row[6].strip() == "8/8" for row in rows)  # greedy: every answer as the single client's


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_a_cpu(tmp_path):
    """benchmarks/gpu.py --cpu-smoke: the GPU benchmark's every step on a CPU (a tiny model, 6 steps): the fit
    through the CLI with its probe, the validation step's memory both ways, generate and export."""
    import json

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--cpu-smoke", "--work",
                             str(tmp_path / "work"), "--out", str(tmp_path / "gpu.json"), "--data-path",
                             str(SHAKESPEARE)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((tmp_path / "gpu.json").read_text())
    fit = measured["train"]
    assert fit["steps"] == 6 and fit["tokens_per_sec"] > 0 and 0 < fit["mfu_measured_matmul"] < 1
    assert [step for step, _ in fit["loss"]] == [2, 4, 6] and all(math.isfinite(v) for _, v in fit["loss"])
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in fit["attention_kernels"]
    assert fit["peak_memory_allocated_mib"] > 0
    (row,) = measured["validation_memory"]
    assert row["batch_size"] == 2 and row["before"] > 0 and row["after"] > 0
    sharing = measured["sharing"]
    assert sharing["generated"].startswith("ROMEO:") and len(sharing["generated"].strip()) > len("ROMEO:")
    assert "model.safetensors" in sharing["export_files"] and sharing["export_max_logit_difference"] < 1e-4
    assert "tokens/s" in result.stdout and "attention: " in result.stdout


def run_script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """benchmarks/NAME run as a user runs it, with this tree on PYTHONPATH."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_threads_and_startup_benchmarks_print_their_tables(tmp_path, shakespeare_path):
    """benchmarks/threads.py --quick (one thread and the start-up choice, quiet) and benchmarks/startup.py (two
    commands, one repeat): each runs its measurements in fresh processes and prints the table benchmarks/README.md
    quotes."""
    threads = run_script("threads.py", "--quick", "--loads", "0", "--settings", "1", "auto", "--data-path",
                         str(shakespeare_path), "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert threads.returncode == 0, threads.stderr[-3000:]
    rows = [line for line in threads.stdout.splitlines() if line.startswith("| 0 | ")]
    assert [row.split("|")[2].strip().split()[0] for row in rows] == ["1", "auto"], threads.stdout
    assert all(float(row.split("|")[3].replace(",", "")) > 0 for row in rows), rows  # train tokens/s
    startup = run_script("startup.py", "--repeats", "1", "--commands", "generate", "serve (page answers)",
                         "--data-path", str(shakespeare_path), cwd=tmp_path)
    assert startup.returncode == 0, startup.stderr[-3000:]
    for label in ("`generate`", "`serve (page answers)`"):
        row = next(line for line in startup.stdout.splitlines() if line.startswith(f"| {label} |"))
        assert float(row.split("|")[2]) > 0, row


@pytest.mark.slow
def test_busy_benchmark_reads_steps_lr_and_bpb_of_a_clock_stopped_fit(tmp_path, shakespeare_path):
    """benchmarks/busy.py with a 3-second budget and no busy loop: the default config's fit, stopped by the clock,
    read back from its TensorBoard events (steps, last LR / peak at the floor, val/bpb)."""
    result = run_script("busy.py", "--minutes", "0.05", "--loads", "0", "--log-every", "1", "--data-path",
                        str(shakespeare_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| this tree |"))
    steps, lr, _, bpb = (float(cell) for cell in row.split("|")[2:6])
    assert steps >= 1 and bpb > 0, row
    assert lr <= 0.11, row  # the budget-aware schedule ends at its floor (a tenth of the peak) as time runs out


@pytest.mark.slow
def test_finetune_benchmark_tables(tmp_path):
    """benchmarks/finetune.py --quick: every row of the quality tables (through the real `finetune` command) and of
    LoRA vs full speed, from a tiny base pretrained for a few steps."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return run_script("finetune.py", "--quick", "--data-path", str(SHAKESPEARE), "--work", str(tmp_path), *args,
                          cwd=tmp_path)

    quality = run()
    assert quality.returncode == 0, quality.stderr[-3000:]
    for row in ("pretrained", "random", "majority", "base", "full", "lora"):
        value = next(line for line in quality.stdout.splitlines() if line.startswith(f"| {row} |")).split("|")[2]
        assert math.isfinite(float(value)), quality.stdout
    base = str(tmp_path / "runs" / "base" / "version_0" / "checkpoints" / "last.ckpt")
    speed = run("--speed", "--base", base)
    assert speed.returncode == 0, speed.stderr[-3000:]
    full, lora = (next(line for line in speed.stdout.splitlines() if line.startswith(f"| {name} |")).split("|")
                  for name in ("full", "lora"))
    assert int(lora[2].replace(",", "")) < int(full[2].replace(",", ""))  # trainable parameters
    assert float(lora[3]) < float(full[3])  # optimizer state
