"""The real command line: fit writes checkpoints and TensorBoard scalars, predict samples, configs parse."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import DEBUG_CONFIG, REPO, free_port, run_cli, run_main, scalars

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_fit_lowers_val_loss_and_writes_checkpoints_and_events(trained_run):
    run_dir = trained_run["run_dir"]
    logged = scalars(run_dir)
    for tag in ("train/loss", "val/loss", "val/ppl", "val/bpb", "train/lr", "train/tokens_per_sec"):
        assert tag in logged, f"{tag} not logged; have {sorted(logged)}"
    val = logged["val/loss"]
    assert len(val) >= 2 and val[-1] < val[0] < math.log(65)  # below the uniform guess, and still falling
    assert logged["val/ppl"][-1] == pytest.approx(math.exp(val[-1]), rel=1e-3)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("best") for p in (run_dir / "checkpoints").iterdir())
    assert (run_dir / "config.yaml").is_file()  # the resolved config is saved with the run


def test_checkpoint_carries_tokenizer_and_loads_without_pickle(trained_run):
    ckpt = torch.load(trained_run["ckpt"], weights_only=True)
    assert ckpt["tokenizer"]["kind"] == "char" and len(ckpt["tokenizer"]["chars"]) == 65
    assert ckpt["hyper_parameters"]["config"]["vocab_size"] == 65  # linked from the data module


def test_text_sample_is_logged_to_tensorboard(trained_run):
    events = EventAccumulator(str(trained_run["run_dir"]), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]


def test_predict_from_checkpoint_without_the_data_folder(trained_run, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run_cli(
        "predict", "--config", str(REPO / "configs" / "debug.yaml"), "--ckpt_path", str(trained_run["ckpt"]),
        "--data.data_dir", str(tmp_path / "no-data-here"), "--data.prompts", '["ROMEO:", "JULIET:"]',
        "--model.generation.max_new_tokens", "20", "--model.generation.temperature", "0",
        "--predictions.output_path", str(out), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["ROMEO:", "JULIET:"]
    assert all(len(r["completion"]) == 20 for r in records)
    assert records[0]["settings"]["temperature"] == 0
    assert "ROMEO:" + records[0]["completion"] in result.stdout
    # greedy decoding is deterministic: a second run gives the same text, and refuses to overwrite
    again = run_cli(
        "predict", "--config", str(REPO / "configs" / "debug.yaml"), "--ckpt_path", str(trained_run["ckpt"]),
        "--data.prompts", '["ROMEO:"]', "--model.generation.max_new_tokens", "20",
        "--model.generation.temperature", "0", "--predictions.output_path", str(out), cwd=tmp_path,
    )
    assert again.returncode != 0 and "exists" in again.stderr
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config, tmp_path):
    args = ["fit", "--config", str(config)]
    if config.parent.name == "strategy":  # overlays compose with a model config
        args = ["fit", "--config", str(REPO / "configs" / "shakespeare.yaml"), "--config", str(config)]
    if config.parent.name == "finetune":  # `finetune`'s own configs; lora.yaml composes with instruct.yaml
        args = ["finetune", "fit", "--config", str(REPO / "configs" / "finetune" / "instruct.yaml"), "--config",
                str(config)]
    result = run_cli(*args, "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model:" in result.stdout and "trainer:" in result.stdout


def test_unknown_config_key_fails_with_its_name(tmp_path):
    result = run_cli("fit", "--config", str(REPO / "configs" / "debug.yaml"), "--model.config.n_layers", "3",
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "n_layers" in result.stderr


def test_help_lists_every_command_with_a_summary(capsys):
    from lightning.pytorch.cli import LightningCLI

    from project.commands import COMMANDS, main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m project ") and "__main__" not in out
    listed = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert set(listed) == set(LightningCLI.subcommands()) | set(COMMANDS) | {"finetune"}  # finetune: a LightningCLI
    assert all(summary.strip() for summary in listed.values())


@pytest.mark.parametrize("command", ["fit", "generate", "export", "consolidate", "serve", "prepare", "finetune"])
def test_each_command_has_its_own_help(command, capsys):
    from project.commands import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m project ")


TRAIN_TOKENIZER_BAD_INPUTS = {
    "missing-corpus": (["--path", "{tmp}/nope.txt", "--out", "{tmp}/out"], "nope.txt does not exist: pass --path"),
    "vocab-below-bytes": (["--path", "{corpus}", "--vocab_size", "255", "--out", "{tmp}/out"], "between 257"),
    "vocab-absurd": (["--path", "{corpus}", "--vocab_size", "100000000", "--out", "{tmp}/out"], "and 65536"),
    "out-exists": (["--path", "{corpus}", "--out", "{tmp}/existing"], "existing exists: choose another --out"),
    "not-utf8": (["--path", "{tmp}/latin1.txt", "--out", "{tmp}/out"], "is not UTF-8"),
}


@pytest.mark.parametrize("case", TRAIN_TOKENIZER_BAD_INPUTS, ids=list(TRAIN_TOKENIZER_BAD_INPUTS))
def test_train_tokenizer_bad_input_is_a_one_line_error(case, tmp_path, capsys):
    from project.commands import main

    (tmp_path / "existing").mkdir()
    (tmp_path / "corpus.txt").write_text("Fair Verona, where we lay our scene.\n" * 50)
    (tmp_path / "latin1.txt").write_bytes("Roméo et Juliette\n".encode("latin-1"))
    args, message = TRAIN_TOKENIZER_BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["train-tokenizer", *(a.format(tmp=tmp_path, corpus=tmp_path / "corpus.txt") for a in args)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.strip().count("\n") == 0 and err.startswith("error:") and message in err, err
    assert not (tmp_path / "out").exists() and not any((tmp_path / "existing").iterdir())


def test_train_tokenizer_command_writes_a_folder_fit_can_use(shakespeare_path, tmp_path, capsys):
    from project.commands import main
    from project.tokenizer import BPETokenizer

    main(["train-tokenizer", "--path", str(shakespeare_path), "--vocab_size", "512", "--out", str(tmp_path / "tok")])
    out = capsys.readouterr().out  # what it wrote, how it cuts its corpus, and how to use it
    assert f"trained a byte-level BPE of 512 tokens on {shakespeare_path}" in out and "characters each" in out
    assert f"wrote {tmp_path / 'tok' / 'tokenizer.json'}" in out and "--data.tokenizer " in out
    tokenizer = BPETokenizer.from_dir(tmp_path / "tok")
    assert tokenizer.vocab_size == 512 and tokenizer.decode(tokenizer.encode("ROMEO: 🙂")) == "ROMEO: 🙂"


@pytest.mark.slow
def test_trained_bpe_run_carries_its_tokenizer_to_generate_and_predict(data_dir, tmp_path):
    """fit with --data.tokenizer bpe:N; the checkpoint alone then serves generate and predict (no corpus)."""
    from project.formats.checkpoint import load_checkpoint

    result = run_cli("fit", "--config", str(REPO / "configs" / "debug.yaml"), "--data.data_dir", str(data_dir),
                     "--data.tokenizer", "bpe:300", "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_path = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    (folder,) = (data_dir / "tokenizers").iterdir()
    assert ckpt["tokenizer"] == {"kind": "bpe", "tokenizer_json": (folder / "tokenizer.json").read_text()}
    assert ckpt["hyper_parameters"]["config"]["vocab_size"] == 300
    loaded = load_checkpoint(ckpt_path)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("JULIET: 日本 🙂")) == "JULIET: 日本 🙂"

    out = tmp_path / "out.jsonl"
    predicted = run_cli("predict", "--config", str(REPO / "configs" / "debug.yaml"), "--data.tokenizer", "bpe:300",
                        "--ckpt_path", str(ckpt_path), "--data.data_dir", str(tmp_path / "no-data-here"),
                        "--data.prompts", '["ROMEO:"]', "--model.generation.max_new_tokens", "5",
                        "--predictions.output_path", str(out), cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads(out.read_text())["prompt"] == "ROMEO:"
    assert not (tmp_path / "no-data-here").exists()


def test_fit_ends_with_what_happened_and_says_nothing_else(trained_run):
    """Why it stopped, the last validation, both checkpoints and the command to run next; no library noise."""
    out, err = trained_run["stdout"], trained_run["stderr"]
    steps = DEBUG_CONFIG["trainer"]["max_steps"]
    assert f"fit: reached max_steps ({steps}) in " in out
    assert f"last validation (step {steps}): val/loss " in out and "val/bpb " in out
    best = next((trained_run["run_dir"] / "checkpoints").glob("best*.ckpt")).relative_to(trained_run["root"])
    assert f"best checkpoint: {best} (val/loss " in out
    assert "last checkpoint: runs/gpt/version_0/checkpoints/last.ckpt" in out
    assert f"next: python -m project generate --ckpt_path {best}" in out
    assert "training a 0.03 M-parameter GPT, characters (65 symbols), for 40 steps; writing to runs/gpt/version_0" \
        in err
    for noise in ("Tip:", "LeafSpec", "weights_only", "Epoch 0", "Warning", "FLOPs", "sync_dist"):
        assert noise not in err, noise


def test_a_fit_stopped_by_its_time_budget_says_so(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err, out = run_main(capsys, "fit", "--config", str(REPO / "configs" / "debug.yaml"), "--data.data_dir",
                              str(data_dir), "--trainer.max_steps", "1000000", "--trainer.max_time", "00:00:00:01",
                              "--trainer.val_check_interval", "1000000", "--trainer.enable_progress_bar", "false",
                              stdout=True)
    assert code == 0, err[-2000:]
    assert "fit: stopped by max_time (1 s) at step " in out and " of 1,000,000; the learning rate followed" in out
    assert "last validation (step " in out  # Lightning validates when a run is stopped early
    checkpoint = torch.load(tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["metrics"]) == {"val/loss", "val/ppl", "val/bpb"}


def make_run(root: Path, name: str, version: int, files: dict[str, float]) -> Path:
    """A run folder with checkpoint files written at the given mtimes (seconds since the epoch)."""
    import os

    folder = root / "runs" / name / f"version_{version}" / "checkpoints"
    folder.mkdir(parents=True)
    for file, mtime in files.items():
        (folder / file).write_bytes(b"x")
        os.utime(folder / file, (mtime, mtime))
    return folder


def test_last_and_best_are_the_newest_runs_checkpoints(tmp_path):
    from project.formats.runs import find_checkpoint, resolve_checkpoint

    old = make_run(tmp_path, "shakespeare", 0, {"last.ckpt": 100, "best-step20.ckpt": 90})
    new = make_run(tmp_path, "char", 3, {"last.ckpt": 200, "best-step10.ckpt": 150, "best-step30.ckpt": 190})
    (tmp_path / "runs" / "shakespeare" / "version_1").mkdir()  # a newer folder with no checkpoint is never chosen
    runs = tmp_path / "runs"
    assert find_checkpoint("last", runs) == new / "last.ckpt"
    assert find_checkpoint("best", runs) == new / "best-step30.ckpt"  # the latest best of a top-k
    assert find_checkpoint("last", runs, name="shakespeare") == old / "last.ckpt"  # fit: its own logger's runs
    assert resolve_checkpoint("last", runs) == str(new / "last.ckpt")
    assert resolve_checkpoint("http://host/x.ckpt", runs) == "http://host/x.ckpt"  # as given: the reader refuses URLs
    (old / "last.ckpt").unlink()
    (new / "last.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="has no last.ckpt: pass --ckpt_path best"):
        find_checkpoint("last", runs)
    with pytest.raises(FileNotFoundError, match="no best checkpoint under .*: train first"):
        find_checkpoint("best", tmp_path / "elsewhere")


def test_last_is_a_sharded_runs_newest_complete_step_folder(tmp_path):
    """The one resolver knows ShardedStrategy's layout: step folders renamed into place once complete, last.ckpt
    and best-stepN.ckpt links to them. `last` is the newest complete folder, even when last.ckpt still names an
    older one (a run killed between the two), and never a half-written one."""
    import os

    from project.formats.runs import META_FILE, METADATA_FILE, find_checkpoint, step_folder_name

    folder = tmp_path / "runs" / "tp" / "version_0" / "checkpoints"
    for step in (100, 120):
        (folder / step_folder_name(step)).mkdir(parents=True)
        for name in (METADATA_FILE, META_FILE):
            (folder / step_folder_name(step) / name).write_bytes(b"x")
    (folder / ".step-000000140.4711.tmp").mkdir()  # a save in progress
    (folder / step_folder_name(160)).mkdir()  # no index: not complete
    os.symlink(step_folder_name(100), folder / "last.ckpt")
    os.symlink(step_folder_name(100), folder / "best-step100.ckpt")
    assert find_checkpoint("last", tmp_path / "runs") == folder / step_folder_name(120)
    assert find_checkpoint("best", tmp_path / "runs", name="tp") == folder / "best-step100.ckpt"


class Loaded(Exception):
    """Raised by a stand-in load_model: the command got as far as loading this path."""


@pytest.mark.parametrize("command", [
    ["generate"], ["export", "--out", "exports/x"], ["serve", "--port", "0"], ["evaluate", "--text", "t.txt"],
])
@pytest.mark.parametrize("which", ["last", "best"])
def test_every_command_resolves_last_and_best_alike(command, which, trained_run, tmp_path, monkeypatch, capsys):
    import project.commands

    shutil.copytree(trained_run["run_dir"], tmp_path / "runs" / "gpt" / "version_0")
    (tmp_path / "t.txt").write_text("ROMEO: what light\n")  # evaluate checks its --text before loading
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(project.commands, "load_model", lambda path, **kwargs: (_ for _ in ()).throw(Loaded(path)))
    if command[0] == "serve":
        command = ["serve", "--port", str(free_port())]
    with pytest.raises(Loaded) as loaded:
        project.commands.main([command[0], "--ckpt_path", which, *command[1:]])
    expected = {"last": Path("runs/gpt/version_0/checkpoints/last.ckpt"),
                "best": next(Path("runs/gpt/version_0/checkpoints").glob("best*.ckpt"))}[which]
    assert Path(loaded.value.args[0]) == expected


def test_consolidate_resolves_last_too(trained_run, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained_run["run_dir"], tmp_path / "runs" / "gpt" / "version_0")
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "consolidate", "--ckpt_path", "last", "--out", "one.ckpt")
    assert code == 1 and "runs/gpt/version_0/checkpoints/last.ckpt is not a distributed checkpoint folder" in err


def test_validate_and_predict_make_no_run_folder_that_hides_the_training_run(trained_run, tmp_path, monkeypatch,
                                                                             capsys):
    """Before, each made a checkpoint-less version_N, and `ls -td runs/.../version_*` then picked it."""
    shutil.copytree(trained_run["run_dir"], tmp_path / "runs" / "gpt" / "version_0")
    (tmp_path / "data").symlink_to(trained_run["root"] / "data")
    monkeypatch.chdir(tmp_path)
    debug = ["--config", str(REPO / "configs" / "debug.yaml"), "--trainer.enable_progress_bar", "false"]
    code, err = run_main(capsys, "validate", *debug, "--ckpt_path", "last", "--trainer.limit_val_batches", "1")
    assert code == 0, err[-2000:]
    for _ in range(2):
        code, err = run_main(capsys, "predict", *debug, "--ckpt_path", "best", "--data.prompts", '["ROMEO:"]',
                             "--model.generation.max_new_tokens", "3")
        assert code == 0, err[-2000:]
    run = Path("runs/gpt/version_0")
    assert "predict: wrote 1 completion of" in err and f"to {run / 'predictions-2.jsonl'}" in err
    assert [p.name for p in Path("runs/gpt").iterdir()] == ["version_0"]
    assert {p.name for p in run.glob("predictions*.jsonl")} == {"predictions.jsonl", "predictions-2.jsonl"}
    assert not Path("config.yaml").exists() and not Path("checkpoints").exists()
    code, err = run_main(capsys, "generate", "--ckpt_path", "last", "--generation.max_new_tokens", "3")
    assert code == 0, err
def test_bf16_mixed_fit_trains_with_float32_weights(data_dir, tmp_path, capsys, monkeypatch):
    """bf16-mixed, the precision of the GPU config (configs/gpt2-124m.yaml), through the command line on a CPU:
    the loss falls, clipping and the fused optimizer run under autocast, and the weights stay float32."""
    from conftest import run_main

    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "fit", "--config", str(REPO / "configs" / "debug.yaml"), "--data.data_dir",
                         str(data_dir), "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "12",
                         "--trainer.val_check_interval", "6", "--trainer.log_every_n_steps", "3",
                         "--trainer.enable_progress_bar", "false", "--samples.max_new_tokens", "8")
    assert code == 0, err[-2000:]
    run_dir = tmp_path / "runs" / "gpt" / "version_0"
    logged = scalars(run_dir)
    assert all(math.isfinite(v) for v in logged["train/loss"]) and logged["val/loss"][-1] < logged["val/loss"][0]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 12
    assert {w.dtype for w in checkpoint["state_dict"].values()} == {torch.float32}


@pytest.mark.slow  # torch.compile: ~30 s cold on a CPU
def test_compiled_fit_logs_text_samples(data_dir, tmp_path, capsys, monkeypatch):
    """`model.compile: true` (the GPU config's) with the text samples logged after each validation: the
    compiled model trains, and samples from it after every validation."""
    from conftest import run_main

    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "fit", "--config", str(REPO / "configs" / "debug.yaml"), "--data.data_dir",
                         str(data_dir), "--model.compile", "true", "--trainer.max_steps", "4",
                         "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "2",
                         "--trainer.enable_progress_bar", "false", "--samples.max_new_tokens", "16")
    assert code == 0, err[-2000:]
    events = EventAccumulator(str(tmp_path / "runs" / "gpt" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    samples = events.Tensors("samples/text_summary")
    assert [s.step for s in samples] == [2, 4]
    assert all(s.tensor_proto.string_val[0].strip() for s in samples)
