"""Fine-tuning data: your own JSONL or CSV files of instructions or labelled texts, checked record by record.

Instruction files (JSONL, one object per line), one of two shapes per file:

    {"instruction": "...", "input": "... (optional)", "output": "..."}                 (Alpaca's fields)
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}    (a conversation)

Classification files: CSV with a header, or JSONL, with a text and a label column (`text_column`,
`label_column`; labels are strings). The classes are the sorted set of the training file's labels.

Every problem in a record is a one-line ValueError naming the file and line (`val.csv:17: label 'X' does not occur
in the training data`): a record that is not JSON or not an object, a missing or empty field (an empty response),
an unknown role, a conversation without a reply, a label the training data lacks. A record longer than the model's
context is skipped and counted (`too_long: skip`, logged with its line numbers) or is an error (`too_long: error`);
a response is never truncated, which would cut off its end-of-text.

Batches: instruction examples are right-padded token ids x and targets y (x shifted by one), y = -100 on the prompt
and the padding, so the loss is the response's alone. Classification batches are padded ids, each text's length
(the classifier reads the hidden state of its last real token) and the class index.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from project.chat import IGNORE_INDEX, PromptTemplate, check_messages

log = logging.getLogger(__name__)

Task = Literal["instruct", "classify"]
SPLITS = ("train", "val", "test", "predict")


@dataclass
class Record:
    """One checked record: its line, its conversation (instruct) or text and label (classify), its own fields."""

    line: int
    messages: list[dict] = field(default_factory=list)
    text: str = ""
    label: str | None = None
    source: dict = field(default_factory=dict)  # the record's own fields, written back by predict


def read_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, row) of a .jsonl file (a parsed JSON value per non-blank line) or a .csv file (a dict per row
    by its header); ValueError naming the line for a line that is not JSON."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:  # reads the header
                return
            start = reader.line_num + 1
            for row in reader:
                if None in row or None in row.values():
                    raise ValueError(f"{path}:{start}: this row has {'more' if None in row else 'fewer'} fields "
                                     f"than the header ({', '.join(reader.fieldnames or [])})")
                yield start, row
                start = reader.line_num + 1
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}): give one JSON object per "
                                     "line") from None
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix or '(none)'}: fine-tuning data is .jsonl or .csv")


def text_field(row: dict, name: str, where: str, *, required: bool = True) -> str:
    """A string field of a row, checked to be present and non-empty when `required`."""
    value = row.get(name)
    if value is None or value == "":
        if required:
            raise ValueError(f"{where}: {'empty' if value == '' else 'missing'} field {name!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def instruction_record(row: object, line: int, path: Path, template: PromptTemplate, shape: str | None,
                       answered: bool) -> tuple[Record, str]:
    """A JSONL row as a conversation, and the file's shape ("alpaca" or "messages"), which every row must share.

    `answered`: the record must end with its reply (training files); else a reply it holds is left out of the
    conversation the model answers (it stays in the record's own fields, which predict writes back).
    """
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    this = "messages" if "messages" in row else "alpaca"
    if shape is not None and this != shape:
        raise ValueError(f"{where}: this record has {'messages' if this == 'messages' else 'Alpaca fields'}, the "
                         f"file's first record {'messages' if shape == 'messages' else 'Alpaca fields'}: use one shape")
    if this == "alpaca":
        instruction = text_field(row, "instruction", where)
        output = text_field(row, "output", where, required=answered)
        messages = template.record_messages(instruction, text_field(row, "input", where, required=False))
        if answered:
            return Record(line, messages + [{"role": "assistant", "content": output}], source=row), this
        return Record(line, messages, source=row), this
    try:
        messages = [dict(m) if isinstance(m, dict) else m for m in check_messages(row["messages"])]
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    for message in messages:
        message.pop("name", None)
        if message["role"] == "assistant" and not message["content"]:
            raise ValueError(f"{where}: an assistant message has empty content (an empty response)")
    if messages[-1]["role"] == "assistant" and not answered:
        messages.pop()
    if answered and messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's reply (the response to learn)")
    if not answered and not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{where}: no user message to answer")
    return Record(line, messages, source=row), this


def label_value(row: dict, name: str, where: str) -> str | None:
    """A row's label as a string (JSONL labels may be numbers), None when absent."""
    value = row.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: label {name!r} must be a string or a whole number, got {value!r}")
    return str(value)


def read_records(path: str | Path, task: Task, *, template: PromptTemplate | None = None, text_column: str = "text",
                 label_column: str = "label", labelled: bool = True) -> list[Record]:
    """Every record of a fine-tuning file, checked (see the module docstring); ValueError naming the first bad line.

    `labelled`: records must carry their answer (an output or final reply, a label): training and evaluation
    files. Files to predict need not.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning data file {path} does not exist")
    records: list[Record] = []
    shape = None
    for line, row in read_rows(path):
        where = f"{path}:{line}"
        if task == "instruct":
            record, shape = instruction_record(row, line, path, template or PromptTemplate(), shape, labelled)
        else:
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object with {text_column!r} and {label_column!r}")
            label = label_value(row, label_column, where)
            if labelled and label is None:
                raise ValueError(f"{where}: missing label {label_column!r}")
            record = Record(line, text=text_field(row, text_column, where), label=label, source=row)
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


@dataclass
class Example:
    """A record's token ids, ready to batch: labels (instruct) or the class index (classify)."""

    ids: list[int]
    labels: list[int] | None = None
    target: int | None = None
    record: Record | None = None


def fit_to_context(examples: list[tuple[Record, Example]], limit: int, too_long: str, path: Path,
                   what: str) -> list[Example]:
    """Examples whose ids fit `limit` tokens; the others are skipped and counted (logged), or an error."""
    kept = [example for _, example in examples if len(example.ids) <= limit]
    over = [record.line for record, example in examples if len(example.ids) > limit]
    if over and too_long == "error":
        raise ValueError(f"{path}:{over[0]}: {what} is longer than the model's context ({limit} tokens; "
                         f"{len(over)} records are): shorten it, or pass --data.too_long skip")
    if over:
        lines = ", ".join(map(str, over[:10])) + (", ..." if len(over) > 10 else "")
        log.info("skipped %d of %d records of %s longer than the context (%d tokens): lines %s", len(over),
                 len(examples), path, limit, lines)
    if not kept:
        raise ValueError(f"{path}: every record is longer than the model's context ({limit} tokens)")
    return kept


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Rows of different lengths as one (B, longest) int64 tensor, padded on the right with `value`."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def instruction_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): inputs and next-token targets, right-padded (x with `pad_id`, which a causal model never lets an
    earlier position see; y with -100, which the loss skips), y = -100 on prompt tokens too."""
    return pad([e.ids[:-1] for e in examples], pad_id), pad([e.labels[1:] for e in examples], IGNORE_INDEX)


def classification_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, lengths, class indices): right-padded ids and each text's token count."""
    lengths = torch.tensor([len(e.ids) for e in examples], dtype=torch.long)
    targets = torch.tensor([-1 if e.target is None else e.target for e in examples], dtype=torch.long)
    return pad([e.ids for e in examples], pad_id), lengths, targets


class ShuffledBatches(IterableDataset):
    """Endless training batches: pass e over the examples in the order of a permutation seeded by seed + e.

    Batch number i is a pure function of (seed, i), so a resumed run continues with the batch it would have trained
    on next (`start_batch`), and DataLoader workers take every n-th batch (the loader interleaves them in order).
    """

    def __init__(self, examples: list[Example], batch_size: int, collate, seed: int, start_batch: int = 0) -> None:
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.start_batch = seed, start_batch
        self.per_pass = -(-len(examples) // batch_size)  # the last batch of a pass may be smaller

    def batch(self, number: int):
        epoch, index = divmod(number, self.per_pass)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        return self.collate([self.examples[i] for i in order[index * self.batch_size:(index + 1) * self.batch_size]])

    def __iter__(self):
        worker = get_worker_info()
        workers, rank = (1, 0) if worker is None else (worker.num_workers, worker.id)
        number = self.start_batch + rank
        while True:
            yield self.batch(number)
            number += workers


class FineTuneDataModule(LightningDataModule):
    """Instruction or classification data from JSONL/CSV files, for `python -m project finetune`.

    The task, tokenizer, prompt template and context come from the model being fine-tuned (the Trainer's
    LightningModule), so nothing is typed twice; files are read and checked in `setup`, tokenized when a loader
    is made (after a checkpoint has been restored).

    Args:
        train_path: the training file (fit).
        val_path: the validation file (fit, validate).
        test_path: the test file (test).
        predict_path: records to answer or classify (predict); answers or labels they hold are ignored (and
            written back beside the model's).
        batch_size: records per batch.
        too_long: a record longer than the context is skipped and counted (skip) or an error (error).
        text_column: the text field of classification records.
        label_column: the label field of classification records.
        num_workers: DataLoader worker processes.
        seed: the order in which training records are shuffled.
    """

    def __init__(self, train_path: str | None = None, val_path: str | None = None, test_path: str | None = None,
                 predict_path: str | None = None, batch_size: int = 8, too_long: Literal["skip", "error"] = "skip",
                 text_column: str = "text", label_column: str = "label", num_workers: int = 0,
                 seed: int = 1337) -> None:
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if value < least:
                raise ValueError(f"--data.{name} must be >= {least}, got {value}")
        self.paths = {"train": train_path, "val": val_path, "test": test_path, "predict": predict_path}
        self.batch_size, self.too_long = batch_size, too_long
        self.text_column, self.label_column = text_column, label_column
        self.num_workers, self.seed = num_workers, seed
        self.records: dict[str, list[Record]] = {}
        self.classes: list[str] | None = None  # classify: the sorted labels of the training file
        self.majority: str | None = None  # classify: the most frequent training label, the baseline to beat

    # --- what the model tells the data -----------------------------------------------------------------------

    @property
    def module(self):
        if self.trainer is None or self.trainer.lightning_module is None:
            raise RuntimeError("FineTuneDataModule reads its task and tokenizer from the Trainer's model: use it "
                               "through a Trainer (python -m project finetune)")
        return self.trainer.lightning_module

    def path(self, split: str) -> Path:
        value = self.paths[split]
        if not value:
            flag = {"train": "fit", "val": "fit and validate", "test": "test", "predict": "predict"}[split]
            raise ValueError(f"--data.{split}_path is not set: {flag} needs it")
        return Path(value)

    # --- reading -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Read and check the files this stage uses; for classification, the classes and the majority baseline."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        module = self.module
        if stage == "fit" and self.trainer.max_steps < 1:
            raise ValueError("finetune fit trains for --trainer.max_steps steps (the training batches have no end): "
                             "set it, e.g. --trainer.max_steps 300")
        for split in splits:
            if split not in self.records:
                self.records[split] = read_records(
                    self.path(split), module.task, template=module.template, text_column=self.text_column,
                    label_column=self.label_column, labelled=split != "predict")
        if module.task == "classify":
            self.setup_classes(module.classes)

    def setup_classes(self, known: list[str] | None) -> None:
        """The classes: the training labels (fit) or the model's (evaluating a fine-tuned checkpoint); every
        evaluated label must be one of them."""
        if "train" in self.records:
            found = sorted({r.label for r in self.records["train"]})
            if len(found) < 2:
                raise ValueError(f"{self.path('train')}: a classifier needs at least two labels, found {found}")
            if known is not None and found != list(known):
                raise ValueError(f"{self.path('train')} has the labels {found}, the checkpoint's classifier "
                                 f"{list(known)}: fine-tune from the base model instead")
            self.classes = found
        elif known is not None:
            self.classes = list(known)
        else:
            raise ValueError("this model has no classes yet: fine-tune it first (finetune fit), then pass "
                             "--ckpt_path")
        for split in ("val", "test"):
            for record in self.records.get(split, []):
                if record.label not in self.classes:
                    raise ValueError(f"{self.path(split)}:{record.line}: label {record.label!r} does not occur in the "
                                     f"training data (classes: {', '.join(self.classes)})")
        if "train" in self.records:
            counts = Counter(r.label for r in self.records["train"])
            majority, _ = max(counts.items(), key=lambda item: (item[1], -self.classes.index(item[0])))
            shares = {split: sum(r.label == majority for r in records) / len(records)
                      for split, records in self.records.items() if split != "predict"}
            log.info("%d classes; majority class %r: accuracy %s", len(self.classes), majority,
                     ", ".join(f"{split} {share:.1%}" for split, share in shares.items()))
            self.majority = majority

    # --- tokens --------------------------------------------------------------------------------------------

    def examples(self, split: str) -> list[Example]:
        """The split's records as token ids, those longer than the context skipped (or an error)."""
        module = self.module
        tokenizer, block_size = module.tokenizer, module.config.block_size
        if tokenizer is None:
            raise RuntimeError("the model has no tokenizer: it comes from --model.init_from or the checkpoint")
        pairs = []
        for record in self.records[split]:
            if module.task == "classify":
                target = self.classes.index(record.label) if record.label is not None else None
                pairs.append((record, Example(tokenizer.encode(record.text), target=target, record=record)))
            elif split == "predict":
                ids, _ = module.template.encode(record.messages, tokenizer, add_generation_prompt=True)
                pairs.append((record, Example(ids, record=record)))
            else:
                ids, labels = module.template.encode(record.messages, tokenizer)
                pairs.append((record, Example(ids, labels, record=record)))
        # instruction examples hold one token more than the context: the inputs drop the last, the targets the first
        limit = block_size + 1 if module.task == "instruct" and split != "predict" else block_size
        what = "the prompt" if split == "predict" and module.task == "instruct" else "the record"
        return fit_to_context(pairs, limit, self.too_long, self.path(split), what)

    def pad_id(self) -> int:
        eot_id = self.module.tokenizer.eot_id
        return 0 if eot_id is None else eot_id

    def collate(self, split: str):
        """How the split's examples become a batch."""
        if split == "predict":
            return list  # the module generates (instruct) or pads (classify) itself
        batch = classification_batch if self.module.task == "classify" else instruction_batch
        return functools.partial(batch, pad_id=self.pad_id())

    def loader(self, split: str) -> DataLoader:
        """The evaluation and predict batches: the file's records in order."""
        return DataLoader(self.examples(split), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate(split), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches without end (training is bounded by --trainer.max_steps), resuming where a checkpoint
        stopped."""
        examples = self.examples("train")
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches  # restored before the loader is made
        batches = ShuffledBatches(examples, self.batch_size, self.collate("train"), self.seed, start_batch=start)
        if trainer.max_steps > 0:
            log.info("%d training steps of %d records: %.2f passes over the %d training records", trainer.max_steps,
                     self.batch_size * trainer.accumulate_grad_batches,
                     trainer.max_steps * self.batch_size * trainer.accumulate_grad_batches / len(examples),
                     len(examples))
        # an own generator: making the iterator then draws nothing from the global RNG (resumes stay exact)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
