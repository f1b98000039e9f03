"""Tokenizers round-trip text and restore from the state a checkpoint stores."""

import pytest

from project.tokenizer import CharTokenizer, TiktokenTokenizer, build_tokenizer, tokenizer_from_state

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


@pytest.mark.parametrize("tok", [TiktokenTokenizer("gpt2"), CharTokenizer.from_text(TEXT)], ids=["bpe", "char"])
def test_state_restores_an_identical_tokenizer(tok):
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
