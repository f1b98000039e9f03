"""Bad input, careless or hostile, through the real command line.

Each case of the table must end in a one-line `error: ...` that names the fix, a non-zero exit status, no
traceback, no file that existed before changed, no run folder left behind, and no code run from a file the
user pointed at (hostile files write a marker when unpickled or imported; it must never appear).

Cases run in this process through `project.cli.main` (fast); the ones marked `cli=True` run `python -m
project` in a subprocess, as a user would: the hostile ones, serving, and one representative of each group.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, run_cli, run_main

DEBUG = str(REPO / "configs" / "debug.yaml")
FIT = ["fit", "--config", DEBUG]
PREDICT = ["predict", "--config", DEBUG]
GENERATE = ["generate", "--ckpt_path"]
MARKER = "PWNED"  # what hostile files try to write into the case folder
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the case is about a machine without CUDA")


class WritesMarker:
    """Unpickling this writes a file: stands in for whatever code a hostile checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('code from a user file ran')",)


def edited_checkpoint(trained: dict, edit) -> dict:
    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    edit(checkpoint)
    return checkpoint


def save_distributed(folder: Path, checkpoint: dict) -> None:
    """A DCP folder like ModelParallelStrategy writes: the weights as shards + .metadata, the rest in meta.pt."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": checkpoint["state_dict"]}, checkpoint_id=folder, no_dist=True)
    torch.save({k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}, folder / "meta.pt")


def hf_copy(case: Path, exported: Path, name: str) -> Path:
    target = case / name
    shutil.copytree(exported, target)
    return target


def set_config(**values):
    return lambda ckpt: ckpt["hyper_parameters"]["config"].update(values)


class Artifacts(dict):
    """`{name}` in a case's arguments builds that file or folder in the case folder, on first use."""

    def __init__(self, case: Path, trained: dict, request) -> None:
        super().__init__(case=str(case), ckpt=str(trained["ckpt"]), data=str(trained["root"] / "data"))
        self.case, self.trained, self.request = case, trained, request

    def __missing__(self, name: str) -> str:
        path = getattr(self, f"make_{name}")()
        self[name] = str(path)
        return self[name]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.case / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def checkpoint_file(self, name: str, checkpoint) -> Path:
        torch.save(checkpoint, self.case / name)
        return self.case / name

    @property
    def exported(self) -> Path:
        return self.request.getfixturevalue("exported_dir")

    # --- corpora and config files ---
    def make_empty_txt(self): return self.file("empty.txt", "")
    def make_blank_txt(self): return self.file("blank.txt", " \n\t\n" * 50)
    def make_short_txt(self): return self.file("short.txt", "To be.\n")
    def make_latin1_txt(self): return self.file("latin1.txt", "Roméo et Juliette\n".encode("latin-1") * 200)

    def make_one_line_txt(self):  # a character corpus without "\n", the default sample prompt
        text = (self.trained["root"] / "data" / "tinyshakespeare" / "input.txt").read_text()[:40_000]
        return self.file("one_line.txt", text.replace("\n", " "))

    def make_broken_link(self):
        (self.case / "broken_link.txt").symlink_to(self.case / "gone.txt")
        return self.case / "broken_link.txt"

    def make_afile(self): return self.file("afile", "a file, not a folder")
    def make_bad_yaml(self): return self.file("bad.yaml", "model:\n  learning_rate: [0.1\n")
    def make_list_yaml(self): return self.file("list.yaml", "- fit\n- model\n")

    def make_python_tag_yaml(self):
        code = f"open({str(self.case / MARKER)!r}, 'w').write('x')"
        return self.file("tag.yaml", f"model: !!python/object/apply:builtins.exec [\"{code}\"]\n")

    def make_nonempty_dir(self):
        (self.case / "nonempty").mkdir()
        self.file("nonempty/config.json", "{}")
        return self.case / "nonempty"

    def make_empty_dir(self):
        (self.case / "empty_dir").mkdir()
        return self.case / "empty_dir"


    # --- checkpoints: broken, inconsistent and hostile ---
    def make_half_ckpt(self):
        data = Path(self.trained["ckpt"]).read_bytes()
        return self.file("half.ckpt", data[: len(data) // 2])

    def make_empty_ckpt(self): return self.file("empty.ckpt", b"")

    def make_lfs_ckpt(self):  # what a clone without `git lfs pull` holds
        return self.file("lfs.ckpt", "version https://git-lfs.github.com/spec/v1\noid sha256:"
                         + "ab" * 32 + "\nsize 1234567\n")

    def make_yaml_ckpt(self): return self.file("config.ckpt", Path(DEBUG).read_text())

    def make_hostile_ckpt(self):
        return self.checkpoint_file("hostile.ckpt", {"state_dict": WritesMarker(self.case / MARKER)})

    def make_vocab_ckpt(self): return self.checkpoint_file("vocab.ckpt", edited_checkpoint(self.trained, set_config(vocab_size=80)))
    def make_width_ckpt(self): return self.checkpoint_file("width.ckpt", edited_checkpoint(self.trained, set_config(n_embd=64)))
    def make_block_ckpt(self): return self.checkpoint_file("block.ckpt", edited_checkpoint(self.trained, set_config(block_size=64)))

    def make_tokenizer_ckpt(self):  # 70 characters for a 65-token model
        def edit(ckpt): ckpt["tokenizer"]["chars"] += "ÆØÅæø"
        return self.checkpoint_file("tokenizer.ckpt", edited_checkpoint(self.trained, edit))

    def make_garbage_tokenizer_ckpt(self):
        def edit(ckpt): ckpt["tokenizer"] = {"kind": "sentencepiece", "model": "/etc/passwd"}
        return self.checkpoint_file("garbage_tokenizer.ckpt", edited_checkpoint(self.trained, edit))

    def make_no_hparams_ckpt(self):
        return self.checkpoint_file("no_hparams.ckpt", edited_checkpoint(self.trained, lambda c: c.pop("hyper_parameters")))

    def make_class_path_ckpt(self):
        """Hyperparameters naming a module to import; the module sits next to it (the working folder is on
        sys.path for `python -m`), and importing it writes the marker."""
        self.file("evil_plugin.py", f"open({str(self.case / MARKER)!r}, 'w').write('x')\nclass Model: ...\n")

        def edit(ckpt): ckpt["hyper_parameters"]["_class_path"] = "evil_plugin.Model"
        return self.checkpoint_file("class_path.ckpt", edited_checkpoint(self.trained, edit))

    def make_hostile_dcp(self):
        """Item 1 of issue 14: a folder that looks distributed, whose .metadata pickle runs code."""
        folder = self.case / "hostile_dcp"
        folder.mkdir()
        (folder / ".metadata").write_bytes(pickle.dumps(WritesMarker(self.case / MARKER)))
        torch.save({"global_step": 1}, folder / "meta.pt")
        return folder

    def make_hostile_link(self):
        (self.case / "innocent.ckpt").symlink_to(self.make_hostile_dcp(), target_is_directory=True)
        return self.case / "innocent.ckpt"

    def make_genuine_dcp(self):
        folder = self.case / "genuine_dcp"
        save_distributed(folder, torch.load(self.trained["ckpt"], map_location="cpu", weights_only=True))
        return folder

    def make_hostile_meta_dcp(self):  # genuine shards and .metadata, a pickle with code in meta.pt
        folder = self.make_genuine_dcp()
        torch.save({"global_step": WritesMarker(self.case / MARKER)}, folder / "meta.pt")
        return folder

    def make_no_meta_dcp(self):
        folder = self.make_genuine_dcp()
        (folder / "meta.pt").unlink()
        return folder

    # --- exported transformers folders ---
    def make_hf_no_config(self):
        folder = hf_copy(self.case, self.exported, "hf_no_config")
        (folder / "config.json").unlink()
        return folder

    def make_hf_bad_config(self):
        folder = hf_copy(self.case, self.exported, "hf_bad_config")
        (folder / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
        return folder

    def make_hf_truncated(self):
        folder = hf_copy(self.case, self.exported, "hf_truncated")
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
        return folder

    def make_hf_pickle_only(self):
        folder = hf_copy(self.case, self.exported, "hf_pickle_only")
        (folder / "model.safetensors").unlink()
        torch.save({"w": WritesMarker(self.case / MARKER)}, folder / "pytorch_model.bin")
        return folder

    # --- network ---
    def make_busy_port(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.request.addfinalizer(sock.close)
        return sock.getsockname()[1]

    def make_free_port(self): return free_port()

    def make_empty_tiktoken_cache(self):
        (self.case / "tiktoken_cache").mkdir()
        return self.case / "tiktoken_cache"


def bad(case_id: str, args: list[str], message: str, *, cli: bool = False, env: dict | None = None, marks=()):
    """One row: arguments and the substring the final `error:` line must hold (both may use `{artifact}`)."""
    return pytest.param(args, message, cli, env or {}, id=case_id, marks=marks)


CASES = [
    # --- config: flags, values and files ---
    bad("unknown-key", [*FIT, "--model.config.n_layers", "3"], "n_layers"),
    bad("wrong-type", [*FIT, "--model.config.n_layer", "two"], "n_layer", cli=True),
    bad("n_head-zero", [*FIT, "--model.config.n_head", "0"], "n_head must be >= 1"),
    bad("n_embd-zero", [*FIT, "--model.config.n_embd", "0"], "n_embd must be >= 1"),
    bad("n_head-negative", [*FIT, "--model.config.n_head", "-2"], "n_head must be >= 1"),
    bad("n_embd-not-divisible", [*FIT, "--model.config.n_embd", "30", "--model.config.n_head", "4"],
        "divisible by n_head"),
    bad("dropout-one", [*FIT, "--model.config.dropout", "1.0"], "dropout must be in [0, 1)"),
    bad("block_size-huge", [*FIT, "--model.config.block_size", str(2**40)], "--model.config.block_size"),
    bad("accelerator-gpu", [*FIT, "--trainer.accelerator", "gpu"], "--trainer.accelerator cpu", cli=True,
        marks=NO_CUDA),
    bad("devices-zero", [*FIT, "--trainer.devices", "0"], "--trainer.devices"),
    bad("devices-negative", [*FIT, "--trainer.devices", "-3"], "--trainer.devices"),
    bad("max_steps-negative", [*FIT, "--trainer.max_steps", "-5"], "--trainer.max_steps"),
    bad("accumulate-zero", [*FIT, "--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches"),
    bad("learning_rate-negative", [*FIT, "--model.optimizer.learning_rate", "-0.001"],
        "--model.optimizer.learning_rate"),
    bad("learning_rate-nan", [*FIT, "--model.optimizer.learning_rate", "nan"], "model.optimizer.learning_rate"),
    bad("warmup-negative", [*FIT, "--model.optimizer.warmup_steps", "-10"], "--model.optimizer.warmup_steps"),
    bad("batch_size-zero", [*FIT, "--data.batch_size", "0"], "--data.batch_size"),
    bad("max_val_windows-zero", [*FIT, "--data.max_val_windows", "0"], "--data.max_val_windows"),
    bad("val_fraction-one", [*FIT, "--data.split.val_fraction", "1"], "val_fraction must be in (0, 1)"),
    bad("num_workers-negative", [*FIT, "--data.num_workers", "-1"], "--data.num_workers"),
    bad("config-missing", ["fit", "--config", "{case}/nope.yaml"], "nope.yaml"),
    bad("config-bad-yaml", ["fit", "--config", "{bad_yaml}"], "Problems parsing config"),
    bad("config-not-a-mapping", ["fit", "--config", "{list_yaml}"], "Unexpected config"),
    bad("config-python-tag", ["fit", "--config", "{python_tag_yaml}"], "Problems parsing config", cli=True),
    bad("unknown-subcommand", ["frobnicate"], "generate"),
    bad("log-folder-under-a-file", [*FIT, "--trainer.logger.init_args.save_dir", "{afile}/runs"], "afile"),
    # --- data ---
    bad("corpus-missing", [*FIT, "--data.path", "{case}/nope.txt"], "does not exist"),
    bad("corpus-empty", [*FIT, "--data.path", "{empty_txt}"], "is empty"),
    bad("corpus-blank", [*FIT, "--data.path", "{blank_txt}"], "is empty"),
    bad("corpus-short", [*FIT, "--data.path", "{short_txt}"], "fewer than one window"),
    bad("corpus-latin1", [*FIT, "--data.path", "{latin1_txt}"], "not UTF-8", cli=True),
    bad("corpus-binary", [*FIT, "--data.path", "{ckpt}"], "not UTF-8"),
    bad("corpus-is-a-folder", [*FIT, "--data.path", "{empty_dir}"], "is a folder"),
    bad("corpus-broken-symlink", [*FIT, "--data.path", "{broken_link}"], "does not exist"),
    bad("corpus-without-sample-prompt", [*FIT, "--data.path", "{one_line_txt}"], "--samples.prompt", cli=True),
    bad("data_dir-is-a-file", [*FIT, "--data.data_dir", "{afile}"], "--data.data_dir"),
    bad("tokenizer-unknown", [*FIT, "--data.tokenizer", "gpt5"], "unknown tokenizer"),
    bad("bpe-offline", [*FIT, "--data.tokenizer", "gpt2"], "TIKTOKEN_CACHE_DIR", cli=True,
        env={"TIKTOKEN_CACHE_DIR": "{empty_tiktoken_cache}", "HTTPS_PROXY": "http://127.0.0.1:9",
             "HTTP_PROXY": "http://127.0.0.1:9"}),
    bad("streaming_dir-missing", [*FIT, "--data.streaming_dir", "{case}/no_chunks"], "prepare"),
    bad("prepare-input-missing", ["prepare", "--input_dir", "{case}/nope", "--output_dir", "{case}/out"],
        "does not exist"),
    bad("predict-empty-prompt", [*PREDICT, "--ckpt_path", "{ckpt}", "--data.prompts", '[""]'], "prompt is empty"),
    bad("predict-output-under-a-file", [*PREDICT, "--ckpt_path", "{ckpt}", "--predictions.output_path",
                                        "{afile}/out.jsonl"], "afile"),
    # --- checkpoints: missing, broken, inconsistent ---
    bad("ckpt-missing", [*PREDICT, "--ckpt_path", "{case}/nope.ckpt"], "does not exist"),
    bad("ckpt-truncated", [*PREDICT, "--ckpt_path", "{half_ckpt}"], "truncated"),
    bad("ckpt-truncated-generate", [*GENERATE, "{half_ckpt}"], "truncated", cli=True),
    bad("ckpt-empty-file", [*GENERATE, "{empty_ckpt}"], "is empty"),
    bad("ckpt-git-lfs-pointer", [*GENERATE, "{lfs_ckpt}"], "git lfs pull"),
    bad("ckpt-yaml-text", [*GENERATE, "{yaml_ckpt}"], "not a checkpoint"),
    bad("ckpt-empty-folder", [*GENERATE, "{empty_dir}"], "not a checkpoint"),
    bad("ckpt-dcp-without-meta", [*GENERATE, "{no_meta_dcp}"], "meta.pt"),
    bad("ckpt-vocab-mismatch", [*GENERATE, "{vocab_ckpt}"], "does not match"),
    bad("ckpt-width-mismatch", [*GENERATE, "{width_ckpt}"], "does not match"),
    bad("ckpt-block_size-mismatch", [*GENERATE, "{block_ckpt}"], "does not match"),
    bad("ckpt-tokenizer-mismatch", [*GENERATE, "{tokenizer_ckpt}"], "tokenizer"),
    bad("ckpt-tokenizer-unknown", [*GENERATE, "{garbage_tokenizer_ckpt}"], "tokenizer"),
    bad("ckpt-no-hyperparameters", [*GENERATE, "{no_hparams_ckpt}"], "lacks"),
    bad("predict-other-architecture", [*PREDICT, "--ckpt_path", "{ckpt}", "--model.config.n_layer", "3"],
        "different architecture"),
    bad("predict-block_size-too-large", [*PREDICT, "--ckpt_path", "{ckpt}", "--model.config.block_size", "64"],
        "larger than the context"),
    bad("resume-other-architecture", [*FIT, "--ckpt_path", "{ckpt}", "--model.config.n_embd", "64"],
        "different architecture"),
    bad("resume-other-tokenizer", [*FIT, "--ckpt_path", "{ckpt}", "--data.tokenizer", "gpt2"], "--data.tokenizer"),
    bad("resume-other-learning_rate", [*FIT, "--ckpt_path", "{ckpt}", "--model.optimizer.learning_rate", "0.01"],
        "--model.optimizer.learning_rate"),
    bad("resume-other-warmup", [*FIT, "--ckpt_path", "{ckpt}", "--model.optimizer.warmup_steps", "50"],
        "--model.optimizer.warmup_steps"),
    bad("resume-vocab-mismatch", [*FIT, "--ckpt_path", "{vocab_ckpt}"], "does not match"),
    bad("resume-last-missing", [*FIT, "--ckpt_path", "last"], "no last.ckpt"),
    bad("resume-from-url", [*FIT, "--ckpt_path", "https://127.0.0.1:9/last.ckpt"], "URL"),
    bad("generate-from-url", [*GENERATE, "http://127.0.0.1:9/last.ckpt"], "URL"),
    bad("hf-folder-without-config", [*GENERATE, "{hf_no_config}"], "config.json"),
    bad("hf-folder-bad-config", [*GENERATE, "{hf_bad_config}"], "config.json", cli=True),
    bad("hf-folder-truncated-weights", [*GENERATE, "{hf_truncated}"], "model.safetensors"),
    # --- checkpoints: hostile (nothing may run; see WritesMarker) ---
    bad("hostile-dcp-generate", [*GENERATE, "{hostile_dcp}"], "refusing", cli=True),
    bad("hostile-dcp-export", ["export", "--ckpt_path", "{hostile_dcp}", "--out", "{case}/out"], "refusing", cli=True),
    bad("hostile-dcp-predict", [*PREDICT, "--ckpt_path", "{hostile_dcp}"], "refusing", cli=True),
    bad("hostile-dcp-validate", ["validate", "--config", DEBUG, "--ckpt_path", "{hostile_dcp}"], "refusing"),
    bad("hostile-dcp-consolidate", ["consolidate", "--ckpt_path", "{hostile_dcp}", "--out", "{case}/one.ckpt"],
        "refusing", cli=True),
    bad("hostile-dcp-serve", ["serve", "--ckpt_path", "{hostile_dcp}", "--port", "{free_port}"], "refusing",
        cli=True),
    bad("hostile-dcp-resume", [*FIT, "--ckpt_path", "{hostile_dcp}"], "refusing", cli=True),
    bad("hostile-dcp-behind-symlink", [*GENERATE, "{hostile_link}"], "refusing"),
    bad("hostile-dcp-meta.pt", [*GENERATE, "{hostile_meta_dcp}"], "not a checkpoint"),
    bad("hostile-ckpt-generate", [*GENERATE, "{hostile_ckpt}"], "not a checkpoint"),
    bad("hostile-ckpt-resume-weights_only-false", [*FIT, "--ckpt_path", "{hostile_ckpt}", "--weights_only", "false"],
        "weights_only"),
    bad("hostile-ckpt-class_path", [*FIT, "--ckpt_path", "{class_path_ckpt}"], "hyperparameters", cli=True),
    bad("hostile-hf-pickle-weights", [*GENERATE, "{hf_pickle_only}"], "never loaded"),
    # --- generation ---
    bad("prompt-empty", [*GENERATE, "{ckpt}", "--prompt", ""], "prompt"),
    bad("prompt-too-long", [*GENERATE, "{ckpt}", "--prompt", "x" * 40], "shorten the prompt"),
    bad("prompt-unknown-character", [*GENERATE, "{ckpt}", "--prompt", "ROMEO 🙂"], "not in this model's vocabulary"),
    bad("temperature-negative", [*GENERATE, "{ckpt}", "--generation.temperature", "-1"], "temperature must be a number >= 0"),
    bad("temperature-nan", [*GENERATE, "{ckpt}", "--generation.temperature", "nan"], "temperature"),
    bad("top_p-above-one", [*GENERATE, "{ckpt}", "--generation.top_p", "1.5"], "top_p must be in (0, 1]"),
    bad("top_p-zero", [*GENERATE, "{ckpt}", "--generation.top_p", "0"], "top_p must be in (0, 1]"),
    bad("top_k-zero", [*GENERATE, "{ckpt}", "--generation.top_k", "0"], "top_k must be >= 1"),
    bad("max_new_tokens-negative", [*GENERATE, "{ckpt}", "--generation.max_new_tokens", "-1"], "max_new_tokens must be a whole number >= 0"),
    bad("max_new_tokens-not-a-number", [*GENERATE, "{ckpt}", "--generation.max_new_tokens", "many"], "max_new_tokens"),
    bad("seed-overflow", [*GENERATE, "{ckpt}", "--generation.seed", str(10**30)], "seed must be"),
    bad("stop-empty-string", [*GENERATE, "{ckpt}", "--generation.stop", '[""]'], "stop"),
    bad("generate-unknown-flag", [*GENERATE, "{ckpt}", "--temprature", "0"], "temprature"),
    bad("device-cuda", [*GENERATE, "{ckpt}", "--device", "cuda"], "--device cpu", cli=True, marks=NO_CUDA),
    bad("device-unknown", [*GENERATE, "{ckpt}", "--device", "foo"], "--device"),
    # --- export ---
    bad("export-out-not-empty", ["export", "--ckpt_path", "{ckpt}", "--out", "{nonempty_dir}"], "--overwrite"),
    bad("export-out-is-a-file", ["export", "--ckpt_path", "{ckpt}", "--out", "{afile}"], "is a file"),
    bad("export-out-under-a-file", ["export", "--ckpt_path", "{ckpt}", "--out", "{afile}/hf"], "afile"),
    bad("export-from-broken-hf-folder", ["export", "--ckpt_path", "{hf_no_config}", "--out", "{case}/again"],
        "config.json"),
    bad("consolidate-not-distributed", ["consolidate", "--ckpt_path", "{ckpt}", "--out", "{case}/one.ckpt"],
        "not a distributed checkpoint"),
    bad("consolidate-out-exists", ["consolidate", "--ckpt_path", "{genuine_dcp}", "--out", "{afile}"], "exists"),
    # --- serve ---
    bad("serve-port-in-use", ["serve", "--ckpt_path", "{ckpt}", "--port", "{busy_port}"], "in use", cli=True),
    bad("serve-unknown-host", ["serve", "--ckpt_path", "{ckpt}", "--host", "no-such-host.invalid"], "--host",
        cli=True),
    bad("serve-port-out-of-range", ["serve", "--ckpt_path", "{ckpt}", "--port", "70000"], "port must be in 1..65535"),
    bad("serve-missing-ckpt", ["serve", "--ckpt_path", "{case}/nope.ckpt"], "does not exist"),
]
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


@pytest.fixture(scope="session")
def exported_dir(trained_run, tmp_path_factory) -> Path:
    """The trained tiny checkpoint exported once as a transformers folder."""
    pytest.importorskip("transformers")
    from project.formats.checkpoint import load_checkpoint
    from project.formats.hf import export_hf

    loaded = load_checkpoint(trained_run["ckpt"])
    return export_hf(loaded.model, loaded.tokenizer, tmp_path_factory.mktemp("exported") / "hf")


def file_hashes(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def run_folders(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("version_*") if p.is_dir()}


@pytest.mark.parametrize("args, message, cli, env", CASES)
def test_bad_input_is_refused_in_one_line(args, message, cli, env, trained_run, tmp_path, capsys, monkeypatch,
                                          request):
    artifacts = Artifacts(tmp_path, trained_run, request)
    args = [arg.format_map(artifacts) for arg in args]
    message = message.format_map(artifacts)
    env = {key: value.format_map(artifacts) for key, value in env.items()}
    if args[0] in LIGHTNING_SUBCOMMANDS and "--data.data_dir" not in args:
        args += ["--data.data_dir", artifacts["data"]]  # the session's corpus and token cache: no download
    watched = (tmp_path, trained_run["root"])
    files_before, runs_before = file_hashes(*watched), run_folders(*watched)

    if cli:
        result = run_cli(*args, cwd=tmp_path, env=env, timeout=240)
        code, err = result.returncode, result.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code, err = run_main(capsys, *args)

    assert not (tmp_path / MARKER).exists(), "code from a file the user pointed at ran"
    assert code not in (0, None), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last_line = err.strip().splitlines()[-1] if err.strip() else ""
    assert last_line.startswith("error: ") and message in last_line, err[-3000:]
    files_after = file_hashes(*watched)
    assert {p: h for p, h in files_after.items() if p in files_before} == files_before, "an existing file changed"
    assert run_folders(*watched) == runs_before, "a failed run left a run folder behind"


def test_the_table_is_large_and_names_every_command():
    commands = {param.values[0][0] for param in CASES}
    assert len(CASES) >= 50
    assert {"fit", "predict", "validate", "generate", "export", "consolidate", "serve", "prepare"} <= commands


def test_a_genuine_distributed_checkpoint_loads_and_consolidates(trained_run, tmp_path, capsys):
    """The safe reader refuses hostile folders, not real ones: a DCP folder gives the same model as its .ckpt."""
    from project.formats.checkpoint import load_checkpoint

    folder = tmp_path / "dcp"
    save_distributed(folder, torch.load(trained_run["ckpt"], map_location="cpu", weights_only=True))
    code, err = run_main(capsys, "consolidate", "--ckpt_path", str(folder), "--out", str(tmp_path / "one.ckpt"))
    assert code == 0, err
    idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = load_checkpoint(trained_run["ckpt"]).model(idx)
    with torch.no_grad():
        for path in (folder, tmp_path / "one.ckpt"):
            torch.testing.assert_close(load_checkpoint(path).model(idx), reference)


def test_huge_max_new_tokens_streams_without_reserving_memory_for_it(trained_run):
    """Tokens are produced one at a time; nothing proportional to max_new_tokens is allocated up front."""
    from project.formats.checkpoint import load_checkpoint
    from project.generate import GenerationSettings, stream

    loaded = load_checkpoint(trained_run["ckpt"])
    pieces = stream(loaded.model, loaded.tokenizer, "ROMEO:", GenerationSettings(max_new_tokens=10**15, seed=0))
    text = "".join(next(pieces) for _ in range(2 * loaded.model.config.block_size))  # past the context: it slides
    pieces.close()
    assert len(text) == 2 * loaded.model.config.block_size


def token_files(cache: Path) -> list[Path]:
    """The token arrays of a cache folder, largest first (its metadata is JSON)."""
    return sorted((p for p in cache.iterdir() if p.is_file() and p.suffix != ".json"), key=lambda p: -p.stat().st_size)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 1])


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def fill_with_ff(paths: list[Path]) -> None:
    for path in paths:
        path.write_bytes(b"\xff" * path.stat().st_size)


CORRUPTIONS = {  # what a crash, a full disk or a stray edit leaves in a token cache
    "tokens-truncated": lambda cache: cut_in_half(token_files(cache)[0]),
    "meta-half-written": lambda cache: cut_in_half(cache / "meta.json"),
    "tokens-out-of-vocabulary": lambda cache: fill_with_ff(token_files(cache)),
    "tokens-one-byte-changed": lambda cache: flip_middle_byte(token_files(cache)[0]),
}


VALIDATE_ONE_BATCH = ["validate", "--config", DEBUG, "--trainer.limit_val_batches", "1", "--samples.max_new_tokens", "0"]


@pytest.fixture(scope="module")
def char_cache_data_dir(tmp_path_factory, shakespeare_path: Path) -> Path:
    """A data folder holding TinyShakespeare and nothing but its character token cache."""
    root = tmp_path_factory.mktemp("char_cache")
    (root / "data" / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(shakespeare_path, root / "data" / "tinyshakespeare" / "input.txt")
    result = run_cli(*VALIDATE_ONE_BATCH, "--data.data_dir", str(root / "data"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "data"


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_token_cache_is_detected_and_rebuilt(corruption, char_cache_data_dir, tmp_path, capsys,
                                                       monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(char_cache_data_dir, data)
    caches = [meta.parent for meta in data.rglob("meta.json")]
    assert len(caches) == 1, caches
    good = {p.name: p.read_bytes() for p in token_files(caches[0])}
    CORRUPTIONS[corruption](caches[0])
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, *VALIDATE_ONE_BATCH, "--data.data_dir", str(data))
    assert code == 0, err[-3000:]
    assert "rebuilding" in err
    assert {p.name: p.read_bytes() for p in token_files(caches[0])} == good


def test_default_root_dir_holds_the_runs_and_resumes_from_there(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    args = ["fit", "--config", DEBUG, "--data.data_dir", str(trained_run["root"] / "data"),
            "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "1", "--samples.max_new_tokens", "0"]
    code, err = run_main(capsys, *args, "--trainer.max_steps", "2")
    assert code == 0, err[-3000:]
    last = root / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (tmp_path / "runs").exists()
    code, err = run_main(capsys, *args, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert f"resuming from {last}" in err
    assert torch.load(last, weights_only=True)["global_step"] == 3
