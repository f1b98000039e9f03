"""Reliability: exact resume after SIGKILL, Ctrl-C and atomic checkpoints, one writer per run folder, and the
non-finite loss guard. Bad input (one-line errors, existing files left alone) is tests/test_bad_inputs.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import DEBUG_CONFIG, REPO, run_cli, run_main

DEBUG = str(REPO / "configs" / "debug.yaml")
# a tiny run that logs the loss every step, with dropout on so the RNG state matters on resume
FAST = ["--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--model.config.dropout", "0.1",
        "--samples.max_new_tokens", "4", "--trainer.val_check_interval", "10"]


def popen_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "project", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            pytest.fail(f"run ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def losses_of(event_file: Path) -> dict[int, float]:
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_sigkill_then_resume_last_matches_an_uninterrupted_run(data_dir, tmp_path):
    args = ["fit", "--config", DEBUG, "--data.data_dir", str(data_dir), *FAST, "--trainer.max_steps", "24",
            "--last_checkpoint.every_n_train_steps", "3"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    killed = popen_cli(*args, cwd=tmp_path / "b")
    reference = popen_cli(*args, cwd=tmp_path / "a")  # uninterrupted, alongside
    run_dir = tmp_path / "b" / "runs" / "gpt" / "version_0"
    wait_for(run_dir / "checkpoints" / "last.ckpt", killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    resumed_from = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < resumed_from < 24

    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err[-2000:]
    resumed = run_cli(*args, "--ckpt_path", "last", cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert not (tmp_path / "b" / "runs" / "gpt" / "version_1").exists()  # the curves continue in version_0

    expected = losses_of(tmp_path / "a" / "runs" / "gpt" / "version_0")
    newest = max(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    got = losses_of(newest)
    after = sorted(s for s in got if s > resumed_from)
    assert after and after[-1] == max(expected), (resumed_from, sorted(got))
    for step in after:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 24


def test_ctrl_c_saves_last_checkpoint(data_dir, tmp_path):
    proc = popen_cli("fit", "--config", DEBUG, "--data.data_dir", str(data_dir), *FAST, "--trainer.max_steps",
                     "100000", "--trainer.val_check_interval", "100000", "--last_checkpoint.every_n_train_steps", "2",
                     cwd=tmp_path)
    last = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last, proc)
    time.sleep(1.0)  # a few more steps than the periodic checkpoint
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130  # the shell's status for SIGINT
    assert "interrupted at step" in stderr, stderr[-2000:]
    step = int(stderr.split("interrupted at step ")[1].split(":")[0])
    assert torch.load(last, weights_only=True)["global_step"] == step
    # fit's closing report says so too, with how to continue and the checkpoint written
    assert f"fit: interrupted (Ctrl-C) at step {step:,} of 100,000 in " in stdout, stdout
    assert "to continue, run the same command with --ckpt_path last" in stdout
    assert "last checkpoint: runs/gpt/version_0/checkpoints/last.ckpt" in stdout
    assert not list(last.parent.glob(".*.tmp"))


def test_a_second_writer_of_one_run_folder_is_refused(data_dir, tmp_path):
    """`--ckpt_path last` while the run is still training would write the same folder: refused, and the first
    run goes on to save its own last.ckpt."""
    args = ["fit", "--config", DEBUG, "--data.data_dir", str(data_dir), *FAST, "--trainer.max_steps", "100000",
            "--trainer.val_check_interval", "100000", "--last_checkpoint.every_n_train_steps", "2"]
    first = popen_cli(*args, cwd=tmp_path)
    last = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last, first)
    second = run_cli(*args, "--ckpt_path", "last", cwd=tmp_path)
    first.send_signal(signal.SIGINT)
    _, first_err = first.communicate(timeout=120)
    assert second.returncode != 0
    last_line = second.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "another process" in last_line, second.stderr[-2000:]
    assert "interrupted at step" in first_err, first_err[-2000:]
    step = int(first_err.split("interrupted at step ")[1].split(":")[0])
    assert torch.load(last, weights_only=True)["global_step"] == step
    assert not list(last.parent.glob(".*.tmp")) and not (tmp_path / "runs" / "gpt" / "version_1").exists()


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A crash while the bytes are written leaves the previous last.ckpt complete, and no temporary file."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from project.training.checkpointing import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}

    def crash_mid_write(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"half of a checkp")
        raise OSError("disk full")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash_mid_write)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_nonfinite_loss_stops_the_run_naming_the_step(data_dir, tmp_path, capsys, monkeypatch):
    """The guard decides once per logging interval (5 steps here), names the first bad step, and the gradients
    of the bad steps never reached the weights: last.ckpt holds finite ones. (An absurd learning rate provokes
    the NaN; without weight decay, whose factor 1 - lr * decay would overflow the weights by itself.)"""
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "fit", "--config", DEBUG, "--data.data_dir", str(data_dir), *FAST,
                         "--model.optimizer.learning_rate", "1e30", "--model.optimizer.weight_decay", "0",
                         "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "5")
    assert code != 0
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: non-finite training loss at step "), err[-2000:]
    assert "--nan_guard.action skip" in last_line
    assert int(last_line.split(" at step ")[1].split()[0]) < 5  # before the interval's end, where it was read
    weights = torch.load(tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt",
                         weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_loss_skip_drops_batches_then_gives_up(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "fit", "--config", DEBUG, "--data.data_dir", str(data_dir), *FAST,
                               "--model.optimizer.learning_rate", "1e30", "--trainer.max_steps", "20",
                               "--nan_guard.action", "skip", "--nan_guard.max_skips", "2")
    assert code != 0
    assert err.count("skipped 1 step(s)") == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: non-finite training loss at step ")


def test_compiled_model_checkpoints_load_into_an_uncompiled_model(trained_run):
    """`model.compile: true` compiles in place: checkpoint keys carry no `_orig_mod.` prefix, and a prefixed
    state dict (from code that wrapped the model with torch.compile) still loads."""
    from project.formats.checkpoint import load_checkpoint, model_state_dict
    from project.model import GPTConfig
    from project.training.module import GPTModule

    config = GPTConfig(vocab_size=65, **DEBUG_CONFIG["model"]["config"])  # trained_run's architecture
    compiled, plain = GPTModule(config, compile=True), GPTModule(config)
    compiled.configure_model()
    plain.configure_model()
    assert list(compiled.state_dict()) == list(plain.state_dict())

    checkpoint = torch.load(trained_run["ckpt"], weights_only=True)
    wrapped = {k.replace("model.", "model._orig_mod.", 1): v for k, v in checkpoint["state_dict"].items()}
    assert model_state_dict({"state_dict": wrapped}).keys() == model_state_dict(checkpoint).keys()
    idx = torch.randint(0, 65, (1, 16))
    reference = load_checkpoint(trained_run["ckpt"]).model
    restored = plain.model.eval()
    restored.load_state_dict(model_state_dict({"state_dict": wrapped}))
    torch.testing.assert_close(restored(idx), reference(idx))


def test_gpu_random_states_are_restored_only_for_gpus_that_exist(monkeypatch):
    """A run saved on 4 GPUs resumes on 1: the first GPU's state is restored, the 3 missing ones are not asked for."""
    from project.training.checkpointing import rng_states, set_rng_states

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((8,), i, dtype=torch.uint8)
                                                                   for i in range(4)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state[0].item())))
    set_rng_states(rng_states())
    assert restored == [(0, 0)]
