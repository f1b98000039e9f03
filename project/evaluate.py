"""Evaluate a model with EleutherAI's lm-evaluation-harness, on the model in memory.

    python -m project evaluate --ckpt_path CKPT --text valid.txt            bits per byte, word and byte perplexity
    python -m project evaluate --ckpt_path CKPT --choices quiz.jsonl        multiple-choice acc and acc_norm
    python -m project evaluate --ckpt_path CKPT --tasks hellaswag,arc_easy  the harness's own tasks (online)

`HarnessLM` adapts our GPT and tokenizer (characters or BPE) to the harness's model interface, so nothing is
exported and the harness's metrics and task machinery are used as they are. Local files become task configs
(YAML, `dataset_path: json`) written to a temporary folder:

- `--text FILE`: the whole UTF-8 file is one document scored with `loglikelihood_rolling`; the harness
  reports `bits_per_byte`, `byte_perplexity` and `word_perplexity` (words split on whitespace).
- `--choices FILE.jsonl`: one question per line, `{"question": str, "choices": [str, ...], "answer": int}`
  (`answer` indexes `choices`). Each choice is scored as the continuation of `question + " " + choice`;
  `acc` takes the most likely choice, `acc_norm` the most likely per byte of the choice.

Rolling windows. The text is cut into consecutive windows of `block_size` predicted tokens, as the harness's
Hugging Face model does (context_len 1: each window's first prediction sees the previous window's last token).
A vocabulary with an end-of-text token conditions the first token on it; a character vocabulary has none, so
its first character is context only and is not scored. The training's validation set (`EvalWindows`) instead
takes non-overlapping windows of block_size + 1 tokens whose first token is context only: a text holding one
such window is scored exactly alike; over a long text the harness also scores each window's first token
(with one token of context) and the tail that fills no window.
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from lm_eval.api.model import TemplateLM

from project.data.corpus import Split, TextPart
from project.generate import GenerationSettings, completion_text, generate
from project.model import GPT
from project.tokenizer import Tokenizer

TEXT_TASK = "project_text"
CHOICES_TASK = "project_choices"
TEXT_METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")
CHOICE_METRICS = ("acc", "acc_norm")
HUB_PROBE_TIMEOUT_S = 5.0  # a reachable Hub answers a TCP connect in well under this
Progress = Callable[[str, int, int], None]  # (what is being scored, done, total)


class HarnessLM(TemplateLM):
    """Our GPT as an lm-evaluation-harness model: log-likelihoods, rolling log-likelihoods and greedy generation.

    Args:
        model: the GPT, in eval mode on its device.
        tokenizer: the checkpoint's tokenizer.
        batch_size: sequences scored per forward pass.
        progress: called as sequences are scored, with (what, done, total).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 32,
                 progress: Progress | None = None) -> None:
        super().__init__()
        # not `self.tokenizer`: the harness reads that as a Hugging Face tokenizer (chat templates)
        self.model, self.project_tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.block_size = model.config.block_size
        self.model_device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int | None:
        return self.project_tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.project_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.project_tokenizer.decode(tokens)

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]], what: str = "continuations") -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether it is the greedy one) per (context, continuation).

        Each pair is scored in one forward pass over its last block_size tokens; sequences are padded on the
        right, which a causal model never attends to. Only the positions that predict a continuation token are
        normalised (a log-softmax over (scored positions, V), not over every position of the batch), and each
        batch is read back to the host once. `what` names them for the progress callback.
        """
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))  # similar lengths batch
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            inputs = []
            for i in rows:
                context, continuation = pairs[i]
                if not continuation:
                    continue
                if len(continuation) > self.block_size:
                    raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the model's context "
                                     f"({self.block_size})")
                inputs.append((i, (context + continuation)[-(self.block_size + 1) :][:-1], len(continuation)))
            if not inputs:
                continue
            width = max(len(ids) for _, ids, _ in inputs)
            idx = torch.zeros(len(inputs), width, dtype=torch.long)
            for row, (_, ids, _) in enumerate(inputs):
                idx[row, : len(ids)] = torch.tensor(ids)
            # the scored positions: row r, positions len(ids) - n ... len(ids) - 1, and the tokens they predict
            owner = torch.cat([torch.full((n,), row) for row, (_, _, n) in enumerate(inputs)])
            position = torch.cat([torch.arange(len(ids) - n, len(ids)) for _, ids, n in inputs])
            target = torch.cat([torch.tensor(pairs[i][1]) for i, _, _ in inputs])
            owner, position, target = (t.to(self.model_device) for t in (owner, position, target))
            logits = self.model(idx.to(self.model_device))[owner, position]  # (scored positions, V)
            logprob = logits.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
            totals = torch.zeros(len(inputs), device=self.model_device).index_add_(0, owner, logprob)
            misses = torch.zeros(len(inputs), dtype=torch.long, device=self.model_device).index_add_(
                0, owner, (logits.argmax(-1) != target).long())  # argmax of logits = argmax of log-probabilities
            for (i, _, _), total, missed in zip(inputs, totals.tolist(), misses.tolist()):
                results[i] = (total, missed == 0)
            if self.progress is not None:
                self.progress(what, min(start + self.batch_size, len(order)), len(order))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for _, context, continuation in requests:
            if None in context:  # an empty context and no end-of-text token to stand for it
                raise ValueError("an empty context needs an end-of-text token, which this vocabulary lacks")
            pairs.append((context, continuation))
        return self.score(pairs, "choices")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, summed over non-overlapping windows (see the module docstring)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for (text,) in (request.args for request in requests):
            ids = self.tok_encode(text)
            if self.eot_token_id is not None:
                prefix, predicted = self.eot_token_id, ids
            else:
                prefix, predicted = ids[0], ids[1:]
            windows = [make_disjoint_window(window) for window in
                       get_rolling_token_windows(predicted, prefix, max_seq_len=self.block_size, context_len=1)]
            totals.append(sum(logprob for logprob, _ in self.score(windows, f"windows of {self.block_size} tokens")))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (through project.generate), cut at the request's stop strings."""
        outputs = []
        for context, gen_kwargs in (request.args for request in requests):
            until = gen_kwargs.get("until") or []
            settings = GenerationSettings(max_new_tokens=int(gen_kwargs.get("max_gen_toks", 256)), temperature=0.0,
                                          stop=[until] if isinstance(until, str) else list(until))
            ids = self.tok_encode(context)[-self.block_size :] or [self.eot_token_id or 0]
            idx = torch.tensor([ids], dtype=torch.long, device=self.model_device)
            out = generate(self.model, idx, settings, tokenizer=self.project_tokenizer)
            outputs.append(completion_text(out[0, len(ids) :].tolist(), self.project_tokenizer, settings))
        return outputs


# --- local tasks ---------------------------------------------------------------------------------------------


def scored_text(path: str | Path, part: TextPart = "all", split: Split = Split()) -> str:
    """The text `--text PATH --part PART` scores: the whole file, or its train, val or test part cut by `split`
    (a checkpoint's own split, so `--part test` is text its training never saw when PATH is its corpus)."""
    text = read_text(path)
    if part == "all":
        return text
    piece = split.cut(text)[part]
    if len(piece) < 2:
        raise ValueError(f"the {part} part of {path} has {len(piece)} characters ({split}): nothing to score; pass "
                         "--part all or a longer file")
    return piece


def check_input_file(path: str | Path, flag: str, what: str) -> Path:
    """`path` as a Path to an existing file, or a one-line error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder: pass {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path} does not exist: pass {what}")
    return path


def check_evaluation(*, text: str | Path | None, choices: str | Path | None, tasks: list[str] | None,
                     limit: int | None, batch_size: int) -> None:
    """One-line errors for arguments the harness would misread, before any model is loaded (a batch size of -1
    scores nothing, which reads as a perfect model)."""
    if text is None and choices is None and not tasks:
        raise ValueError("nothing to evaluate: pass --text FILE, --choices FILE.jsonl or --tasks NAME[,NAME...]")
    if isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1 (sequences per forward pass), got {batch_size}")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"--limit must be >= 1 (documents per task; leave it out for all), got {limit}")
    if text is not None:
        check_input_file(text, "--text", "a UTF-8 text file")
    if choices is not None:
        check_input_file(choices, "--choices", "a .jsonl file of questions")


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file, or a one-line ValueError naming what is wrong with it."""
    path = check_input_file(path, "--text", "a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {path} is not UTF-8 (byte {err.start}): re-encode it, e.g. iconv -t utf-8") from None
    if len(text) < 2:
        raise ValueError(f"text file {path} has fewer than 2 characters: nothing to score")
    return text


def read_choices(path: str | Path) -> list[dict]:
    """The questions of a multiple-choice JSONL file, checked line by line (one-line ValueError otherwise)."""
    path = check_input_file(path, "--choices", "a .jsonl file of questions")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise ValueError(f'{where}: expected {{"question": str, "choices": [str, ...], "answer": int}}')
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer must be the index of the right choice, 0 to {len(choices) - 1}")
        rows.append({"question": row["question"], "choices": choices, "answer": answer})
    if not rows:
        raise ValueError(f"choices file {path} has no questions")
    return rows


def write_task(folder: Path, name: str, rows: list[dict], config: dict) -> None:
    """A local harness task: its documents as JSONL and its YAML config, in `folder`."""
    import yaml

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "num_fewshot": 0, **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")


def text_task_config() -> dict:
    aggregations = {"bits_per_byte": "bits_per_byte", "byte_perplexity": "weighted_perplexity",
                    "word_perplexity": "weighted_perplexity"}  # the harness's own, named so it does not warn
    return {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": aggregations[m], "higher_is_better": False}
                            for m in TEXT_METRICS]}


def choices_task_config() -> dict:
    return {"output_type": "multiple_choice", "doc_to_text": "question", "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in CHOICE_METRICS]}


# --- standard tasks ----------------------------------------------------------------------------------------------


def check_hub_reachable() -> None:
    """ConnectionError at once when the Hugging Face Hub cannot be reached (its datasets would retry for ~20 s).

    With HF_HUB_OFFLINE=1 nothing is probed: the harness then reads datasets from the local cache only.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(
            f"cannot reach {endpoint.hostname} to download the datasets of --tasks ({err}): run online, or set "
            "HF_HUB_OFFLINE=1 to use datasets already cached; --text and --choices work offline"
        ) from None


# --- evaluation ----------------------------------------------------------------------------------------------------


def evaluate(model: GPT, tokenizer: Tokenizer, *, text: str | Path | None = None, choices: str | Path | None = None,
             tasks: list[str] | None = None, limit: int | None = None, batch_size: int = 32, part: TextPart = "all",
             split: Split = Split(), progress: Progress | None = None) -> dict[str, dict]:
    """Run the harness on `model` and return {task: {metric: value}}.

    Args:
        text: a UTF-8 text file: bits per byte and byte/word perplexity (task "project_text"), of the `part`
            of it that `split` cuts (`scored_text`).
        choices: a multiple-choice JSONL file: acc and acc_norm (task "project_choices").
        tasks: names of the harness's own tasks (need their datasets: online, or in the HF cache).
        limit: at most this many documents per task (for quick checks).
        batch_size: sequences scored per forward pass.
        part: which part of `text` to score: all, or the train, val or test part (cut by `split`).
        split: how `part` cuts the text (the checkpoint's training split).
        progress: called as sequences are scored, with (what, done, total).
    """
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    check_evaluation(text=text, choices=choices, tasks=tasks, limit=limit, batch_size=batch_size)
    if tasks:
        check_hub_reachable()
    with tempfile.TemporaryDirectory(prefix="project-eval-") as folder:
        folder = Path(folder)
        names = []
        if text is not None:
            write_task(folder, TEXT_TASK, [{"text": scored_text(text, part, split)}], text_task_config())
            names.append(TEXT_TASK)
        if choices is not None:
            write_task(folder, CHOICES_TASK, read_choices(choices), choices_task_config())
            names.append(CHOICES_TASK)
        # the harness's own task index takes seconds to build: only when its tasks are asked for
        manager = TaskManager(include_path=str(folder), include_defaults=bool(tasks))
        unknown = [name for name in tasks or [] if name not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: list them with `lm-eval ls tasks`")
        lm = HarnessLM(model, tokenizer, batch_size=batch_size, progress=progress)
        try:
            if tasks:  # the harness's tasks need simple_evaluate's seeds and few-shot defaults
                output = evaluator.simple_evaluate(model=lm, tasks=names + tasks, task_manager=manager, limit=limit,
                                                   bootstrap_iters=0, log_samples=False)
            else:  # ours are zero-shot and deterministic: no need for simple_evaluate's environment report, which
                # takes a second (torch's collect_env, importing transformers) and prints git's errors outside a repo
                output = evaluator.evaluate(lm=lm, task_dict=manager.load(names), limit=limit, bootstrap_iters=0,
                                            log_samples=False)
        except ConnectionError as err:  # a dataset to download while offline
            first = str(err).splitlines()[0]
            raise ConnectionError(f"{first}: these tasks need their datasets from the Hugging Face Hub; run online "
                                  "once to cache them, or evaluate local files with --text / --choices") from None
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if key.endswith(",none") and "_stderr" not in key}
            for task, metrics in output["results"].items()}
