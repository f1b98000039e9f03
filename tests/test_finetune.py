"""Fine-tuning: the data (your files, checked by line; the TinyShakespeare sets), the module (response-only loss,
classification from the last token, frozen weights), and `python -m project finetune` end to end: adapters-only
checkpoints, resume, predict, generate --chat, the API and the page through the template, merge-lora, and the
exports (transformers with its chat_template, PEFT adapters)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import project.generate
from conftest import LLAMA_STYLE, run_main, scalars, tiny_gpt
from project.chat import IGNORE_INDEX, TEMPLATES
from project.data.finetune import FineTuneDataModule, classification_batch, instruction_batch, read_records
from project.data.shakespeare_tasks import build_finetune_data
from project.formats.checkpoint import load_checkpoint, load_model
from project.generate import GenerationSettings, generate
from project.lora import lora_layers
from project.tokenizer import train_bpe

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
LORA = '{"r": 2, "alpha": 4, "targets": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj"]}'


@pytest.fixture(scope="module")
def bpe(shakespeare_path):
    return train_bpe(shakespeare_path.read_text()[:100_000], 400)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, bpe) -> dict[str, Path]:
    """Tiny pretrained-looking bases as transformers folders: GPT-2 style and Llama style (grouped-query)."""
    from project.formats.hf import export_hf

    root = tmp_path_factory.mktemp("bases")
    recipes = {"gpt2": {}, "llama": dict(LLAMA_STYLE, n_kv_head=2)}
    for name, recipe in recipes.items():
        export_hf(tiny_gpt(bpe.vocab_size, spread=0.05, block_size=128, **recipe), bpe, root / name)
    return {name: root / name for name in recipes}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, shakespeare_path) -> Path:
    out = tmp_path_factory.mktemp("tasks") / "finetune"
    build_finetune_data(out=str(out), path=str(shakespeare_path))
    return out


def finetune(capsys, root: Path, *args: str) -> str:
    """`python -m project finetune ...` in this process, its runs under `root`; its stderr."""
    code, err = run_main(capsys, "finetune", *args, "--trainer.default_root_dir", str(root), *QUIET)
    assert code == 0, err[-3000:]
    return err


def instruct_args(tasks: Path, base: Path, *extra: str) -> list[str]:
    return ["fit", "--model.init_from", str(base), "--model.template", "instruct",
            "--data.train_path", str(tasks / "instruct" / "train.jsonl"),
            "--data.val_path", str(tasks / "instruct" / "val.jsonl"), "--data.batch_size", "4",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2", *extra]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- the TinyShakespeare sets -----------------------------------------------------------------------------------


def test_shakespeare_sets_are_fixed_disjoint_and_offline(tasks, shakespeare_path, tmp_path):
    again = tmp_path / "again"
    build_finetune_data(out=str(again), path=str(shakespeare_path))
    files = sorted(p.relative_to(tasks) for p in tasks.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((tasks / f).read_bytes() == (again / f).read_bytes() for f in files)  # byte for byte
    meta = json.loads((tasks / "meta.json").read_text())
    speeches = {}
    for split in ("train", "val", "test"):
        with open(tasks / "speakers" / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == meta["counts"]["speakers"][split]
        assert {r["label"] for r in rows} == set(meta["speakers"])  # every speaker in every split
        speeches[split] = {r["text"] for r in rows}
        records = read_records(tasks / "instruct" / f"{split}.jsonl", "instruct")
        assert len(records) == meta["counts"]["instruct"][split]
    assert not speeches["train"] & speeches["val"] and not speeches["train"] & speeches["test"]
    pretrain = {block.strip("\n").partition("\n")[2] for block in (tasks / "pretrain.txt").read_text().split("\n\n")}
    assert not pretrain & (speeches["val"] | speeches["test"]) and speeches["train"] <= pretrain


# --- your own files: every bad record is one line naming it --------------------------------------------------------

BAD_RECORDS = [  # (task, file name, lines, the error it must name)
    ("instruct", "a.jsonl", ['{"instruction": "x", "output": "y"}', "{not json"], r"a.jsonl:2: not valid JSON"),
    ("instruct", "a.jsonl", ['{"instruction": "x"}'], r"a.jsonl:1: missing field 'output'"),
    ("instruct", "a.jsonl", ['', '{"instruction": "x", "output": ""}'], r"a.jsonl:2: empty field 'output'"),
    ("instruct", "a.jsonl", ['{"instruction": 3, "output": "y"}'], r"a.jsonl:1: field 'instruction' must be a string"),
    ("instruct", "a.jsonl", ['["x"]'], r"a.jsonl:1: expected a JSON object"),
    ("instruct", "a.jsonl", ['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                             '{"instruction": "x", "output": "y"}'], r"a.jsonl:2: .* use one shape"),
    ("instruct", "a.jsonl", ['{"messages": [{"role": "robot", "content": "x"}]}'], r"a.jsonl:1: message 0 has role 'robot'"),
    ("instruct", "a.jsonl", ['{"messages": [{"role": "user", "content": "x"}]}'],
     r"a.jsonl:1: the last message must be the assistant's reply"),
    ("instruct", "a.jsonl", ['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}'],
     r"a.jsonl:1: an assistant message has empty content"),
    ("instruct", "a.txt", ["x"], r"a.txt: unknown file type .txt"),
    ("classify", "a.csv", ["text,label", ",B"], r"a.csv:2: empty field 'text'"),
    ("classify", "a.csv", ["text,label", "fine,A", "alone"], r"a.csv:3: this row has fewer fields"),
    ("classify", "a.csv", ["text,label", '"two\nlines",A', "x,"], r"a.csv:4: missing label 'label'"),
    ("classify", "a.jsonl", ['{"text": "x", "label": [1]}'], r"a.jsonl:1: label 'label' must be a string or a whole"),
]


@pytest.mark.parametrize("task, name, lines, message", BAD_RECORDS)
def test_bad_records_name_their_line(task, name, lines, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        read_records(write_lines(tmp_path / name, lines), task)


def test_a_label_seen_only_in_validation_names_its_line(tmp_path):
    data = FineTuneDataModule()
    data.paths.update(train=str(tmp_path / "train.csv"), val=str(tmp_path / "val.csv"))
    data.records["train"] = read_records(write_lines(tmp_path / "train.csv", ["text,label", "a,X", "b,Y"]), "classify")
    data.records["val"] = read_records(write_lines(tmp_path / "val.csv", ["text,label", "c,X", "d,Z"]), "classify")
    with pytest.raises(ValueError, match=r"val.csv:3: label 'Z' does not occur in the training data \(classes: X, Y\)"):
        data.setup_classes(None)


def test_predict_files_may_omit_answers_and_keep_their_fields(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"instruction": "Say hi", "id": 7}'])
    [record] = read_records(path, "instruct", labelled=False)
    assert record.messages == [{"role": "user", "content": "Say hi"}] and record.source["id"] == 7
    chat = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "the reference"}]}'
    [record] = read_records(write_lines(tmp_path / "c.jsonl", [chat]), "instruct", labelled=False)
    assert record.messages == [{"role": "user", "content": "x"}]  # the model answers the user; the reply stays in source


# --- batches and the module --------------------------------------------------------------------------------------


def test_instruction_batches_pad_right_and_learn_responses_only(bpe):
    from project.data.finetune import Example

    template = TEMPLATES["instruct"]
    examples = [Example(*template.encode(template.record_messages("Who?", "", answer), bpe)) for answer in ("A", "Bbb bb")]
    x, y = instruction_batch(examples, pad_id=bpe.eot_id)
    longest = max(len(e.ids) for e in examples)
    assert x.shape == y.shape == (2, longest - 1)
    for row, example in enumerate(examples):
        n = len(example.ids) - 1
        assert x[row, :n].tolist() == example.ids[:-1] and y[row, :n].tolist() == example.labels[1:]
        assert (y[row, n:] == IGNORE_INDEX).all() and (x[row, n:] == bpe.eot_id).all()
    # the targets learned are each answer's tokens and its end-of-text
    assert [t for t in y[0].tolist() if t != IGNORE_INDEX] == bpe.encode("A") + [bpe.eot_id]


@pytest.fixture
def module(bases):
    from project.training.finetune import FineTuneModule

    module = FineTuneModule(task="instruct", init_from=str(bases["gpt2"]), template="instruct")
    module.configure_model()  # the base's weights into the meta-device GPT (the Trainer calls it)
    return module


def test_validation_loss_is_the_mean_over_response_tokens(module, bpe):
    from project.data.finetune import Example

    template = module.template
    examples = [Example(*template.encode(template.record_messages(q, "", a), bpe))
                for q, a in (("Who?", "ROMEO"), ("Continue: O", "Romeo, Romeo, wherefore"))]
    x, y = instruction_batch(examples, pad_id=bpe.eot_id)
    module.eval()
    with torch.no_grad():
        module.validation_step((x, y), 0)
        logits = module.model(x)
    by_hand = [F.cross_entropy(logits[i][y[i] != IGNORE_INDEX], y[i][y[i] != IGNORE_INDEX], reduction="sum")
               for i in range(2)]
    responses = int((y != IGNORE_INDEX).sum())
    assert module.eval_loss.compute().item() == pytest.approx(sum(by_hand).item() / responses, rel=1e-5)
    assert module.eval_ppl.compute().item() == pytest.approx(math.exp(sum(by_hand).item() / responses), rel=1e-4)


def test_classifier_reads_the_last_real_token_whatever_the_padding(bases, bpe):
    from project.data.finetune import Example
    from project.training.finetune import FineTuneModule

    module = FineTuneModule(task="classify", init_from=str(bases["llama"]), classes=["A", "B", "C"]).eval()
    module.configure_model()
    texts = ["O Romeo", "Wherefore art thou, Romeo? Deny thy father"]
    alone = [module.class_logits(*classification_batch([Example(bpe.encode(t))], 0)[:2]) for t in texts]
    together = module.class_logits(*classification_batch([Example(bpe.encode(t)) for t in texts], 0)[:2])
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_training_only_the_last_block_leaves_the_others_as_they_were(bases):
    from project.training.finetune import FineTuneModule

    module = FineTuneModule(task="classify", init_from=str(bases["gpt2"]), classes=["A", "B"], train_last_blocks=1)
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in module.named_parameters()
                       if name.startswith(("model.blocks.1.", "model.norm.", "head."))}
    head_only = FineTuneModule(task="classify", init_from=str(bases["gpt2"]), classes=["A", "B"], train_last_blocks=0)
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {"model.norm.weight", "model.norm.bias",
                                                                                "head.weight"}


# --- the command line, end to end ---------------------------------------------------------------------------------


def test_lora_instruction_tuning_end_to_end(capsys, monkeypatch, bases, tasks, tmp_path, bpe):
    err = finetune(capsys, tmp_path, *instruct_args(tasks, bases["gpt2"], "--model.lora", LORA))
    trainable = 2 * 4 * 2 * (32 + 32)  # blocks x layers x r (in + out)
    assert f"fine-tuning (instruct, LoRA adapters): {trainable:,} trainable parameters" in err
    assert "longer than the context (129 tokens)" in err  # skipped and counted, with their lines
    run = tmp_path / "runs" / "finetune" / "version_0"
    assert "val/loss" in scalars(run) and "val/ppl" in scalars(run)
    ckpt = run / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)
    assert set(stored["state_dict"]) == {f"model.{k}.lora_{m}" for k in lora_layers(
        load_checkpoint(ckpt, merge=False).model) for m in "AB"}  # the adapters alone
    base_bytes = (bases["gpt2"] / "model.safetensors").stat().st_size
    assert sum(t.numel() * t.element_size() for t in stored["state_dict"].values()) < 0.1 * base_bytes
    assert stored["hyper_parameters"]["template"] == TEMPLATES["instruct"].to_dict()

    # resume: the run continues in its folder, from step 4 to 6
    finetune(capsys, tmp_path, *instruct_args(tasks, bases["gpt2"], "--model.lora", LORA)[:-6], "--ckpt_path", "last",
             "--trainer.max_steps", "6", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6

    # generate --chat answers through the template, as the library does from the template's ids
    loaded = load_model(ckpt)
    ids, _ = loaded.template.encode([{"role": "user", "content": "Which character speaks these lines?"}], bpe,
                                    add_generation_prompt=True)
    out = generate(loaded.model, torch.tensor([ids]), GenerationSettings(max_new_tokens=8, temperature=0), tokenizer=bpe)
    answer = out[0, len(ids):].tolist()
    answer = bpe.decode(answer[: answer.index(bpe.eot_id)] if bpe.eot_id in answer else answer)
    prompts = []  # what generate --chat hands the sampler: the template's ids
    real_stream = project.generate.stream
    monkeypatch.setattr(project.generate, "stream", lambda m, t, prompt, s, **kwargs: prompts.append(prompt) or
                        real_stream(m, t, prompt, s, **kwargs))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code, _ = run_main(capsys, "generate", "--ckpt_path", str(ckpt), "--chat", "true", "--prompt",
                           "Which character speaks these lines?", "--generation.max_new_tokens", "8",
                           "--generation.temperature", "0")
    assert code == 0 and prompts == [ids] and printed.getvalue() == answer + "\n"

    # merge-lora: one self-contained checkpoint with the same logits
    code, _ = run_main(capsys, "merge-lora", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged.ckpt"))
    assert code == 0
    merged = load_model(tmp_path / "merged.ckpt")
    idx = torch.randint(bpe.vocab_size, (2, 20))
    torch.testing.assert_close(merged.model(idx), loaded.model(idx))
    assert merged.template == loaded.template

    # the transformers export carries the chat template inside tokenizer_config.json
    code, _ = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf"))
    assert code == 0 and not (tmp_path / "hf" / "chat_template.jinja").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == loaded.template.jinja(bpe.eot_text)
    messages = [{"role": "user", "content": "Continue this speech by ROMEO."}]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(
        messages, add_generation_prompt=True)["input_ids"] == loaded.template.encode(messages, bpe, True)[0]
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(idx).logits
    assert (hf_logits - loaded.model(idx)).abs().max() < 1e-4
    assert load_model(tmp_path / "hf").template == loaded.template

    # PEFT: the adapters alone, on the base's transformers folder, give the project's logits
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[finetune]')")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code, _ = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "adapter"),
                           "--format", "peft")
    assert code == 0 and str(bases["gpt2"]) in printed.getvalue()  # where the base is, for PEFT
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["gpt2"]), tmp_path / "adapter")
    with torch.no_grad():
        assert (peft_model(idx).logits - loaded.model(idx)).abs().max() < 1e-4

    # predict answers a file's instructions, keeping their fields
    records = tmp_path / "ask.jsonl"
    write_lines(records, ['{"instruction": "Which character speaks these lines?", "input": "O Romeo", "id": 1}'])
    finetune(capsys, tmp_path, "predict", "--ckpt_path", str(ckpt), "--data.predict_path", str(records),
             "--model.generation.max_new_tokens", "8", "--predictions.output_path", str(tmp_path / "answers.jsonl"))
    [answer] = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answer["id"] == 1 and answer["prompt"].endswith(TEMPLATES["instruct"].assistant_prefix)
    assert answer["settings"]["temperature"] == 0

    # the base must stay as it was: a changed one is refused by name
    (bases["gpt2"] / "generation_config.json").write_text("{}")
    try:
        with pytest.raises(ValueError, match="changed since the adapters were trained"):
            load_model(ckpt)
    finally:
        shutil.copy(tmp_path / "hf" / "generation_config.json", bases["gpt2"] / "generation_config.json")


@pytest.mark.parametrize("family, lora", [("gpt2", False), ("llama", True), ("llama", False)])
def test_full_and_lora_tuning_of_both_recipes_export_exactly(family, lora, capsys, bases, tasks, tmp_path):
    extra = ["--model.lora", LORA] if lora else []
    finetune(capsys, tmp_path, *instruct_args(tasks, bases[family], *extra, "--trainer.max_steps", "2"))
    ckpt = tmp_path / "runs" / "finetune" / "version_0" / "checkpoints" / "last.ckpt"
    loaded = load_model(ckpt)
    base = load_model(bases[family])
    idx = torch.randint(loaded.tokenizer.vocab_size, (1, 24))
    assert (loaded.model(idx) - base.model(idx)).abs().max() > 0  # it trained
    code, _ = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf"))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(idx).logits - loaded.model(idx)).abs().max() < 1e-4


def test_classification_end_to_end(capsys, trained_run, tasks, tmp_path):
    """A classifier on the character-level checkpoint of the session's training run (a .ckpt base)."""
    speakers = tasks / "speakers"
    finetune(capsys, tmp_path, "fit", "--model.task", "classify", "--model.init_from", str(trained_run["ckpt"]),
             "--model.train_last_blocks", "1", "--data.train_path", str(speakers / "train.csv"),
             "--data.val_path", str(speakers / "val.csv"), "--data.batch_size", "8", "--trainer.max_steps", "3",
             "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1")
    logged = scalars(tmp_path / "runs" / "finetune" / "version_0")
    assert "train/tokens_per_sec" in logged and "train/mfu" not in logged  # no FLOP count: no MFU of 0
    ckpt = tmp_path / "runs" / "finetune" / "version_0" / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)
    classes = json.loads((tasks / "meta.json").read_text())["speakers"]
    assert stored["hyper_parameters"]["classes"] == sorted(classes)
    base = torch.load(trained_run["ckpt"], weights_only=True)["state_dict"]
    for key in ("model.blocks.0.attn.q_proj.weight", "model.wte.weight"):  # frozen
        assert torch.equal(stored["state_dict"][key], base[key])
    assert not torch.equal(stored["state_dict"]["model.blocks.1.mlp.fc.weight"], base["model.blocks.1.mlp.fc.weight"])

    code, err, out = run_main(capsys, "finetune", "test", "--ckpt_path", str(ckpt), "--data.test_path",
                              str(speakers / "test.csv"), "--trainer.limit_test_batches", "2", *QUIET, stdout=True)
    assert code == 0, err[-3000:]
    tested = dict(re.findall(r"(test/\w+)\W+([\d.]+)", out))  # test prints its figures (it writes no run folder)
    assert 0 <= float(tested["test/acc"]) <= 1 and float(tested["test/loss"]) > 0

    out = tmp_path / "labels.jsonl"
    write_lines(tmp_path / "texts.csv", ["text", '"O Romeo, Romeo"', "Now is the winter of our discontent", "I go."])
    finetune(capsys, tmp_path, "predict", "--ckpt_path", str(ckpt), "--data.predict_path", str(tmp_path / "texts.csv"),
             "--predictions.output_path", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in rows] == [(2, "O Romeo, Romeo"), (4, "I go.")]  # line 3: too long
    for row in rows:
        assert row["label"] in classes and sum(row["probabilities"].values()) == pytest.approx(1.0)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)


# --- the template wherever the model answers ----------------------------------------------------------------------


@pytest.fixture
def chat_model(bpe):
    from project.formats.checkpoint import LoadedCheckpoint

    model = tiny_gpt(bpe.vocab_size, spread=0.1, block_size=128)
    return LoadedCheckpoint(model, bpe, Path("chat.ckpt"), template=TEMPLATES["instruct"])


def library_answer(loaded, messages: list[dict], max_new_tokens: int = 6) -> tuple[list[int], str]:
    ids, _ = loaded.template.encode(messages, loaded.tokenizer, add_generation_prompt=True)
    out = generate(loaded.model, torch.tensor([ids]), GenerationSettings(max_new_tokens=max_new_tokens, temperature=0),
                   tokenizer=loaded.tokenizer)
    tokens = out[0, len(ids):].tolist()
    eot = loaded.tokenizer.eot_id
    return ids, loaded.tokenizer.decode(tokens[: tokens.index(eot)] if eot in tokens else tokens)


@pytest.fixture
def chat_scheduler(chat_model):
    """The server's scheduler decoding on the chat model (what `serve` runs the page and the API through)."""
    from project.serve.scheduler import Scheduler

    scheduler = Scheduler(chat_model.model, slots=2).start()
    yield scheduler
    scheduler.close()


def test_chat_completions_use_the_checkpoints_template(chat_model, chat_scheduler):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from project.serve.openai_api import add_openai_routes

    client = TestClient(add_openai_routes(FastAPI(), chat_model, chat_scheduler))
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Who speaks?"},
                {"role": "assistant", "content": "ROMEO"}, {"role": "user", "content": "And now?"}]
    reply = client.post("/v1/chat/completions", json={"model": "gpt", "messages": messages, "temperature": 0,
                                                      "max_tokens": 6}).json()
    as_system = [{**messages[0], "role": "system"}, *messages[1:]]
    ids, answer = library_answer(chat_model, as_system)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == answer


def test_the_page_answers_instructions_through_the_template(chat_model, chat_scheduler):
    from project.serve.page import App

    async def collect():
        return [update async for update in App(chat_model, chat_scheduler).generate("Who speaks?", 6, 0.0, 0, 1.0, 1)]

    *_, (text, status) = asyncio.run(collect())
    assert status.startswith("done") and text == library_answer(chat_model, [{"role": "user", "content": "Who speaks?"}])[1]


# --- mistakes get one line ----------------------------------------------------------------------------------------


def test_bad_finetune_inputs_get_one_line(capsys, bases, tasks, trained_run, tmp_path):
    """The fine-tuning cases of the bad-input table (tests/test_bad_inputs.py has the rest)."""
    instruct = instruct_args(tasks, bases["gpt2"])
    cases = [
        (["finetune", "fit", "--data.train_path", "x.jsonl"], "starts from a base model: pass --model.init_from"),
        (["finetune", *instruct, "--model.lora", LORA, "--model.train_last_blocks", "1"], "choose one"),
        (["finetune", *instruct, "--model.optimizer.name", "muon"], "fine-tuning uses adamw"),
        (["finetune", *instruct, "--trainer.max_steps", "-1"], "set it, e.g. --trainer.max_steps"),
        (["finetune", *instruct[:2], str(trained_run["ckpt"]), *instruct[3:]], "needs a tokenizer with an end-of-text"),
        (["finetune", *instruct, "--model.lora", '{"targets": ["mlp.gate"]}'], "mlp.gate is not a layer of this model"),
        (["finetune", "fit", "--ckpt_path", str(trained_run["ckpt"])], "is not fine-tuned: fine-tune it with"),
        (["generate", "--ckpt_path", str(trained_run["ckpt"]), "--chat", "true"], "has no prompt template"),
        (["export", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(tmp_path / "x"), "--format", "peft"],
         "holds no LoRA adapters"),
        (["merge-lora", "--ckpt_path", str(trained_run["ckpt"]), "--out", str(tmp_path / "m.ckpt")],
         "holds no LoRA adapters"),
        (["finetune-data", "--out", str(tasks), "--path", str(tasks / "pretrain.txt")], "exists: choose another --out"),
    ]
    for args, message in cases:
        code, err = run_main(capsys, *args, "--trainer.default_root_dir", str(tmp_path)) if args[0] == "finetune" \
            else run_main(capsys, *args)
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert code == 1 and len(lines) == 1 and message in lines[0], (args, err[-2000:])
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "m.ckpt").exists()
