"""The real command line: fit writes checkpoints and TensorBoard scalars, predict samples, configs parse."""

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, run_cli, scalars

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_fit_lowers_val_loss_and_writes_checkpoints_and_events(trained_run):
    run_dir = trained_run["run_dir"]
    logged = scalars(run_dir)
    for tag in ("train/loss", "val/loss", "val/ppl", "val/bpb", "lr-AdamW/decay", "train/tokens_per_sec"):
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
    assert set(listed) == set(LightningCLI.subcommands()) | set(COMMANDS)
    assert all(summary.strip() for summary in listed.values())


@pytest.mark.parametrize("command", ["fit", "generate", "export", "consolidate", "serve", "prepare"])
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
    assert "512 tokens" in capsys.readouterr().out
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
