"""Tokenizers: GPT-2 BPE through tiktoken, or characters drawn from the corpus.

Both share one small interface, and both can be written to a plain dict (`state_dict`) that checkpoints
carry, so a checkpoint decodes its own samples without the data folder.
"""

from __future__ import annotations

from typing import Protocol

import tiktoken


class Tokenizer(Protocol):
    """What the rest of the project needs from a tokenizer."""

    vocab_size: int
    eot_id: int | None  # end-of-text token id, if the vocabulary has one

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...

    def state_dict(self) -> dict: ...


class TiktokenTokenizer:
    """A tiktoken encoding (GPT-2 BPE by default). Special tokens in text are encoded as plain text."""

    def __init__(self, name: str = "gpt2") -> None:
        try:
            self.encoding = tiktoken.get_encoding(name)
        except ValueError as err:  # unknown encoding name
            raise ValueError(f"unknown tiktoken encoding {name!r}: use 'gpt2' or 'char' ({err})") from None
        self.name = name
        self.vocab_size = self.encoding.n_vocab
        self.eot_id = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def state_dict(self) -> dict:
        return {"kind": "tiktoken", "name": self.name}


class CharTokenizer:
    """One token per distinct character of the corpus, ids in sorted character order."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("character vocabulary has duplicates")
        self.chars = chars
        self.vocab_size = len(chars)
        self.eot_id = None
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in this model's vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def state_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}


def build_tokenizer(name: str, text: str = "") -> Tokenizer:
    """A new tokenizer by name: a tiktoken encoding ("gpt2"), or "char" for the characters of `text` (the corpus)."""
    if name == "char":
        if not text:
            raise ValueError("a character vocabulary needs the corpus text to draw its characters from")
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer(name)


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.state_dict()` (as stored in checkpoints)."""
    if state.get("kind") == "tiktoken":
        return TiktokenTokenizer(state["name"])
    if state.get("kind") == "char":
        return CharTokenizer(state["chars"])
    raise ValueError(f"unrecognised tokenizer state {state!r}: expected kind 'tiktoken' or 'char'")
