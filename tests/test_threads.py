"""torch's thread count: one per core other programs leave free, chosen once by every command that computes."""

import pytest
import torch

from conftest import REPO, run_main
from project import threads
from project.threads import CpuSample, busy_cores, configure_threads, threads_for


@pytest.mark.parametrize("cores, busy, most, expected", [
    (2, 0.0, 2, 2),  # a quiet 2-core laptop: both cores
    (2, 0.4, 2, 2),  # a browser ticking over
    (2, 1.0, 2, 1),  # another job holds a core: the thread that would share it would stall every operation
    (2, 5.0, 2, 1),  # a crowded machine: still one
    (16, 3.2, 8, 8),  # many cores free: never more than torch's own count (physical cores)
    (8, 3.2, 8, 5),
])
def test_threads_leave_the_busy_cores_to_other_programs(cores, busy, most, expected):
    assert threads_for(cores, busy, most) == expected


def test_busy_cores_counts_other_programs_only(monkeypatch):
    """Machine-wide busy CPU time minus this process's own, per second of wall time."""
    since = CpuSample(wall=100.0, machine_busy=50.0, own=10.0)
    # 2 s later the machine was busy 5 more CPU seconds, 3 of them this process's: others used 1 core
    monkeypatch.setattr(CpuSample, "now", classmethod(lambda cls: CpuSample(102.0, 55.0, 13.0)))
    monkeypatch.setattr(threads.time, "monotonic", lambda: 102.0)
    assert busy_cores(since) == pytest.approx(1.0)


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_threads_follows_the_load_unless_omp_num_threads_is_set(monkeypatch, torch_threads):
    monkeypatch.setattr(threads, "torch_default_threads", lambda: 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda since: 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert configure_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "busy_cores", lambda since: 0.0)
    assert configure_threads() == 2 and torch.get_num_threads() == 2  # back up when the other job ends
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    monkeypatch.setattr(threads, "busy_cores", lambda since: pytest.fail("an explicit choice is not second-guessed"))
    assert configure_threads() == 1


@pytest.mark.parametrize("command", ["generate", "predict"])
def test_commands_that_compute_choose_their_threads(command, trained_run, monkeypatch, capsys, tmp_path):
    """The same core function for generation and for the Lightning commands (fit, validate, test, predict)."""
    import project.cli
    import project.commands

    calls = []
    # generate calls it from commands.py; the Lightning commands from cli.py, once their command line has parsed
    module = project.commands if command == "generate" else project.cli
    monkeypatch.setattr(module, "configure_threads", lambda: calls.append(command))
    ckpt = str(trained_run["ckpt"])
    args = {"generate": ["generate", "--ckpt_path", ckpt, "--generation.max_new_tokens", "2"],
            "predict": ["predict", "--config", str(REPO / "configs" / "debug.yaml"), "--ckpt_path", ckpt,
                        "--data.prompts", '["ROMEO:"]', "--model.generation.max_new_tokens", "2",
                        "--predictions.output_path", str(tmp_path / "out.jsonl")]}[command]
    code, err = run_main(capsys, *args)
    assert code == 0, err[-2000:]
    assert calls == [command]
