"""Bad input, careless or hostile, through the real command line.

Each case of the table must end in a one-line `error: ...` that names the fix, a non-zero exit status, no
traceback, no file that existed before changed, no run folder left behind, and no code run from a file the
user pointed at (hostile files write a marker when unpickled or imported; it must never appear).

Cases run in this process through `project.commands.main` (fast); the ones marked `cli=True` run `python -m
project` in a subprocess, as a user would: a representative of each attack and of each group, and serving.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from conftest import REPO, SHAKESPEARE, free_port, run_cli, run_main

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
    """A DCP folder as ShardedStrategy writes it: weights and the optimizer's state (keyed by parameter names) as
    shards + .metadata, the rest in meta.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from project.training.module import GPTModule
    from project.training.optim import build_optimizer

    module = GPTModule(**checkpoint["hyper_parameters"])
    module.configure_model()  # the weights (built on the meta device until then)
    module.load_state_dict(checkpoint["state_dict"])
    optimizer, _ = build_optimizer(module.model, module.optimizer_settings, total_steps=1, fused=False, sharded=False)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    state = {"state_dict": checkpoint["state_dict"], "optimizer_0": get_optimizer_state_dict(module, optimizer)}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}, folder / "meta.pt")


def rewrite_metadata(folder: Path, edit) -> None:
    """Edit a DCP folder's .metadata as torch wrote it (plain pickle: only tests write it this way)."""
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    edit(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def add_pickled_item(folder: Path, key: str, obj) -> None:
    """Declare `key` in the folder's .metadata as a pickled item stored in a new shard holding `obj`."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    payload = io.BytesIO()
    torch.save(obj, payload)
    (folder / "__1_0.distcp").write_bytes(payload.getvalue())

    def edit(metadata) -> None:
        info = next(iter(metadata.storage_data.values()))  # torch's own storage record, reused with new values
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        metadata.planner_data[key] = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != key}
        metadata.storage_data[MetadataIndex(key)] = dataclasses.replace(info, relative_path="__1_0.distcp", offset=0,
                                                                        length=len(payload.getvalue()))
    rewrite_metadata(folder, edit)


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

    def make_unwritable_dir(self):  # not even root may create files in /proc
        return "/proc"

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

    def make_nan_ckpt(self):
        def edit(ckpt): ckpt["state_dict"]["model.wte.weight"][3, 5] = float("nan")
        return self.checkpoint_file("nan.ckpt", edited_checkpoint(self.trained, edit))

    def make_float_layers_ckpt(self):  # a number of layers GPT cannot count to
        return self.checkpoint_file("float_layers.ckpt", edited_checkpoint(self.trained, set_config(n_layer=2.0)))

    def make_callbacks_ckpt(self):  # a callback's state that is not a dict
        def edit(ckpt): ckpt["callbacks"][next(iter(ckpt["callbacks"]))] = "best"
        return self.checkpoint_file("callbacks.ckpt", edited_checkpoint(self.trained, edit))

    def make_step_ckpt(self):
        def edit(ckpt): ckpt["global_step"] = "forty"
        return self.checkpoint_file("step.ckpt", edited_checkpoint(self.trained, edit))

    def make_extra_weight_ckpt(self):
        def edit(ckpt): ckpt["state_dict"]["head.bias"] = torch.zeros(3)
        return self.checkpoint_file("extra_weight.ckpt", edited_checkpoint(self.trained, edit))

    def tokenizer_state_ckpt(self, name: str, state) -> Path:
        def edit(ckpt): ckpt["tokenizer"] = state
        return self.checkpoint_file(f"{name}.ckpt", edited_checkpoint(self.trained, edit))

    def make_chars_not_text_ckpt(self): return self.tokenizer_state_ckpt("chars_not_text", {"kind": "char", "chars": 65})
    def make_bpe_without_json_ckpt(self): return self.tokenizer_state_ckpt("bpe_without_json", {"kind": "bpe"})
    def make_tokenizer_not_a_dict_ckpt(self): return self.tokenizer_state_ckpt("tokenizer_not_a_dict", ["char"])

    def make_tiktoken_name_list_ckpt(self):
        return self.tokenizer_state_ckpt("tiktoken_name_list", {"kind": "tiktoken", "name": ["gpt2"]})

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

    def make_fallback_dcp(self):
        """Item 1 of issue 23: a .metadata within the allow-list whose storage_meta (a frozen MetadataIndex) makes
        torch's own metadata read fail, sending it to the rank-local __0.metadata, which holds code."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        folder = self.dcp_copy("fallback_dcp")
        rewrite_metadata(folder, lambda metadata: setattr(metadata, "storage_meta", MetadataIndex("x")))
        (folder / "__0.metadata").write_bytes(pickle.dumps(WritesMarker(self.case / MARKER)))
        return folder

    def make_pickled_weight_dcp(self):  # a weight declared as a pickled item, which torch unpickles unchecked
        folder = self.dcp_copy("pickled_weight_dcp")
        add_pickled_item(folder, "state_dict.model.wte.weight", WritesMarker(self.case / MARKER))
        return folder

    def make_pickled_setting_dcp(self):  # an optimizer setting (pickled in genuine folders too) that holds code
        folder = self.dcp_copy("pickled_setting_dcp")
        add_pickled_item(folder, "optimizer_0.param_groups.0.lr", WritesMarker(self.case / MARKER))
        return folder

    def make_escaping_dcp(self):  # a shard path outside the folder
        folder = self.dcp_copy("escaping_dcp")
        shutil.copy(next(folder.glob("__0_0.distcp")), self.case / "outside.distcp")

        def edit(metadata) -> None:
            metadata.storage_data = {k: dataclasses.replace(v, relative_path="../outside.distcp")
                                     for k, v in metadata.storage_data.items()}
        rewrite_metadata(folder, edit)
        return folder

    def make_genuine_dcp(self): return self.dcp_copy("genuine_dcp")

    def dcp_copy(self, name: str) -> Path:
        """A copy of the trained checkpoint as a DCP folder (written once per session), to alter."""
        shutil.copytree(self.request.getfixturevalue("distributed_dir"), self.case / name)
        return self.case / name

    def make_hostile_meta_dcp(self):  # genuine shards and .metadata, a pickle with code in meta.pt
        folder = self.dcp_copy("hostile_meta_dcp")
        torch.save({"global_step": WritesMarker(self.case / MARKER)}, folder / "meta.pt")
        return folder

    def make_no_meta_dcp(self):
        folder = self.dcp_copy("no_meta_dcp")
        (folder / "meta.pt").unlink()
        return folder

    # --- runs with a trained BPE (the character model with resized embeddings): resuming with another tokenizer
    def bpe_folder(self, name: str, text: slice, vocab_size: int) -> Path:
        from project.tokenizer import train_bpe

        corpus = (self.trained["root"] / "data" / "tinyshakespeare" / "input.txt").read_text()
        train_bpe(corpus[text], vocab_size).save(self.case / name)
        return self.case / name

    def make_bpe_tokenizer(self): return self.bpe_folder("bpe", slice(0, 30_000), 300)
    def make_other_bpe_tokenizer(self): return self.bpe_folder("other_bpe", slice(30_000, 60_000), 300)
    def make_bigger_bpe_tokenizer(self): return self.bpe_folder("bigger_bpe", slice(0, 30_000), 320)

    def make_outside_alphabet_tokenizer(self):  # token 40 spelled with a character no byte stands for
        import json

        folder = self.make_bpe_tokenizer()
        spec = json.loads((folder / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        vocab["€"] = vocab.pop(next(token for token, i in vocab.items() if i == 40))
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        return folder

    def make_shadowing_folder(self):  # a folder in the working directory named like a tokenizer kind
        (self.case / "mytok").mkdir()
        return "mytok"

    def make_bpe_run(self):
        """A root folder holding runs/gpt/version_0 (config.yaml, checkpoints/last.ckpt) of a model trained with
        the `bpe_tokenizer` folder, for `--trainer.default_root_dir {bpe_run} --ckpt_path last`."""
        from project.tokenizer import BPETokenizer

        tokenizer = BPETokenizer.from_dir(self["bpe_tokenizer"])

        def edit(ckpt) -> None:
            ckpt["hyper_parameters"]["config"]["vocab_size"] = tokenizer.vocab_size
            for key in ("model.wte.weight", "model.lm_head.weight"):
                ckpt["state_dict"][key] = torch.zeros(tokenizer.vocab_size, ckpt["state_dict"][key].shape[1])
            ckpt["tokenizer"] = tokenizer.state_dict()
        run = self.case / "bpe_root" / "runs" / "gpt" / "version_0"
        (run / "checkpoints").mkdir(parents=True)
        torch.save(edited_checkpoint(self.trained, edit), run / "checkpoints" / "last.ckpt")
        config = (self.trained["run_dir"] / "config.yaml").read_text().replace("tokenizer: char",
                                                                              f"tokenizer: {self['bpe_tokenizer']}")
        (run / "config.yaml").write_text(config)
        return self.case / "bpe_root"

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


# every command that reads a checkpoint, with {} for the checkpoint
READS_A_CHECKPOINT = {
    "generate": [*GENERATE, "{{{}}}"],
    "export": ["export", "--ckpt_path", "{{{}}}", "--out", "{{case}}/out"],
    "consolidate": ["consolidate", "--ckpt_path", "{{{}}}", "--out", "{{case}}/one.ckpt"],
    "evaluate": ["evaluate", "--ckpt_path", "{{{}}}", "--text", "{{short_txt}}"],
    "serve": ["serve", "--ckpt_path", "{{{}}}", "--port", "{{free_port}}"],
    "predict": [*PREDICT, "--ckpt_path", "{{{}}}"],
    "validate": ["validate", "--config", DEBUG, "--ckpt_path", "{{{}}}"],
    "resume": [*FIT, "--ckpt_path", "{{{}}}"],
}


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
        "--model.config.n_layer 3 (the checkpoint's: 2)"),
    bad("predict-block_size-too-large", [*PREDICT, "--ckpt_path", "{ckpt}", "--model.config.block_size", "64"],
        "larger than its context (32)"),
    bad("resume-other-architecture", [*FIT, "--ckpt_path", "{ckpt}", "--model.config.n_embd", "64"],
        "--model.config.n_embd 64 (the checkpoint's: 32)"),
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
    *[bad(f"hostile-dcp-{command}", [a.format("hostile_dcp") for a in args], "refusing",
          cli=command in ("generate", "resume")) for command, args in READS_A_CHECKPOINT.items()],
    bad("hostile-dcp-behind-symlink", [*GENERATE, "{hostile_link}"], "refusing"),
    bad("hostile-dcp-meta.pt", [*GENERATE, "{hostile_meta_dcp}"], "not a checkpoint"),
    bad("hostile-ckpt-generate", [*GENERATE, "{hostile_ckpt}"], "not a checkpoint"),
    bad("hostile-ckpt-resume-weights_only-false", [*FIT, "--ckpt_path", "{hostile_ckpt}", "--weights_only", "false"],
        "weights_only"),
    bad("hostile-ckpt-class_path", [*FIT, "--ckpt_path", "{class_path_ckpt}"], "hyperparameters", cli=True),
    bad("hostile-hf-pickle-weights", [*GENERATE, "{hf_pickle_only}"], "never loaded"),
    *[bad(f"hostile-dcp-{attack}-{command}", [a.format(folder) for a in args], "refusing",
          cli=(folder, command) in (("fallback_dcp", "resume"), ("pickled_weight_dcp", "generate")))
      for folder, attack in (("fallback_dcp", "rank-local-fallback"), ("pickled_weight_dcp", "pickled-weight"))
      for command, args in READS_A_CHECKPOINT.items()],
    *[bad(f"hostile-dcp-pickled-setting-{command}", [a.format("pickled_setting_dcp") for a in args], "refusing item")
      for command, args in READS_A_CHECKPOINT.items() if command in ("consolidate", "validate", "resume")],
    bad("hostile-dcp-shard-outside-the-folder", [*GENERATE, "{escaping_dcp}"], "not a shard file"),
    bad("resume-dcp-under-plain-model-parallel", [*FIT, "--ckpt_path", "{genuine_dcp}", "--trainer.strategy.class_path",
                                                  "lightning.pytorch.strategies.ModelParallelStrategy"], "unchecked"),
    bad("resume-without-the-safe-plugin", [*FIT, "--ckpt_path", "{ckpt}", "--trainer.plugins", "[]"],
        "AtomicCheckpointIO"),
    # --- resume: every setting the checkpoint fixes, refused before the run folder is touched ---
    bad("resume-several-settings", [*FIT, "--ckpt_path", "{ckpt}", "--model.config.n_embd", "64",
                                    "--model.optimizer.learning_rate", "0.01"],
        "--model.config.n_embd 64 (the checkpoint's: 32); --model.optimizer.learning_rate 0.01"),
    bad("resume-other-vocabulary", [*FIT, "--ckpt_path", "{ckpt}", "--data.vocabulary", "abc"], "--data.vocabulary"),
    bad("resume-bpe-other-tokenizer-same-size", [*FIT, "--trainer.default_root_dir", "{bpe_run}", "--data.tokenizer",
                                                 "{other_bpe_tokenizer}", "--ckpt_path", "last"], "another tokenizer.json"),
    bad("resume-bpe-other-tokenizer-size", [*FIT, "--trainer.default_root_dir", "{bpe_run}", "--data.tokenizer",
                                            "{bigger_bpe_tokenizer}", "--ckpt_path", "last"], "--data.tokenizer"),
    bad("resume-bpe-N-below-its-vocabulary", [*FIT, "--trainer.default_root_dir", "{bpe_run}", "--data.tokenizer",
                                              "bpe:257", "--ckpt_path", "last"], "--data.tokenizer bpe:257"),
    # --- checkpoints: hand-edited values, each checked once when read (item 5 of issue 23) ---
    bad("ckpt-nan-weights", [*GENERATE, "{nan_ckpt}"], "NaN or infinite"),
    bad("ckpt-nan-weights-resume", [*FIT, "--ckpt_path", "{nan_ckpt}"], "NaN or infinite"),
    bad("ckpt-config-float-n_layer", [*GENERATE, "{float_layers_ckpt}"], "n_layer=2.0"),
    bad("ckpt-callback-state-not-a-dict", [*GENERATE, "{callbacks_ckpt}"], "'callbacks'"),
    bad("ckpt-callback-state-not-a-dict-resume", [*FIT, "--ckpt_path", "{callbacks_ckpt}"], "'callbacks'"),
    bad("ckpt-global_step-not-a-number", [*FIT, "--ckpt_path", "{step_ckpt}"], "'global_step'"),
    bad("ckpt-weight-no-module-has", [*GENERATE, "{extra_weight_ckpt}"], "head.bias"),
    bad("ckpt-tokenizer-chars-not-text", [*GENERATE, "{chars_not_text_ckpt}"], "tokenizer state"),
    bad("ckpt-tokenizer-bpe-without-json", [*GENERATE, "{bpe_without_json_ckpt}"], "tokenizer state"),
    bad("ckpt-tokenizer-not-a-dict", [*GENERATE, "{tokenizer_not_a_dict_ckpt}"], "tokenizer state"),
    bad("ckpt-tokenizer-name-not-text", [*GENERATE, "{tiktoken_name_list_ckpt}"], "tokenizer state"),
    bad("ckpt-tokenizer-not-a-dict-resume", [*FIT, "--ckpt_path", "{tokenizer_not_a_dict_ckpt}"], "tokenizer state"),
    bad("tokenizer-json-outside-the-byte-alphabet", [*FIT, "--data.tokenizer", "{outside_alphabet_tokenizer}"],
        "no byte stands for"),
    bad("tokenizer-bare-name-of-a-folder", [*FIT, "--data.tokenizer", "{shadowing_folder}"], "write ./mytok"),
    # --- evaluate and guide: arguments checked before any model is loaded or notebook runs ---
    bad("evaluate-batch_size-negative", ["evaluate", "--ckpt_path", "{ckpt}", "--text", "{short_txt}", "--batch_size",
                                         "-1"], "--batch_size must be >= 1"),
    bad("evaluate-batch_size-zero", ["evaluate", "--ckpt_path", "{ckpt}", "--text", "{short_txt}", "--batch_size", "0"],
        "--batch_size must be >= 1"),
    bad("evaluate-limit-zero", ["evaluate", "--ckpt_path", "{ckpt}", "--text", "{short_txt}", "--limit", "0"],
        "--limit must be >= 1"),
    bad("evaluate-limit-negative", ["evaluate", "--ckpt_path", "{ckpt}", "--text", "{short_txt}", "--limit", "-1"],
        "--limit must be >= 1"),
    bad("evaluate-text-is-a-folder", ["evaluate", "--ckpt_path", "{ckpt}", "--text", "{empty_dir}"], "is a folder"),
    bad("evaluate-choices-missing", ["evaluate", "--ckpt_path", "{ckpt}", "--choices", "{case}/quiz.jsonl"],
        "does not exist"),
    bad("evaluate-nothing-asked", ["evaluate", "--ckpt_path", "{ckpt}"], "nothing to evaluate"),
    bad("guide-out-exists", ["guide", "--out", "{afile}"], "exists"),
    bad("guide-out-is-a-folder", ["guide", "--out", "{empty_dir}"], "is a folder"),
    bad("guide-out-in-a-missing-folder", ["guide", "--out", "{case}/nope/guide.pdf"], "does not exist"),
    bad("guide-out-unwritable", ["guide", "--out", "{unwritable_dir}/guide.pdf"], "cannot write"),
    bad("guide-chromium-not-executable", ["guide", "--out", "{case}/g.pdf", "--chromium", "{afile}"],
        "not an executable"),
    bad("guide-chromium-broken", ["guide", "--out", "{case}/g.pdf", "--chromium", "/bin/false"], "does not run"),
    # --- smaller ones (item 9 of issue 23) ---
    bad("generate-unwaitable-count", [*GENERATE, "{ckpt}", "--generation.max_new_tokens", str(10**12)],
        "--stream true"),
    bad("train-tokenizer-empty-corpus-names-its-flag", ["train-tokenizer", "--path", "{blank_txt}", "--out",
                                                        "{case}/tok"], "pass --path"),
    bad("train-tokenizer-corpus-is-a-folder", ["train-tokenizer", "--path", "{empty_dir}", "--out", "{case}/tok"],
        "is a folder"),
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
    bad("dtype-unknown", [*GENERATE, "{ckpt}", "--dtype", "float8"], "dtype"),
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


@pytest.fixture(scope="module")
def distributed_dir(trained_run, tmp_path_factory) -> Path:
    """The trained tiny checkpoint written once as a DCP folder, optimizer state included."""
    folder = tmp_path_factory.mktemp("distributed") / "last.ckpt"
    save_distributed(folder, torch.load(trained_run["ckpt"], map_location="cpu", weights_only=True))
    return folder


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
    assert len(CASES) >= 150
    assert {"fit", "predict", "validate", "generate", "export", "consolidate", "serve", "prepare", "evaluate", "guide",
            "train-tokenizer"} <= commands
    for attack in ("rank-local-fallback", "pickled-weight"):  # both DCP attacks through every command that reads one
        assert {f"hostile-dcp-{attack}-{command}" for command in READS_A_CHECKPOINT} <= {param.id for param in CASES}


def test_a_genuine_distributed_checkpoint_loads_and_consolidates(trained_run, distributed_dir, tmp_path, capsys):
    """The safe reader refuses hostile folders, not real ones: a DCP folder gives the same model as its .ckpt, and
    consolidates to the same optimizer state (its pickled settings read weights-only)."""
    from project.formats.checkpoint import load_checkpoint

    code, err, out = run_main(capsys, "consolidate", "--ckpt_path", str(distributed_dir), "--out",
                              str(tmp_path / "one.ckpt"), stdout=True)
    assert code == 0, err
    assert out.startswith(f"consolidated {distributed_dir} into {tmp_path / 'one.ckpt'} (")  # says what it wrote
    idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = load_checkpoint(trained_run["ckpt"]).model(idx)
    with torch.no_grad():
        for path in (distributed_dir, tmp_path / "one.ckpt"):
            torch.testing.assert_close(load_checkpoint(path).model(idx), reference)
    original = torch.load(trained_run["ckpt"], weights_only=True)["optimizer_states"][0]
    consolidated = torch.load(tmp_path / "one.ckpt", weights_only=True)["optimizer_states"][0]
    assert [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in original["param_groups"]] == \
        consolidated["param_groups"]
    assert original["state"].keys() == consolidated["state"].keys()
    for position, state in original["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(consolidated["state"][position][key], value, atol=0, rtol=0)


def test_predict_validate_and_fit_read_a_distributed_checkpoint_folder(trained_run, distributed_dir, tmp_path,
                                                                       capsys, monkeypatch):
    """Item 6 of issue 23: a DCP folder works wherever a .ckpt does, on one device: predict takes its tokenizer
    (no corpus, no download), validate reads its weights, fit resumes its training (optimizer included)."""
    monkeypatch.chdir(tmp_path)
    no_data = ["--data.data_dir", str(tmp_path / "no-data-here")]
    code, err = run_main(capsys, *PREDICT, "--ckpt_path", str(distributed_dir), *no_data, "--data.prompts",
                         '["ROMEO:"]', "--model.generation.max_new_tokens", "4")
    assert code == 0, err[-3000:]
    assert not (tmp_path / "no-data-here").exists()
    data = ["--data.data_dir", str(trained_run["root"] / "data"), "--samples.max_new_tokens", "0"]
    code, err = run_main(capsys, "validate", "--config", DEBUG, "--ckpt_path", str(distributed_dir), *data,
                         "--trainer.limit_val_batches", "1")
    assert code == 0, err[-3000:]
    code, err = run_main(capsys, *FIT, "--ckpt_path", str(distributed_dir), *data, "--trainer.max_steps", "42",
                         "--trainer.limit_val_batches", "1")
    assert code == 0, err[-3000:]
    resumed = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert resumed["global_step"] == 42
    assert all(int(s["step"]) == 42 for s in resumed["optimizer_states"][0]["state"].values())


def test_resume_applies_what_may_change_and_records_it(trained_run, tmp_path, capsys, monkeypatch):
    """Item 2 of issue 23: a setting the checkpoint fixes is refused (the table); one that may change is applied
    and recorded in the new checkpoints; one not given is the checkpoint's, even where a default differs."""
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "dropout.ckpt"
    torch.save(edited_checkpoint(trained_run, set_config(dropout=0.1)), checkpoint)
    data = ["--data.data_dir", str(trained_run["root"] / "data"), "--samples.max_new_tokens", "0",
            "--trainer.limit_val_batches", "1", "--trainer.max_steps", "41"]
    for flags, dropout in (([], 0.1), (["--model.config.dropout", "0.0"], 0.0), (["--model.config.dropout", "0.3"], 0.3)):
        code, err = run_main(capsys, *FIT, "--ckpt_path", str(checkpoint), *data, *flags)
        assert code == 0, err[-3000:]
        assert (f"--model.config.dropout {dropout} (the checkpoint's: 0.1)" in err) == bool(flags), err[-2000:]
        newest = max(tmp_path.glob("runs/gpt/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        assert torch.load(newest, weights_only=True)["hyper_parameters"]["config"]["dropout"] == dropout


def python_sources() -> dict[str, str]:
    """The project's own Python: the package, the benchmarks and the notebooks' code cells, by name."""
    sources = {str(p.relative_to(REPO)): p.read_text() for folder in ("project", "benchmarks")
               for p in (REPO / folder).rglob("*.py")}
    for notebook in (REPO / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        sources.update({f"{notebook.relative_to(REPO)}#{i}": "".join(cell["source"]) for i, cell in enumerate(cells)
                        if cell["cell_type"] == "code" and not "".join(cell["source"]).lstrip().startswith(("%", "!"))})
    return sources


def test_only_formats_dcp_reads_distributed_checkpoints():
    """Item 1 of issue 23, structurally: no code but project/formats/dcp.py calls dcp.load or builds a
    FileSystemReader (torch's consolidation helpers included), and no code anywhere loads with weights_only off
    or unpickles with pickle."""
    reads_dcp = re.compile(r"\bdcp\.load\b|FileSystemReader|format_utils|dcp_to_torch_save|state_dict_loader|"
                           r"distributed\.checkpoint import .*\bload\b")
    found, unpickles = set(), set()
    for name, source in python_sources().items():
        found |= {f"{name}:{n}: {line.strip()}" for n, line in enumerate(source.splitlines(), 1) if reads_dcp.search(line)}
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            loads = called.endswith("load") or called.endswith("load_checkpoint")
            unsafe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is not True
                         for k in node.keywords)
            if (loads and unsafe) or called in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                unpickles.add(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert {hit for hit in found if not hit.startswith("project/formats/dcp.py")} == set(), found
    assert any("dcp.load(state, storage_reader=CheckedMetadataReader" in hit for hit in found)  # the one call
    assert unpickles == set()


def test_dcp_reader_refuses_the_fallback_and_pickled_items_directly(request, tmp_path):
    """The reader itself (not only the CLI's check before it) refuses both attacks: Lightning's resume under
    ShardedStrategy calls it on every rank."""
    from project.formats.dcp import CheckedMetadataReader, load_dcp, read_dcp_state

    artifacts = Artifacts(tmp_path, request.getfixturevalue("trained_run"), request)
    for name in ("fallback_dcp", "pickled_weight_dcp", "pickled_setting_dcp"):
        with pytest.raises(ValueError, match="refusing"):
            read_dcp_state(artifacts[name])
    with pytest.raises(ValueError, match="refusing"):
        CheckedMetadataReader(artifacts["fallback_dcp"])
    weights = {"state_dict": {"model.wte.weight": torch.zeros(65, 32)}}
    with pytest.raises(ValueError, match="refusing"):
        load_dcp(weights, artifacts["pickled_weight_dcp"], no_dist=True)
    assert not (tmp_path / MARKER).exists()


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


def edit_record_dtype(cache: Path) -> None:
    """Change the token type in meta.json, keeping the record's checksum as it was."""
    record = cache / "meta.json"
    record.write_text(record.read_text().replace('"uint16"', '"uint32"'))


CORRUPTIONS = {  # what a crash, a full disk or a stray edit leaves in a token cache
    "tokens-truncated": lambda cache: cut_in_half(token_files(cache)[0]),
    "meta-dtype-edited": edit_record_dtype,
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


def test_a_parse_error_is_one_usage_line_and_the_error(capsys, tmp_path, monkeypatch):
    """Item 9 of issue 23: a mistyped flag used to print every option of fit (126 lines) before the error."""
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, *FIT, "--model.config.n_layers", "3")
    assert code == 2
    assert err.strip().splitlines()[0] == "usage: python -m project [options] fit [options]", err
    assert len(err.strip().splitlines()) <= 3 and err.strip().splitlines()[-1].startswith("error: "), err


class SendsSigterm(Callback):
    """Sends this process SIGTERM after the training step `at_step`, as a scheduler ending a job does."""

    def __init__(self, at_step: int = 2) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_checkpoint_and_exits_143(trained_run, tmp_path, capsys, monkeypatch):
    """Item 9 of issue 23: a SIGTERM'd fit exited 0, as if it had finished."""
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, *FIT, "--data.data_dir", str(trained_run["root"] / "data"), "--samples.max_new_tokens",
                         "0", "--trainer.callbacks+=test_bad_inputs.SendsSigterm")
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM at step 2" in err and "Traceback" not in err, err[-3000:]
    assert torch.load(tmp_path / "runs/gpt/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


def test_outputs_are_readable_like_any_file_the_user_writes(trained_run, tmp_path, capsys):
    """Item 9 of issue 23: exports and trained tokenizers came out 0600/0700 where other outputs are 0644/0755."""
    umask = os.umask(0)
    os.umask(umask)
    outputs = {"hf": ["export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(tmp_path / "hf")],
               "tok": ["train-tokenizer", "--path", str(shakespeare_sample(tmp_path)), "--vocab_size", "260", "--out",
                       str(tmp_path / "tok")]}
    for name, args in outputs.items():
        code, err = run_main(capsys, *args)
        assert code == 0, err[-3000:]
    for path in [tmp_path / "hf", tmp_path / "tok", *(tmp_path / "hf").iterdir(), *(tmp_path / "tok").iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


def shakespeare_sample(folder: Path) -> Path:
    path = folder / "sample.txt"
    path.write_text(SHAKESPEARE.read_text()[:5000])
    return path


def test_runs_started_together_take_different_versions(tmp_path):
    """Item 7 of issue 23: two fits started at once in one folder both chose version_0, and one died."""
    from concurrent.futures import ThreadPoolExecutor

    from project.training.run_folder import claim_next_version

    (tmp_path / "runs" / "gpt" / "version_3").mkdir(parents=True)
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: claim_next_version(tmp_path / "runs" / "gpt"), range(8)))
    assert sorted(int(p.name.removeprefix("version_")) for p in claimed) == list(range(4, 12))


def test_a_resume_clears_what_a_killed_run_left(trained_run, tmp_path, capsys, monkeypatch):
    """Item 8 of issue 23: kill -9 during saves left `.last.ckpt.PID.tmp` files forever, and a best checkpoint the
    resumed run's ModelCheckpoint does not know beside the one it does (save_top_k 1)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "gpt" / "version_0"
    shutil.copytree(trained_run["run_dir"], run)
    checkpoints = run / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    old, new = str(trained_run["run_dir"] / "checkpoints"), str(checkpoints)
    for key, state in last["callbacks"].items():
        if key.startswith("ModelCheckpoint"):  # as if the run had been trained here
            for name in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                state[name] = state[name].replace(old, new)
            state["best_k_models"] = {path.replace(old, new): score for path, score in state["best_k_models"].items()}
    torch.save(last, checkpoints / "last.ckpt")
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    for name in ("last.ckpt", "best-step20.ckpt"):
        (checkpoints / f".{name}.{dead}.tmp").write_bytes(b"half a checkpoint")
    (checkpoints / f".last.ckpt.{os.getppid()}.tmp").write_bytes(b"a live writer's")  # a running process: kept
    tracked = [p.name for p in checkpoints.glob("best-step*.ckpt")]
    shutil.copy(checkpoints / tracked[0], checkpoints / "best-step99.ckpt")  # saved after last.ckpt, then killed
    code, err = run_main(capsys, *FIT, "--data.data_dir", str(trained_run["root"] / "data"), "--ckpt_path", "last",
                         "--trainer.max_steps", "41", "--samples.max_new_tokens", "0", "--trainer.limit_val_batches", "1")
    assert code == 0, err[-3000:]
    left = sorted(p.name for p in checkpoints.iterdir())
    assert left == sorted(["last.ckpt", *tracked, f".last.ckpt.{os.getppid()}.tmp"]), left
    assert "best-step99.ckpt, left by a run that was killed" in err


def test_a_folder_named_like_a_tokenizer_never_shadows_it(tmp_path, monkeypatch):
    """Item 9 of issue 23: a gpt2/ folder in the working directory was read instead of the GPT-2 tokenizer."""
    from project.tokenizer import TiktokenTokenizer, build_tokenizer, spec_kind

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "tokenizer.json").write_text("{}")
    assert isinstance(build_tokenizer("gpt2"), TiktokenTokenizer) and spec_kind("gpt2") == "tiktoken"
    assert spec_kind("./gpt2") == "bpe"
