"""Tokenizers round-trip text and restore from the state a checkpoint stores."""

import random

import pytest

from project.tokenizer import (END_OF_TEXT, BPETokenizer, CharTokenizer, TiktokenTokenizer, bpe_vocab_size,
                               build_tokenizer, tokenizer_from_state, train_bpe)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll: Speak, speak! — café 🙂"


def test_gpt2_bpe_round_trip_and_known_ids():
    tok = TiktokenTokenizer("gpt2")
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256


def test_special_token_text_is_encoded_as_plain_text():
    tok = TiktokenTokenizer("gpt2")
    assert tok.eot_id not in tok.encode("<|endoftext|>")


def test_char_tokenizer_round_trip_and_sorted_vocabulary():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert list(tok.chars) == sorted(set(TEXT))
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        tok.encode("Z")


@pytest.fixture(scope="module")
def trained(shakespeare_path) -> BPETokenizer:
    return train_bpe(shakespeare_path.read_text()[:300_000], 600)


def random_text(seed: int, length: int = 2000) -> str:
    """Code points from every plane a BPE trained on English never saw (controls, CJK, emoji, surrogate-free)."""
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x3040, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    chars = []
    while len(chars) < length:
        low, high = rng.choice(ranges)
        c = rng.randint(low, high)
        if not 0xD800 <= c <= 0xDFFF:
            chars.append(chr(c))
    return "".join(chars)


def test_trained_bpe_round_trips_any_text_byte_for_byte(trained):
    assert trained.vocab_size == 600
    for text in (TEXT, random_text(0), random_text(1), "\r\n\t  \x00 ", ""):
        ids = trained.encode(text)
        assert trained.decode_bytes(ids) == text.encode("utf-8")
        assert trained.decode(ids) == text
    assert len(trained.encode("ROMEO:\nWhat, shall this speech be spoke")) < 20  # merges were learned


def test_trained_bpe_token_bytes_split_characters_without_losing_bytes(trained):
    ids = trained.encode("日本")  # unseen characters fall back to single-byte tokens
    assert len(ids) == 6 and b"".join(trained.token_bytes[i] for i in ids) == "日本".encode()
    assert trained.decode(ids[:2]) == "\ufffd"  # half a character decodes to a replacement, as tiktoken's does


def test_trained_bpe_end_of_text_is_special_and_its_text_is_plain(trained):
    assert trained.eot_id is not None and trained.decode([trained.eot_id]) == END_OF_TEXT
    ids = trained.encode(f"a{END_OF_TEXT}b")
    assert trained.eot_id not in ids and trained.decode(ids) == f"a{END_OF_TEXT}b"


def test_trained_bpe_is_deterministic_and_saved_as_a_folder(trained, shakespeare_path, tmp_path):
    again = train_bpe(shakespeare_path.read_text()[:300_000], 600)
    assert again.spec == trained.spec
    file = trained.save(tmp_path / "tok")
    assert file.name == "tokenizer.json"
    assert BPETokenizer.from_dir(tmp_path / "tok").encode(TEXT) == trained.encode(TEXT)
    with pytest.raises(FileExistsError, match="exists"):
        trained.save(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        BPETokenizer.from_dir(tmp_path / "missing")


@pytest.mark.parametrize("vocab_size", [0, 256, 2**16 + 1, 10**9])
def test_bpe_vocab_size_out_of_range_is_refused(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be between 257"):
        train_bpe(TEXT, vocab_size)


def test_bpe_names_and_malformed_files():
    assert bpe_vocab_size("bpe:4096") == 4096 and bpe_vocab_size("gpt2") is None
    with pytest.raises(ValueError, match="bpe:4096"):
        bpe_vocab_size("bpe:4k")
    with pytest.raises(ValueError, match="tokenizer.json"):
        BPETokenizer("{not json")


@pytest.mark.parametrize("kind", ["bpe", "char", "trained"])
def test_state_restores_an_identical_tokenizer(kind, trained):
    tok = {"bpe": TiktokenTokenizer("gpt2"), "char": CharTokenizer.from_text(TEXT), "trained": trained}[kind]
    restored = tokenizer_from_state(tok.state_dict())
    assert restored.encode(TEXT) == tok.encode(TEXT)
    assert restored.vocab_size == tok.vocab_size


def test_unknown_encoding_names_the_choices():
    with pytest.raises(ValueError, match="gpt2"):
        TiktokenTokenizer("no-such-encoding")


def test_build_tokenizer_by_name():
    assert build_tokenizer("char", TEXT).state_dict() == CharTokenizer.from_text(TEXT).state_dict()
    assert build_tokenizer("gpt2").state_dict() == {"kind": "tiktoken", "name": "gpt2"}
    with pytest.raises(ValueError, match="needs the corpus text"):
        build_tokenizer("char")
