"""Reliability: exact resume after SIGKILL, Ctrl-C and atomic checkpoints, the non-finite loss guard, and
one-line errors for bad input that leave existing files alone."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import DEBUG_CONFIG, REPO, run_cli
from project.commands import main

DEBUG = str(REPO / "configs" / "debug.yaml")
CONTEXT = DEBUG_CONFIG["model"]["config"]["block_size"]  # of the trained_run checkpoint
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
            "--checkpoint.last_every_n_steps", "3"]
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
                     "100000", "--trainer.val_check_interval", "100000", "--checkpoint.last_every_n_steps", "2",
                     cwd=tmp_path)
    last = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last, proc)
    time.sleep(1.0)  # a few more steps than the periodic checkpoint
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted at step" in stderr, stderr[-2000:]
    step = int(stderr.split("interrupted at step ")[1].split(":")[0])
    assert torch.load(last, weights_only=True)["global_step"] == step
    assert not list(last.parent.glob(".*.tmp"))


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A crash while the bytes are written leaves the previous last.ckpt complete, and no temporary file."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from project.callbacks import AtomicCheckpointIO

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


def fit_in_process(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        sys.exit(0)
    return exit_info.value.code, capsys.readouterr().err


def test_nonfinite_loss_stops_the_run_naming_the_step(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = fit_in_process(capsys, "fit", "--config", DEBUG, "--data.data_dir", str(data_dir), *FAST,
                               "--model.learning_rate", "1e30", "--trainer.max_steps", "20")
    assert code != 0
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: non-finite training loss at step "), err[-2000:]
    assert "--nan_guard.action skip" in last_line


def test_nonfinite_loss_skip_drops_batches_then_gives_up(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = fit_in_process(capsys, "fit", "--config", DEBUG, "--data.data_dir", str(data_dir), *FAST,
                               "--model.learning_rate", "1e30", "--trainer.max_steps", "20",
                               "--nan_guard.action", "skip", "--nan_guard.max_skips", "2")
    assert code != 0
    assert err.count("skipped this batch") == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: non-finite training loss at step ")


def file_hashes(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


BAD_INPUTS = {
    # id: (arguments, with {ckpt} {data} {tmp} filled in; a substring of the final `error:` line)
    "unknown-key": (["fit", "--config", DEBUG, "--model.config.n_layers", "3"], "n_layers"),
    "wrong-type": (["fit", "--config", DEBUG, "--model.config.n_layer", "two"], "n_layer"),
    "missing-corpus": (["fit", "--config", DEBUG, "--data.path", "{tmp}/nope.txt"], "does not exist"),
    "empty-corpus": (["fit", "--config", DEBUG, "--data.path", "{tmp}/empty.txt"], "is empty"),
    "short-corpus": (["fit", "--config", DEBUG, "--data.path", "{tmp}/short.txt"], "fewer than one window"),
    "not-utf8": (["fit", "--config", DEBUG, "--data.path", "{tmp}/latin1.txt"], "not UTF-8"),
    "n_embd-n_head": (["fit", "--config", DEBUG, "--model.config.n_embd", "30", "--model.config.n_head", "4"],
                      "divisible by n_head"),
    "block_size-too-large": (["predict", "--config", DEBUG, "--ckpt_path", "{ckpt}", "--model.config.block_size",
                              "64"], "larger than the context"),
    "other-architecture": (["predict", "--config", DEBUG, "--ckpt_path", "{ckpt}", "--model.config.n_layer", "3"],
                           "different architecture"),
    "resume-other-architecture": (["fit", "--config", DEBUG, "--ckpt_path", "{ckpt}", "--model.config.n_embd",
                                   "64"], "different architecture"),
    "other-norm-eps": (["predict", "--config", DEBUG, "--ckpt_path", "{ckpt}", "--model.config.norm_eps", "1e-3"],
                       "norm_eps=1e-05"),  # every architecture field of GPTConfig is checked, not a hand-kept list
    "missing-ckpt": (["predict", "--config", DEBUG, "--ckpt_path", "{tmp}/nope.ckpt"], "does not exist"),
    "truncated-ckpt-predict": (["predict", "--config", DEBUG, "--ckpt_path", "{tmp}/half.ckpt"], "truncated"),
    "truncated-ckpt-generate": (["generate", "--ckpt_path", "{tmp}/half.ckpt"], "truncated"),
    "no-last-ckpt": (["fit", "--config", DEBUG, "--ckpt_path", "last"], "no last.ckpt"),
    "empty-prompt": (["generate", "--ckpt_path", "{ckpt}", "--prompt", ""], "prompt"),
    "prompt-too-long": (["generate", "--ckpt_path", "{ckpt}", "--prompt", "x" * (CONTEXT + 8)], "shorten the prompt"),
    "temperature": (["generate", "--ckpt_path", "{ckpt}", "--temperature", "-1"], "temperature must be >= 0"),
    "top_p": (["generate", "--ckpt_path", "{ckpt}", "--top_p", "1.5"], "top_p must be in (0, 1]"),
    "generate-wrong-type": (["generate", "--ckpt_path", "{ckpt}", "--max_new_tokens", "many"], "max_new_tokens"),
    "generate-unknown-key": (["generate", "--ckpt_path", "{ckpt}", "--temprature", "0"], "temprature"),
    "top_k": (["generate", "--ckpt_path", "{ckpt}", "--top_k", "0"], "top_k must be >= 1"),
    "unwritable-root": (["fit", "--config", DEBUG, "--trainer.logger.init_args.save_dir", "{tmp}/afile/runs"],
                        "afile"),
    "export-existing-dir": (["export", "--ckpt_path", "{ckpt}", "--out", "{tmp}/exported"], "--overwrite"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_error(case, trained_run, data_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be.\n")
    (tmp_path / "latin1.txt").write_bytes("Roméo et Juliette\n".encode("latin-1") * 200)
    (tmp_path / "afile").write_text("a file, not a folder")
    ckpt_bytes = Path(trained_run["ckpt"]).read_bytes()
    (tmp_path / "half.ckpt").write_bytes(ckpt_bytes[: len(ckpt_bytes) // 2])
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "config.json").write_text("{}")
    before = file_hashes(tmp_path)
    monkeypatch.chdir(tmp_path)
    args, message = BAD_INPUTS[case]
    args = [a.format(ckpt=trained_run["ckpt"], data=data_dir, tmp=tmp_path) for a in args]
    if args[0] in ("fit", "predict"):
        args += ["--data.data_dir", str(data_dir)]
    code, err = fit_in_process(capsys, *args)
    assert code not in (0, None)
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error:") and message in last_line, err[-3000:]
    assert "Traceback" not in err
    after = file_hashes(tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing overwritten


def test_compiled_model_checkpoints_load_into_an_uncompiled_model(trained_run):
    """`model.compile: true` compiles in place: checkpoint keys carry no `_orig_mod.` prefix, and a prefixed
    state dict (from code that wrapped the model with torch.compile) still loads."""
    from project.checkpoint import load_checkpoint, model_state_dict
    from project.model import GPTConfig
    from project.module import GPTModule

    config = GPTConfig(vocab_size=65, **DEBUG_CONFIG["model"]["config"])  # trained_run's architecture
    compiled, plain = GPTModule(config, compile=True), GPTModule(config)
    compiled.configure_model()
    assert list(compiled.state_dict()) == list(plain.state_dict())

    checkpoint = torch.load(trained_run["ckpt"], weights_only=True)
    wrapped = {k.replace("model.", "model._orig_mod.", 1): v for k, v in checkpoint["state_dict"].items()}
    assert model_state_dict({"state_dict": wrapped}).keys() == model_state_dict(checkpoint).keys()
    idx = torch.randint(0, 65, (1, 16))
    reference = load_checkpoint(trained_run["ckpt"]).model
    restored = plain.model.eval()
    restored.load_state_dict(model_state_dict({"state_dict": wrapped}))
    torch.testing.assert_close(restored(idx), reference(idx))
