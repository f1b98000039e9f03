"""Bigger corpora: `prepare` (a folder of files -> litdata chunks) and `--data.streaming_dir` (streamed training).

Everything runs on a few KB of TinyShakespeare split into files; skipped only when litdata is not installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from conftest import REPO, run_cli

pytest.importorskip("litdata")

from project.commands import main  # noqa: E402
from project.data.corpus import Split  # noqa: E402
from project.data.datamodule import TextDataModule  # noqa: E402
from project.data.streaming import import_litdata, prepare_corpus, read_record  # noqa: E402
from project.tokenizer import tokenizer_from_state  # noqa: E402
from project.training.optim import OptimizerSettings  # noqa: E402

litdata = import_litdata()

DEBUG = str(REPO / "configs" / "debug.yaml")


def write_corpus(folder: Path, text: str, parts: int = 3) -> list[str]:
    """`text` cut into `parts` documents, written as .txt files (one in a subfolder: files are found recursively)."""
    size = len(text) // parts
    docs = [text[i * size : (i + 1) * size] for i in range(parts)]
    for i, doc in enumerate(docs):
        path = folder / ("nested" if i == parts - 1 else "") / f"part{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file: ignored")
    (folder / "empty.txt").write_text("")  # empty files are skipped
    return docs


def all_tokens(split_dir: Path) -> list[int]:
    """Every token of a split, in stored order (litdata windows of one token: no chunk tail is dropped)."""
    dataset = litdata.StreamingDataset(str(split_dir), item_loader=litdata.TokensLoader(block_size=1))
    return [int(item[0]) for item in dataset]


def expected_parts(docs: list[str], split: Split) -> dict[str, list[str]]:
    """Each split's part of every document (the non-empty ones)."""
    cut = [split.cut(d) for d in docs]
    return {name: [parts[name] for parts in cut if parts[name]] for name in ("train", "val", "test")}


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory, shakespeare_path) -> dict:
    """3 text files (~9 KB) prepared once through the real CLI (spawned tokenizer workers under `python -m`)."""
    root = tmp_path_factory.mktemp("streaming")
    docs = write_corpus(root / "texts", shakespeare_path.read_text(encoding="utf-8")[:9000])
    out = root / "tokens"
    result = run_cli("prepare", "--input_dir", str(root / "texts"), "--output_dir", str(out), "--num_workers", "2",
                     "--chunk_tokens", "600", "--split.val_fraction", "0.1", "--split.test_fraction", "0.1", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "docs": docs, "out": out, "record": read_record(str(out))}


def test_prepare_round_trip_and_counts(bpe_corpus):
    record, out, docs = bpe_corpus["record"], bpe_corpus["out"], bpe_corpus["docs"]
    tokenizer = tokenizer_from_state(record.tokenizer)
    assert record.tokenizer == {"kind": "tiktoken", "name": "gpt2"} and record.dtype == "uint16"
    assert len(list((out / "train").glob("chunk-*.bin"))) > 1  # sharded: several chunk files
    for split, parts in expected_parts(docs, Split(val_fraction=0.1, test_fraction=0.1)).items():
        tokens = all_tokens(out / split)
        assert len(tokens) == record.tokens[split]
        assert tokens.count(tokenizer.eot_id) == len(parts)  # <|endoftext|> after every document
        decoded = tokenizer.decode(tokens).split("<|endoftext|>")
        assert decoded[-1] == "" and sorted(decoded[:-1]) == sorted(parts)  # workers may reorder documents
        assert record.text_bytes[split] == sum(len(p.encode("utf-8")) for p in parts)
    assert sum(record.text_bytes.values()) == len("".join(docs).encode("utf-8"))


@pytest.fixture(scope="module")
def char_corpus(tmp_path_factory, shakespeare_path) -> dict:
    """Character tokens of 2 text files, a file with rare characters and a parquet file of 2 rows."""
    root = tmp_path_factory.mktemp("streaming-char")
    docs = write_corpus(root / "texts", shakespeare_path.read_text(encoding="utf-8")[:3000], parts=2)
    rare = "Zürich\n"  # characters that occur in one file only still get ids
    (root / "texts" / "rare.txt").write_text(rare)
    docs.append(rare)
    import pyarrow as pa  # the `data` extra installs it with litdata
    import pyarrow.parquet as pq

    rows = ["First row.\n", "Second row, différent.\n"]
    pq.write_table(pa.table({"text": rows, "id": [1, 2]}), root / "texts" / "rows.parquet")
    docs += rows
    record = prepare_corpus(input_dir=str(root / "texts"), output_dir=str(root / "tokens"), tokenizer="char",
                            num_workers=1, split=CHAR_SPLIT)  # in-process: spawned workers work under pytest too
    return {"root": root, "docs": docs, "out": root / "tokens", "record": record}


CHAR_SPLIT = Split(val_fraction=0.2, test_fraction=0.1)


def test_prepare_char_vocabulary_over_all_files_and_parquet_rows(char_corpus):
    """tokenizer=char sees every file before tokenizing; a parquet row is a document."""
    record, docs, out = char_corpus["record"], char_corpus["docs"], char_corpus["out"]
    tokenizer = tokenizer_from_state(record.tokenizer)
    assert tokenizer.chars == "".join(sorted(set("".join(docs))))
    assert tokenizer.eot_id is None  # so nothing separates the documents
    for split, parts in expected_parts(docs, CHAR_SPLIT).items():
        tokens = all_tokens(out / split)
        assert len(tokens) == record.tokens[split] == sum(len(p) for p in parts)
        assert sorted(tokenizer.decode(tokens)) == sorted("".join(parts))  # characters back to back, no separator
        assert record.text_bytes[split] == sum(len(p.encode("utf-8")) for p in parts)
    assert read_record(str(out)) == record  # what meta.json holds


def test_both_readers_give_the_same_tokens_and_val_windows(shakespeare_path, tmp_path):
    """One text file through the memmap cache and through litdata chunks: one split, one token layout, one shift."""
    (tmp_path / "texts").mkdir()
    corpus = tmp_path / "texts" / "play.txt"
    corpus.write_text(shakespeare_path.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    split = Split(val_fraction=0.1, test_fraction=0.1)
    prepare_corpus(input_dir=str(tmp_path / "texts"), output_dir=str(tmp_path / "tokens"), tokenizer="char",
                   num_workers=1, split=split)
    options = {"block_size": 32, "batch_size": 8, "max_val_windows": 20}
    memmap = TextDataModule(path=str(corpus), data_dir=str(tmp_path / "data"), tokenizer="char", split=split,
                            **options)
    streamed = TextDataModule(streaming_dir=str(tmp_path / "tokens"), **options)
    for dm in (memmap, streamed):
        dm.prepare_data()
        dm.setup("fit")
    assert memmap.tokenizer.state_dict() == streamed.tokenizer.state_dict()
    assert memmap.record.text_bytes == streamed.record.text_bytes and memmap.record.tokens == streamed.record.tokens
    for name in ("train", "val", "test"):
        stored = np.fromfile(memmap.store_dir / f"{name}.bin", dtype=memmap.record.dtype).tolist()
        assert all_tokens(tmp_path / "tokens" / name) == stored
    for name in ("val", "test"):
        pairs = list(zip(memmap.eval_dataloader(name), streamed.eval_dataloader(name), strict=True))
        assert sum(len(x) for (x, _), _ in pairs) == 20
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


def streaming_module(out: Path, **kwargs) -> TextDataModule:
    dm = TextDataModule(streaming_dir=str(out), **{"block_size": 16, "batch_size": 4, "seed": 7, **kwargs})
    dm.setup("fit")
    return dm


def first_batches(dm: TextDataModule, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stream = iter(dm.train_dataloader())
    return [next(stream) for _ in range(n)]


def test_train_batches_are_shifted_windows_seeded_and_endless(bpe_corpus):
    dm = streaming_module(bpe_corpus["out"])
    record = bpe_corpus["record"]
    assert dm.vocab_size == 50257 and dm.bytes_per_token("val") == pytest.approx(
        record.text_bytes["val"] / record.tokens["val"])
    batches = first_batches(dm)
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    again = first_batches(streaming_module(bpe_corpus["out"]))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other_seed = first_batches(streaming_module(bpe_corpus["out"], seed=8))
    assert not torch.equal(batches[0][0], other_seed[0][0])
    # the stream outlasts an epoch (~2400 tokens = ~140 windows of 17 = ~35 batches): training runs by max_steps
    stream = iter(dm.train_dataloader())
    assert len([next(stream) for _ in range(100)]) == 100
    # validation: fixed windows, the same on every call
    val = [x for x, _ in dm.val_dataloader()]
    assert val and all(torch.equal(a, b) for a, b in zip(val, [x for x, _ in dm.val_dataloader()]))


def test_tensor_parallel_ranks_share_a_stream_and_data_parallel_ranks_do_not(bpe_corpus):
    def first(global_rank: int, sampler_kwargs: dict) -> torch.Tensor:
        dm = streaming_module(bpe_corpus["out"])
        dm.trainer = SimpleNamespace(global_rank=global_rank, world_size=2, state=SimpleNamespace(fn="fit"),
                                     strategy=SimpleNamespace(distributed_sampler_kwargs=sampler_kwargs),
                                     global_step=0, accumulate_grad_batches=1)
        return next(iter(dm.train_dataloader()))[0]

    tp_group = {"num_replicas": 1, "rank": 0}  # dp=1 x tp=2: both ranks are data-parallel rank 0
    assert torch.equal(first(0, tp_group), first(1, tp_group))
    a, b = first(0, {"num_replicas": 2, "rank": 0}), first(1, {"num_replicas": 2, "rank": 1})
    assert not any(torch.equal(u, v) for u in a for v in b)


def test_fit_streaming_then_generate_through_the_cli(char_corpus, tmp_path):
    result = run_cli("fit", "--config", DEBUG, "--data.streaming_dir", str(char_corpus["out"]),
                     "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
                     "--samples.max_new_tokens", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 4 and saved["tokenizer"]["kind"] == "char"
    assert saved["hyper_parameters"]["config"]["vocab_size"] == len(saved["tokenizer"]["chars"])  # from meta.json
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # litdata's loader state, for resuming
    result = run_cli("generate", "--ckpt_path", str(ckpt), "--prompt", "ROMEO:", "--generation.max_new_tokens", "10",
                     "--generation.seed", "1", "--compile", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ROMEO:") and len(result.stdout.strip()) >= len("ROMEO:") + 5


class RecordBatches(Callback):
    """The batches a rank trained on and its count of val batches; with `out`, saved as <out>/rank<r>.json."""

    def __init__(self, out: str | None = None) -> None:
        self.out, self.train, self.val = out, [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(batch[0].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val += 1

    def on_fit_end(self, trainer, pl_module):
        if self.out:
            Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps({"train": self.train, "val": self.val}))


def fit_steps(streaming_dir: Path, max_steps: int, root: Path, ckpt_path: str | None = None) -> list:
    """The training batches of a tiny in-process fit that saves last.ckpt every 4 steps."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from project.model import GPTConfig
    from project.training.module import GPTModule

    dm = TextDataModule(streaming_dir=str(streaming_dir), block_size=16, batch_size=4, seed=5)
    module = GPTModule(GPTConfig(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16),
                       optimizer=OptimizerSettings(warmup_steps=1))
    record = RecordBatches()
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      callbacks=[record, ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=4)])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return record.train


def test_resuming_continues_the_stream_exactly(char_corpus, tmp_path):
    """Lightning fetches one batch ahead; the checkpointed loader state still counts only the batches used."""
    reference = fit_steps(char_corpus["out"], 8, tmp_path / "a")
    assert len(reference) == 8 and len({str(batch) for batch in reference}) == 8
    assert fit_steps(char_corpus["out"], 4, tmp_path / "b") == reference[:4]
    assert fit_steps(char_corpus["out"], 8, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt")) == reference[4:]


@pytest.mark.distributed
def test_ddp_ranks_read_different_windows_and_all_validate(bpe_corpus, tmp_path):
    """2 gloo processes (ddp_spawn): disjoint training windows; the val split holds 1 window for 2 ranks."""
    from lightning.pytorch import Trainer

    from project.model import GPTConfig
    from project.training.module import GPTModule

    block = 128  # the val split (~230 tokens) holds one window of 129: the sampler pads it for the second rank
    dm = TextDataModule(streaming_dir=str(bpe_corpus["out"]), block_size=block, batch_size=2, seed=3)
    assert len(dm.val_dataloader().dataset) == 1
    module = GPTModule(GPTConfig(vocab_size=dm.vocab_size, block_size=block, n_layer=1, n_head=2, n_embd=16),
                       optimizer=OptimizerSettings(warmup_steps=1))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, val_check_interval=2,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[RecordBatches(str(tmp_path))])
    trainer.fit(module, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(r["train"]) == 2 and r["val"] >= 1 for r in ranks)
    rows = [{tuple(row) for batch in r["train"] for row in batch} for r in ranks]
    assert not rows[0] & rows[1]  # litdata gave each rank its own windows


BAD_INPUTS = {
    "prepare-empty-dir": (["prepare", "--input_dir", "{tmp}/empty", "--output_dir", "{tmp}/out"],
                          "has no non-empty .txt or .parquet files"),
    "prepare-missing-dir": (["prepare", "--input_dir", "{tmp}/nope", "--output_dir", "{tmp}/out"], "does not exist"),
    "prepare-into-non-empty": (["prepare", "--input_dir", "{tmp}/texts", "--output_dir", "{tmp}/texts"],
                               "is not empty"),
    "prepare-not-utf8-char": (["prepare", "--input_dir", "{tmp}/latin1", "--output_dir", "{tmp}/out", "--tokenizer",
                               "char"], "is not UTF-8"),  # found while building the vocabulary
    "prepare-not-utf8-bpe": (["prepare", "--input_dir", "{tmp}/latin1", "--output_dir", "{tmp}/out", "--num_workers",
                              "1"], "is not UTF-8"),  # found in a tokenizer worker process
    "fit-missing-streaming-dir": (["fit", "--config", DEBUG, "--data.streaming_dir", "{tmp}/nope"], "no meta.json"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_error(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text\n")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.txt").write_bytes("Roméo et Juliette\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    args, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in args])
        sys.exit(0)
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None)
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error:") and message in last_line, err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_bad_file_among_good_ones_stops_spawned_workers_cleanly(tmp_path):
    """The real CLI, 2 spawned workers: the error is the last line, with no orphaned process's traceback after it."""
    (tmp_path / "texts").mkdir()
    for name in ("a", "c"):
        (tmp_path / "texts" / f"{name}.txt").write_text("Fair Verona, where we lay our scene.\n" * 20)
    (tmp_path / "texts" / "b.txt").write_bytes("Roméo et Juliette\n".encode("latin-1"))
    result = run_cli("prepare", "--input_dir", "texts", "--output_dir", "tokens", "--num_workers", "2", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: texts/b.txt is not UTF-8")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tokens").exists()


def test_chunks_left_by_a_killed_prepare_do_not_break_the_next(tmp_path, monkeypatch, shakespeare_path):
    """litdata stages chunks in one shared folder and refuses to finish when it holds another run's: each prepare
    stages in a folder of its own."""
    stale = tmp_path / "staging"
    stale.mkdir()
    (stale / "chunk-0-0.bin").write_bytes(b"left by a killed run")
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(stale))
    write_corpus(tmp_path / "texts", shakespeare_path.read_text(encoding="utf-8")[:2000], parts=1)
    record = prepare_corpus(input_dir=str(tmp_path / "texts"), output_dir=str(tmp_path / "tokens"), tokenizer="char",
                            num_workers=1)
    assert record.tokens["train"] > 0 and os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] == str(stale)
