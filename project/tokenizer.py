"""Tokenizers: GPT-2 BPE through tiktoken, characters drawn from the corpus, or a byte-level BPE trained on
the corpus with Hugging Face `tokenizers`.

All share one small interface, and all can be written to a plain dict (`state_dict`) that checkpoints
carry, so a checkpoint decodes its own samples without the data folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
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
            raise ValueError(f"unknown tokenizer {name!r}: use 'gpt2', 'char', 'bpe:N' (e.g. bpe:4096) or a folder "
                             f"written by train-tokenizer ({err})") from None
        except OSError as err:  # not in tiktoken's cache and the download failed (requests errors are OSErrors)
            cache = os.environ.get("TIKTOKEN_CACHE_DIR") or "tiktoken's default cache folder"
            raise ConnectionError(
                f"the {name!r} BPE files are not in {cache} and could not be downloaded ({type(err).__name__}); "
                "offline? copy them there once from a machine online (set TIKTOKEN_CACHE_DIR), or use 'char'"
            ) from None
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


END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator; the trained BPE's only special token
TOKENIZER_FILE = "tokenizer.json"  # a trained BPE's folder holds this one file (Hugging Face's format)
MIN_BPE_VOCAB = 257  # the 256 byte tokens (every text stays encodable) + end-of-text
MAX_BPE_VOCAB = 2**16  # token ids must fit the uint16 token files; far beyond what a corpus of this size supports


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level mapping, inverted: the printable character standing for each byte -> the byte.

    Byte-level BPE spells every byte as a printable character (bytes that are printable Latin-1 stand for
    themselves, the others are shifted past 255), so vocabulary entries are strings and merges never meet
    whitespace or control characters.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {chr(b): b for b in printable}
    chars.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return chars


class BPETokenizer:
    """A byte-level BPE trained with Hugging Face `tokenizers` (`train_bpe`), held as its tokenizer.json text.

    Every byte is a token, so any text round-trips exactly. "<|endoftext|>" is the one special token (`eot_id`,
    for separating documents), while the same characters inside a text encode as plain text, as tiktoken's
    `encode_ordinary` does for GPT-2.
    """

    def __init__(self, spec: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.backend = RustTokenizer.from_str(spec)
        except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"not a Hugging Face tokenizer.json ({str(err).splitlines()[0][:200]})") from None
        if type(self.backend.model).__name__ != "BPE" or type(self.backend.pre_tokenizer).__name__ != "ByteLevel":
            raise ValueError("expected a byte-level BPE tokenizer.json, as `python -m project train-tokenizer` writes")
        self.backend.encode_special_tokens = True  # "<|endoftext|>" in a text is text, not the separator
        self.spec = spec
        self.vocab_size = self.backend.get_vocab_size()
        self.eot_id = self.backend.token_to_id(END_OF_TEXT)
        alphabet = byte_level_alphabet()
        specials = {token.content for token in self.backend.get_added_tokens_decoder().values()}
        self.token_bytes: list[bytes] = []  # id -> the bytes it stands for
        for i in range(self.vocab_size):
            piece = self.backend.id_to_token(i)
            self.token_bytes.append(piece.encode("utf-8") if piece in specials else bytes(alphabet[c] for c in piece))

    @classmethod
    def from_dir(cls, path: str | Path) -> BPETokenizer:
        """The tokenizer a `train-tokenizer` folder holds."""
        file = Path(path) / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: pass a folder written by `python -m project train-tokenizer`")
        return cls(file.read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json into the new folder `path`, all at once: a reader never sees it half-written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        (staging / TOKENIZER_FILE).write_text(self.spec, encoding="utf-8")
        try:
            staging.rename(path)
        except OSError:  # a non-empty folder is in the way
            shutil.rmtree(staging, ignore_errors=True)
            raise FileExistsError(f"{path} exists: choose another folder or remove it") from None
        return path / TOKENIZER_FILE

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")  # a token may end mid-character

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def state_dict(self) -> dict:
        return {"kind": "bpe", "tokenizer_json": self.spec}  # the whole tokenizer: checkpoints need no folder


def train_bpe(text: str, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + end-of-text + merges) on `text`.

    The vocabulary can come out smaller when the text has fewer distinct pairs worth merging.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise ValueError(f"vocab_size must be between {MIN_BPE_VOCAB} (256 bytes + end-of-text) and {MAX_BPE_VOCAB}, "
                         f"got {vocab_size}: try 4096")
    backend = RustTokenizer(models.BPE())
    # GPT-2's pre-tokenizer: split on its regex (words, numbers, punctuation, runs of spaces), then bytes
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes
    backend.train_from_iterator([text], trainer)
    return BPETokenizer(backend.to_str())


def bpe_vocab_size(name: str) -> int | None:
    """N for a `--data.tokenizer bpe:N` value (a BPE trained on the corpus on first use), else None."""
    if not name.startswith("bpe:"):
        return None
    size = name.removeprefix("bpe:")
    if not size.isdigit():
        raise ValueError(f"--data.tokenizer {name!r}: write bpe:N with N the vocabulary size, e.g. bpe:4096")
    return int(size)


def is_tokenizer_folder(name: str) -> bool:
    """Whether a `--data.tokenizer` value names a folder (written by train-tokenizer) rather than a kind."""
    return "/" in name or os.sep in name or Path(name).is_dir()


def build_tokenizer(name: str, text: str = "") -> Tokenizer:
    """A tokenizer by `--data.tokenizer` value: "char" for the characters of `text` (the corpus), a folder written
    by `train-tokenizer`, or a tiktoken encoding ("gpt2"). `bpe:N` is trained on the corpus by the data module."""
    if name == "char":
        if not text:
            raise ValueError("a character vocabulary needs the corpus text to draw its characters from")
        return CharTokenizer.from_text(text)
    if is_tokenizer_folder(name):
        return BPETokenizer.from_dir(name)
    return TiktokenTokenizer(name)


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.state_dict()` (as stored in checkpoints)."""
    if state.get("kind") == "tiktoken":
        return TiktokenTokenizer(state["name"])
    if state.get("kind") == "char":
        return CharTokenizer(state["chars"])
    if state.get("kind") == "bpe":
        return BPETokenizer(state["tokenizer_json"])
    raise ValueError(f"unrecognised tokenizer state kind {state.get('kind')!r}: expected 'tiktoken', 'char' or 'bpe'")
