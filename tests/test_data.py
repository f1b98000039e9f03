"""Data: token cache, windows, splits, rank streams, clear errors."""

import json

import numpy as np
import pytest
import torch

from project.data import MemmapWindows, TextDataModule, TrainWindows


def prepared(data_dir, **kwargs) -> TextDataModule:
    dm = TextDataModule(data_dir=str(data_dir), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_shakespeare_bpe_cache_has_the_known_token_counts(data_dir):
    dm = prepared(data_dir)
    meta = json.loads((dm.cache_dir / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == pytest.approx(338_025, abs=5)  # split adds a boundary
    assert meta["val_tokens"] == pytest.approx(36_059, abs=50)
    assert dm.vocab_size == 50257
    assert meta["train_bytes"] + meta["val_bytes"] == 1_115_394


def test_char_vocabulary_has_65_symbols(data_dir):
    assert prepared(data_dir, tokenizer="char").vocab_size == 65


def test_train_targets_are_inputs_shifted_by_one_and_stay_in_train_split(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=64, batch_size=4)
    train = np.memmap(dm.cache_dir / "train.bin", dtype=dm.meta["dtype"], mode="r")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])
    joined = train.tobytes()
    for row_x, row_y in zip(x, y):
        window = np.concatenate([row_x.numpy(), row_y[-1:].numpy()]).astype(dm.meta["dtype"]).tobytes()
        assert window in joined  # every window is a contiguous slice of the train split


def test_val_windows_are_fixed_and_inside_val_split(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=64, max_val_windows=10)
    first = [b for b in dm.val_dataloader()]
    second = [b for b in dm.val_dataloader()]
    assert sum(len(x) for x, _ in first) == 10
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    windows = MemmapWindows(dm.cache_dir / "val.bin", dm.meta["dtype"], 64)
    assert len(windows) == dm.meta["val_tokens"] // 65  # non-overlapping windows of block_size + 1
    starts = {bytes(windows[i]): i * 65 for i in range(len(windows))}
    for x, y in first:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            window = np.concatenate([row_x.numpy(), row_y[-1:].numpy()]).astype(dm.meta["dtype"]).tobytes()
            assert window in starts  # one of the val split's windows, whole


def test_train_stream_is_seeded_and_differs_between_ranks(data_dir):
    dm = prepared(data_dir, tokenizer="char", block_size=16, batch_size=2)
    path, dtype = dm.cache_dir / "train.bin", dm.meta["dtype"]

    def first_batches(rank, seed=1, start=0, n=3):
        stream = iter(TrainWindows(path, dtype, 16, 2, seed, rank=rank, start_batch=start))
        return [next(stream)[0] for _ in range(n)]

    a, b, other_rank = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, other_rank))
    assert not torch.equal(first_batches(0, seed=2)[0], a[0])
    # resuming at batch 2 continues the same stream
    assert torch.equal(first_batches(0, start=2, n=1)[0], a[2])


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
    import project.data as data

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
    """cache_dir, vocab_size, tokenizer and val_bytes_per_token are plain reads after setup: the corpus can go."""
    dm = prepared(data_dir, tokenizer="char", block_size=16, batch_size=2)
    (data_dir / "tinyshakespeare" / "input.txt").unlink()
    for _ in range(2):
        assert dm.cache_dir.is_dir() and dm.vocab_size == 65 and dm.tokenizer.vocab_size == 65
        assert dm.val_bytes_per_token == pytest.approx(1.0)  # characters of Shakespeare are ASCII
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 16)
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 16)


@pytest.mark.parametrize("tokenizer, vocab_size", [("char", 65), ("gpt2", 50257)])
def test_vocab_size_tokenizes_nothing(data_dir, tokenizer, vocab_size):
    """The CLI reads vocab_size at parse time on every rank: it must not build the token cache there."""
    dm = TextDataModule(data_dir=str(data_dir), tokenizer=tokenizer)
    assert dm.vocab_size == vocab_size
    assert not (data_dir / "tokens").exists() and dm.cache_dir is None


def test_bpe_n_is_trained_on_the_training_split_once_and_cached(shakespeare_path, tmp_path):
    from project.tokenizer import train_bpe

    text = shakespeare_path.read_text()[:200_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    dm = prepared(tmp_path / "data", path=str(corpus), tokenizer="bpe:400")
    split = int(len(text) * 0.9)
    assert dm.tokenizer.spec == train_bpe(text[:split], 400).spec  # the validation text taught it nothing
    assert dm.vocab_size == 400 and dm.meta["tokenizer"]["kind"] == "bpe"
    assert len(list((tmp_path / "data" / "tokenizers").iterdir())) == 1
    again = prepared(tmp_path / "data", path=str(corpus), tokenizer="bpe:400")
    assert again.tokenizer.spec == dm.tokenizer.spec and again.cache_dir == dm.cache_dir  # read back, not retrained
    # bits per byte stay comparable across tokenizers: the byte counts are the original text's
    assert (dm.meta["train_bytes"], dm.meta["val_bytes"]) == (len(text[:split].encode()), len(text[split:].encode()))
    val = np.memmap(dm.cache_dir / "val.bin", dtype=dm.meta["dtype"], mode="r")
    assert dm.tokenizer.decode(val.tolist()) == text[split:]


def test_trained_tokenizer_folder_as_data_tokenizer(shakespeare_path, tmp_path):
    from project.data import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:200_000])
    trained = train_tokenizer(corpus, 300, tmp_path / "tok")
    dm = prepared(tmp_path / "data", path=str(corpus), tokenizer=str(tmp_path / "tok"))
    assert dm.tokenizer.spec == trained.spec and dm.vocab_size == 300
    assert dm.tokenizer.decode(np.fromfile(dm.cache_dir / "train.bin", dtype=dm.meta["dtype"]).tolist()) == \
        corpus.read_text()[: int(200_000 * 0.9)]
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        TextDataModule(data_dir=str(tmp_path / "data"), tokenizer=str(tmp_path / "no-such-folder")).tokenizer
