"""Data: the token store and its record, windows, the train/val/test split, rank streams, clear errors."""

import json

import numpy as np
import pytest
import torch

import project.data.store as store
from project.data.corpus import Split
from project.data.datamodule import TextDataModule
from project.data.store import MemmapWindows, StoreRecordError, TokenStoreRecord
from project.data.windows import TrainWindows


def prepared(data_dir, **kwargs) -> TextDataModule:
    dm = TextDataModule(data_dir=str(data_dir), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_shakespeare_bpe_store_has_the_known_token_counts(data_dir):
    dm = prepared(data_dir)
    record = dm.record
    assert sum(record.tokens.values()) == pytest.approx(338_025, abs=5)  # each split boundary may add a token
    assert record.tokens["train"] == pytest.approx(301_966, abs=5)  # the first 90% of the characters, as before
    assert dm.vocab_size == 50257
    assert sum(record.text_bytes.values()) == 1_115_394
    assert record == TokenStoreRecord.load(dm.store_dir)  # what meta.json holds


def test_the_three_splits_are_consecutive_and_disjoint():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    parts = Split(val_fraction=0.1, test_fraction=0.05).cut(text)
    assert [len(parts[name]) for name in ("train", "val", "test")] == [850, 100, 50]
    assert "".join(parts[name] for name in ("train", "val", "test")) == text
    assert Split(test_fraction=0.0).cut(text)["test"] == ""
    for bad in (dict(val_fraction=0.0), dict(val_fraction=1.0), dict(test_fraction=-0.1),
                dict(val_fraction=0.6, test_fraction=0.4)):
        with pytest.raises(ValueError, match="fraction"):
            Split(**bad)


def test_test_windows_come_from_the_test_split_only(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=32)
    dm.setup("test")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    test_text = dm.split.cut(text)["test"]
    x, y = next(iter(dm.test_dataloader()))
    for row_x, row_y in zip(x, y):
        assert dm.tokenizer.decode(row_x.tolist() + row_y[-1:].tolist()) in test_text
    assert dm.bytes_per_token("test") == pytest.approx(1.0)
    no_test = prepared(data_dir, tokenizer="char", block_size=32, split=Split(test_fraction=0.0))
    assert "test" not in no_test.record.tokens
    with pytest.raises(ValueError, match="no test split"):
        no_test.setup("test")


def test_a_store_is_checked_by_size_and_mtime_before_any_hash(data_dir, monkeypatch):
    dm = prepared(data_dir, tokenizer="char", block_size=16)
    hashed = []
    monkeypatch.setattr(store, "sha256_of", lambda path: hashed.append(path.name) or "x")
    assert store.store_problem(dm.store_dir) is None and hashed == []  # intact: nothing read whole
    train = dm.store_dir / "train.bin"
    train.write_bytes(train.read_bytes())  # same bytes, new mtime (a copy): now the checksum decides
    assert "checksum" in store.store_problem(dm.store_dir) and hashed == ["train.bin"]


def test_an_edited_record_is_never_trusted(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=16)
    path = dm.store_dir / "meta.json"
    data = json.loads(path.read_text())
    for edit in ({"dtype": "uint32"}, {"format": 2}, {"tokens": {**data["tokens"], "val": 1}}):
        path.write_text(json.dumps({**data, **edit}))
        with pytest.raises(StoreRecordError):
            TokenStoreRecord.load(dm.store_dir)
    path.write_text(json.dumps({**data, "dtype": "uint32"}))
    rebuilt = prepared(data_dir, tokenizer="char", block_size=16)  # rebuilt, not read with the wrong type
    assert rebuilt.record.dtype == "uint16" and TokenStoreRecord.load(dm.store_dir).dtype == "uint16"


def test_char_vocabulary_has_65_symbols(data_dir):
    assert prepared(data_dir, tokenizer="char").vocab_size == 65


def test_train_targets_are_inputs_shifted_by_one_and_stay_in_train_split(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=64, batch_size=4)
    train = np.memmap(dm.store_dir / "train.bin", dtype=dm.record.dtype, mode="r")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])
    joined = train.tobytes()
    for row_x, row_y in zip(x, y):
        window = np.concatenate([row_x.numpy(), row_y[-1:].numpy()]).astype(dm.record.dtype).tobytes()
        assert window in joined  # every window is a contiguous slice of the train split


def test_val_windows_are_fixed_and_inside_val_split(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=64, max_val_windows=10)
    first = [b for b in dm.val_dataloader()]
    second = [b for b in dm.val_dataloader()]
    assert sum(len(x) for x, _ in first) == 10
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    windows = MemmapWindows(dm.store_dir / "val.bin", dm.record.dtype, 64)
    assert len(windows) == dm.record.tokens["val"] // 65  # non-overlapping windows of block_size + 1
    starts = {bytes(windows[i]): i * 65 for i in range(len(windows))}
    for x, y in first:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            window = np.concatenate([row_x.numpy(), row_y[-1:].numpy()]).astype(dm.record.dtype).tobytes()
            assert window in starts  # one of the val split's windows, whole


def test_train_stream_is_seeded_and_differs_between_ranks(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=16, batch_size=2)
    path, dtype = dm.store_dir / "train.bin", dm.record.dtype

    def first_batches(rank=0, seed=1, start=0, n=3, batch_size=2, replicas=2):
        stream = iter(TrainWindows(path, dtype, 16, batch_size, seed, rank=rank, start_batch=start, replicas=replicas))
        return [next(stream)[0] for _ in range(n)]

    a, b, other_rank = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, other_rank))
    assert not torch.equal(first_batches(0, seed=2)[0], a[0])
    # resuming at batch 2 continues the same stream
    assert torch.equal(first_batches(0, start=2, n=1)[0], a[2])
    # global batch i depends on (seed, i) only: 2 ranks of 2 windows read what 1 rank of 4 reads, so a run
    # resumed on another number of ranks (global batch kept) continues with the same windows
    whole = first_batches(batch_size=4, replicas=1)
    assert all(torch.equal(torch.cat([u, v]), w) for u, v, w in zip(a, other_rank, whole))


def test_workers_interleave_to_the_same_stream(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=16, batch_size=2)
    single = iter(dm.train_dataloader())
    expected = [next(single)[0] for _ in range(4)]
    dm.num_workers = 2
    multi = iter(dm.train_dataloader())
    got = [next(multi)[0] for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(expected, got))


def test_any_text_file_via_path(tmp_path):
    corpus = tmp_path / "poem.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    dm = prepared(tmp_path / "data", path=str(corpus), tokenizer="char", block_size=16)
    assert dm.vocab_size == len(set(corpus.read_text()))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"   \n", "empty"),
    (b"\xff\xfe bad bytes", "not UTF-8"),
    (b"short text", "fewer than one window"),
])
def test_bad_corpus_gets_a_clear_error(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    if content is not None:
        corpus.write_bytes(content)
    dm = TextDataModule(path=str(corpus), data_dir=str(tmp_path / "data"), tokenizer="char", block_size=64)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        dm.prepare_data()


def test_offline_download_error_says_how_to_point_at_a_local_file(tmp_path, monkeypatch):
    import project.data.corpus as data

    monkeypatch.setattr(data, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    monkeypatch.setattr(data.download_shakespeare, "__defaults__", ("http://127.0.0.1:9/input.txt",))
    dm = TextDataModule(data_dir=str(tmp_path / "data"))
    with pytest.raises(ConnectionError, match="--data.path"):
        dm.prepare_data()
    assert not (tmp_path / "data" / "tinyshakespeare" / "input.txt").exists()


def test_corrupt_local_shakespeare_is_detected(tmp_path):
    target = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    target.parent.mkdir(parents=True)
    target.write_text("not shakespeare\n" * 100)
    with pytest.raises(ValueError, match="SHA-256"):
        TextDataModule(data_dir=str(tmp_path / "data")).prepare_data()


def test_properties_never_touch_the_corpus_once_set_up(data_dir):
    """store_dir, vocab_size, tokenizer and bytes_per_token are plain reads after setup: the corpus can go."""
    dm = prepared(data_dir, tokenizer="char", block_size=16, batch_size=2)
    (data_dir / "tinyshakespeare" / "input.txt").unlink()
    for _ in range(2):
        assert dm.store_dir.is_dir() and dm.vocab_size == 65 and dm.tokenizer.vocab_size == 65
        assert dm.bytes_per_token("val") == pytest.approx(1.0)  # characters of Shakespeare are ASCII
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 16)
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 16)


@pytest.mark.parametrize("tokenizer, vocab_size", [("char", 65), ("gpt2", 50257)])
def test_vocab_size_tokenizes_nothing(data_dir, tokenizer, vocab_size):
    """The CLI reads vocab_size at parse time on every rank: it must not build the token store there."""
    dm = TextDataModule(data_dir=str(data_dir), tokenizer=tokenizer)
    assert dm.vocab_size == vocab_size
    assert not (data_dir / "tokens").exists() and dm.store_dir is None


def test_bpe_n_is_trained_on_the_training_split_once_and_cached(shakespeare_path, tmp_path):
    from project.tokenizer import train_bpe

    text = shakespeare_path.read_text()[:200_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    dm = prepared(tmp_path / "data", path=str(corpus), tokenizer="bpe:400")
    parts = dm.split.cut(text)
    assert dm.tokenizer.spec == train_bpe(parts["train"], 400).spec  # the validation text taught it nothing
    assert dm.vocab_size == 400 and dm.record.tokenizer["kind"] == "bpe"
    assert len(list((tmp_path / "data" / "tokenizers").iterdir())) == 1
    again = prepared(tmp_path / "data", path=str(corpus), tokenizer="bpe:400")
    assert again.tokenizer.spec == dm.tokenizer.spec and again.store_dir == dm.store_dir  # read back, not retrained
    # bits per byte stay comparable across tokenizers: the byte counts are the original text's
    assert dm.record.text_bytes == {name: len(part.encode()) for name, part in parts.items()}
    val = np.memmap(dm.store_dir / "val.bin", dtype=dm.record.dtype, mode="r")
    assert dm.tokenizer.decode(val.tolist()) == parts["val"]


def test_trained_tokenizer_folder_as_data_tokenizer(shakespeare_path, tmp_path):
    from project.data.corpus import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:200_000])
    trained = train_tokenizer(corpus, 300, tmp_path / "tok")
    dm = prepared(tmp_path / "data", path=str(corpus), tokenizer=str(tmp_path / "tok"))
    assert dm.tokenizer.spec == trained.spec and dm.vocab_size == 300
    assert dm.tokenizer.decode(np.fromfile(dm.store_dir / "train.bin", dtype=dm.record.dtype).tolist()) == \
        corpus.read_text()[: int(200_000 * 0.9)]
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        TextDataModule(data_dir=str(tmp_path / "data"), tokenizer=str(tmp_path / "no-such-folder")).tokenizer
