"""Evaluation with lm-evaluation-harness (project/evaluate.py), offline, on the session's tiny character model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import free_port, run_cli, run_main

pytest.importorskip("lm_eval")

from lightning.pytorch import Trainer  # noqa: E402

from project.data.corpus import Split  # noqa: E402
from project.data.datamodule import TextDataModule  # noqa: E402
from project.formats.checkpoint import load_model, read_checkpoint  # noqa: E402
from project.evaluate import (HarnessLM, check_hub_reachable, evaluate, read_choices, read_text,  # noqa: E402
                              scored_text)
from project.training.module import VAL_BPB, GPTModule  # noqa: E402



@pytest.fixture(scope="module")
def val_bpb(trained_run) -> float:
    """GPTModule's own val/bpb over every non-overlapping validation window (the training capped them at 32)."""
    data = TextDataModule(data_dir=str(trained_run["root"] / "data"), tokenizer="char", block_size=32, batch_size=256,
                          max_val_windows=None)
    module = GPTModule(config=read_checkpoint(trained_run["ckpt"])["hyper_parameters"]["config"])
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    (metrics,) = trainer.validate(module, datamodule=data, ckpt_path=str(trained_run["ckpt"]), verbose=False)
    return float(metrics[VAL_BPB])


def test_bits_per_byte_agrees_with_val_bpb(loaded, val_bpb, shakespeare_path, tmp_path):
    """The harness scores each validation window exactly as val/bpb does; over the whole split only windowing differs.

    TinyShakespeare is ASCII, so a byte is a character is a token. `EvalWindows` cuts the n validation characters
    into W = n // (B + 1) non-overlapping windows of B + 1 (block_size B), the first character of each being
    context only: val/bpb averages W * B scored characters. Given one window as its own text, the harness's
    rolling log-likelihood scores the same B characters with the same contexts. Given the whole split as one text,
    its rolling windows overlap by one character, so it also scores those W first characters (with one character
    of context) and the tail that fills no window, and divides by all n bytes.
    """
    text = shakespeare_path.read_text(encoding="utf-8")
    val = Split().cut(text)["val"]  # the split the training validated on (the default)
    block = loaded.model.config.block_size
    count = len(val) // (block + 1)
    windows = [val[i * (block + 1) : (i + 1) * (block + 1)] for i in range(count)]

    lm = HarnessLM(loaded.model, loaded.tokenizer)
    nats = -sum(lm.loglikelihood_rolling([SimpleNamespace(args=(window,)) for window in windows]))
    assert nats / math.log(2) / (count * block) == pytest.approx(val_bpb, rel=1e-5)

    whole = tmp_path / "val.txt"
    whole.write_text(val, encoding="utf-8")
    metrics = evaluate(loaded.model, loaded.tokenizer, text=whole)["project_text"]
    # the extra characters are count + tail of n (about 1 / (B + 1)); each costs at most a few bits more or less
    extra = (len(val) - 1 - count * block) / len(val)
    assert abs(metrics["bits_per_byte"] - val_bpb) < extra * 4
    assert metrics["byte_perplexity"] == pytest.approx(2 ** metrics["bits_per_byte"], rel=1e-6)
    assert metrics["word_perplexity"] > metrics["byte_perplexity"]  # a word is several bytes


def direct_loglikelihood(loaded, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward pass of our model, without the harness."""
    ids = loaded.tokenizer.encode(context + continuation)
    n = len(continuation)  # a character model: one token a character
    with torch.no_grad():
        logprobs = loaded.model(torch.tensor([ids[:-1]])).log_softmax(-1)[0, -n:]
    return float(logprobs.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())


def test_multiple_choice_accuracy_follows_the_model_likelihoods(loaded, tmp_path):
    questions = [("ROMEO:\nBut soft", ["light", "xqzjv", "the m"]), ("JULIET:\nO Romeo", [", Rom", "zzzzz"]),
                 ("First Citizen:\nWe", [" are ", "QQQQQ"]), ("KING:\nMy lord", [", and", "kkkkk", "hear "])]
    rows = []
    for number, (question, choices) in enumerate(questions):
        scores = [direct_loglikelihood(loaded, question, " " + choice) for choice in choices]  # " ": the delimiter
        best = max(range(len(choices)), key=scores.__getitem__)
        worst = min(range(len(choices)), key=scores.__getitem__)
        assert scores[best] > scores[worst]
        rows.append({"question": question, "choices": choices, "answer": best if number < 2 else worst})
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = evaluate(loaded.model, loaded.tokenizer, choices=path)["project_choices"]
    # right where the answer is the likeliest choice, wrong where it is the least likely; choices have equal
    # lengths, so normalising by length changes nothing
    assert metrics == {"acc": 0.5, "acc_norm": 0.5}


def test_scores_match_a_direct_forward_pass(loaded):
    lm = HarnessLM(loaded.model, loaded.tokenizer, batch_size=2)
    pairs = [("ROMEO:\nBut", " soft"), ("JULIET:", "\nO"), ("KING:\nMy lord, w", "e")]
    encoded = [(loaded.tokenizer.encode(c), loaded.tokenizer.encode(x)) for c, x in pairs]
    for (logprob, _), (context, continuation) in zip(lm.score(encoded), pairs):
        assert logprob == pytest.approx(direct_loglikelihood(loaded, context, continuation), abs=1e-4)
    long_context = loaded.tokenizer.encode("ROMEO: " * 10)  # 70 tokens: only the last block_size are seen
    (logprob, _), = lm.score([(long_context, loaded.tokenizer.encode("A"))])
    assert logprob == pytest.approx(direct_loglikelihood(loaded, ("ROMEO: " * 10)[-32:], "A"), abs=1e-4)


def test_a_bpe_text_is_conditioned_on_end_of_text():
    """With an end-of-text token, every token of the text is scored, the first one given <|endoftext|>."""
    from lm_eval.api.instance import Instance

    from project.model import GPT, GPTConfig
    from project.tokenizer import TiktokenTokenizer

    tokenizer = TiktokenTokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    ids = tokenizer.encode(text)
    assert len(ids) < 32  # one window
    with torch.no_grad():
        logprobs = model(torch.tensor([[tokenizer.eot_id] + ids[:-1]])).log_softmax(-1)[0]
    expected = float(logprobs.gather(-1, torch.tensor(ids)[:, None]).sum())
    (total,) = HarnessLM(model, tokenizer).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert total == pytest.approx(expected, abs=1e-4)


def test_generation_requests_are_greedy_and_cut_at_stops(loaded):
    from lm_eval.api.instance import Instance

    from project.generate import GenerationSettings, stream

    lm = HarnessLM(loaded.model, loaded.tokenizer)
    greedy = "".join(stream(loaded.model, loaded.tokenizer, "ROMEO:", GenerationSettings(max_new_tokens=12,
                                                                                        temperature=0)))
    stop = greedy[6:8]
    requests = [Instance("generate_until", {}, ("ROMEO:", {"until": [], "max_gen_toks": 12}), 0),
                Instance("generate_until", {}, ("ROMEO:", {"until": [stop], "max_gen_toks": 12}), 1)]
    assert lm.generate_until(requests) == [greedy, greedy[: greedy.index(stop)]]


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1 is not JSON"),
    ('{"question": "Q", "choices": ["a"], "answer": 0}', "at least 2 non-empty strings"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": 2}', "answer must be the index"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": true}', "answer must be the index"),
    ('{"choices": ["a", "b"], "answer": 0}', '"question": str'),
])
def test_bad_choices_files_are_named_by_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_choices(path)


def test_bad_text_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")


def test_unreachable_hub_is_reported_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConnectionError, match="cannot reach 127.0.0.1 .* HF_HUB_OFFLINE=1"):
        check_hub_reachable()


@pytest.mark.slow  # the harness indexes its ~15,000 task configs before it knows a task's dataset
def test_standard_task_offline_fails_in_one_line(trained_run, tmp_path):
    result = run_cli("evaluate", "--ckpt_path", str(trained_run["ckpt"]), "--tasks", "hellaswag", cwd=tmp_path,
                     timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "hellaswag" in last.lower() and "--text" in last, last
    assert "Traceback" not in result.stderr
    unknown = run_cli("evaluate", "--ckpt_path", str(trained_run["ckpt"]), "--tasks", "no_such_task", cwd=tmp_path,
                      timeout=300)
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].startswith("error: unknown lm-eval task(s) no_such_task")


def test_evaluate_warns_about_training_text_and_scores_the_held_out_part(trained_run, shakespeare_path, tmp_path,
                                                                         capsys):
    """The checkpoint's fingerprint of its training text: an excerpt of it is flagged; `--part test` of the very
    corpus is not, and is exactly the test split the training held out."""
    text = shakespeare_path.read_text(encoding="utf-8")
    seen = tmp_path / "seen.txt"
    seen.write_text(text[:4000], encoding="utf-8")
    ckpt = str(trained_run["ckpt"])
    code, err, out = run_main(capsys, "evaluate", "--ckpt_path", ckpt, "--text", str(seen), stdout=True)
    assert code == 0, err[-2000:]
    assert f"warning: 100% of the lines of {seen} are in the model's training text" in err and "--part test" in err
    assert "scoring windows of 32 tokens" in err  # progress over the windows
    lines = out.splitlines()
    assert lines[0].startswith(f"evaluate: {ckpt} (0.03 M parameters, characters (65 symbols), context 32 tokens)")
    assert lines[1].split() == ["scored", "metric", "value"]
    assert {line.split()[1] for line in lines[2:]} == {"bits_per_byte", "byte_perplexity", "word_perplexity"}

    code, err, out = run_main(capsys, "evaluate", "--ckpt_path", ckpt, "--text", str(shakespeare_path),
                              "--part", "test", stdout=True)
    assert code == 0, err[-2000:]
    assert "warning" not in err and f"{shakespeare_path}, its test part" in out
    assert scored_text(shakespeare_path, "test", Split()) == Split().cut(text)["test"]


def test_overlap_is_the_share_of_long_lines_seen(shakespeare_path):
    from project.data.overlap import line_fingerprint, overlap

    parts = Split().cut(shakespeare_path.read_text(encoding="utf-8"))
    fingerprint = line_fingerprint(parts["train"])
    assert overlap(parts["train"], fingerprint).share == 1.0
    assert overlap(parts["test"], fingerprint).share < 0.01  # recurring short lines ("ROMEO:") are not counted
    whole = overlap(parts["train"] + parts["val"] + parts["test"], fingerprint)
    assert 0.85 < whole.share < 0.95 and whole.compared > 20_000
