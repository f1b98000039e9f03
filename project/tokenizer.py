"""Tokenizers: GPT-2 BPE through tiktoken, characters drawn from the corpus, or a byte-level BPE trained on
the corpus with Hugging Face `tokenizers`.

All share one small interface, and all can be written to a plain dict (`state_dict`) that checkpoints
carry, so a checkpoint decodes its own samples without the data folder.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from project.files import atomic_path


class Tokenizer(ABC):
    """What the rest of the project needs from a tokenizer, and its identity: the `kind` its stored state names,
    how it describes itself, and how it exports (a Hugging Face `tokenizers` backend with the same ids, and the
    llama.cpp tokenizer model that reproduces them).
    """

    kind: ClassVar[str]  # "tiktoken", "char" or "bpe": the key of `state_dict()` and of KINDS
    gguf_model: ClassVar[str]  # llama.cpp's tokenizer model with the same ids: "gpt2" (byte-level BPE) or "rwkv"
    vocab_size: int
    eot_id: int | None  # end-of-text token id, if the vocabulary has one

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes the tokens stand for (a token may end in the middle of a multi-byte character)."""

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def state_dict(self) -> dict:
        """Plain values (checkpoints load weights-only) that `tokenizer_from_state` turns back into this tokenizer."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict) -> Tokenizer: ...

    @abstractmethod
    def describe(self) -> str:
        """One line for people: what kind of tokenizer, how many tokens."""

    @abstractmethod
    def hf_backend(self):
        """A Hugging Face `tokenizers.Tokenizer` that encodes text to the same ids (for exports)."""

    def fits_model(self, vocab_size: int) -> bool:
        """Whether a model with `vocab_size` output rows can use this tokenizer (rows may be padded)."""
        return self.vocab_size <= vocab_size

    @property
    def eot_text(self) -> str | None:
        """The end-of-text token as text, or None."""
        return None if self.eot_id is None else self.decode([self.eot_id])


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding (GPT-2 BPE by default). Special tokens in text are encoded as plain text."""

    kind, gguf_model = "tiktoken", "gpt2"

    def __init__(self, name: str = "gpt2") -> None:
        import tiktoken

        try:
            self.encoding = tiktoken.get_encoding(name)
        except ValueError as err:  # unknown encoding name
            folder = f" (for the folder {name}, write ./{name})" if Path(name).is_dir() else ""
            raise ValueError(f"unknown tokenizer {name!r}{folder}: use 'gpt2', 'char', 'bpe:N' (e.g. bpe:4096) or the "
                             f"path of a folder written by train-tokenizer ({err})") from None
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
        return {"kind": self.kind, "name": self.name}

    @classmethod
    def from_state(cls, state: dict) -> TiktokenTokenizer:
        return cls(state["name"])

    def describe(self) -> str:
        return f"tiktoken {self.name} BPE ({self.vocab_size:,} tokens)"

    def hf_backend(self):
        from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS
        from transformers.convert_slow_tokenizer import TikTokenConverter

        if self.name not in ENCODING_CONSTRUCTORS:
            raise ValueError(f"cannot export tiktoken encoding {self.name!r}: only OpenAI's public encodings")
        spec = ENCODING_CONSTRUCTORS[self.name]()  # the constructor's arguments: pat_str, mergeable_ranks, ...

        class RanksConverter(TikTokenConverter):
            # the ranks tiktoken itself uses (from its cache), not a file looked up (or downloaded) again
            def load_tiktoken_bpe(self, _vocab_file):
                return spec["mergeable_ranks"]

        return RanksConverter(vocab_file=self.name, pattern=spec["pat_str"],
                              extra_special_tokens=spec["special_tokens"]).converted()


class CharTokenizer(Tokenizer):
    """One token per distinct character of the corpus, ids in sorted character order."""

    kind, gguf_model = "char", "rwkv"  # rwkv: llama.cpp's greedy longest match over raw bytes, no special tokens

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str) or not chars:
            raise ValueError("a character vocabulary must be a non-empty string of characters")
        if len(set(chars)) != len(chars):
            raise ValueError("character vocabulary has duplicates")
        self.chars = chars
        self.vocab_size = len(chars)
        self.eot_id = None
        self.ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in this model's vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_state(cls, state: dict) -> CharTokenizer:
        return cls(state["chars"])

    def describe(self) -> str:
        return f"characters ({self.vocab_size} symbols)"

    def fits_model(self, vocab_size: int) -> bool:
        return self.vocab_size == vocab_size  # one id per character: the model's rows are exactly these

    def hf_backend(self):
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer

        backend = RustTokenizer(models.WordLevel({c: i for i, c in enumerate(self.chars)}, unk_token=None))
        # every code point is its own piece ([\s\S] also matches newlines); decoding concatenates without spaces
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return backend

    @classmethod
    def from_hf_spec(cls, spec: dict) -> CharTokenizer | None:
        """The character vocabulary of an exported tokenizer.json (a WordLevel model), or None for another kind."""
        model = spec.get("model") or {}
        if model.get("type") != "WordLevel":
            return None
        vocab = model.get("vocab") or {}
        return cls("".join(sorted(vocab, key=vocab.get)))


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


class BPETokenizer(Tokenizer):
    """A byte-level BPE held as its Hugging Face tokenizer.json text: one trained with `train_bpe`, or any
    byte-level BPE tokenizer.json (GPT-2's as `export` writes it, for example), so it needs no tiktoken cache.

    Every byte is a token, so any text round-trips exactly. "<|endoftext|>" is the special token (`eot_id`, for
    separating documents), while the same characters inside a text encode as plain text, as tiktoken's
    `encode_ordinary` does for GPT-2.
    """

    kind, gguf_model = "bpe", "gpt2"

    def __init__(self, spec: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.backend = RustTokenizer.from_str(spec)
        except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"not a Hugging Face tokenizer.json ({str(err).splitlines()[0][:200]})") from None
        if type(self.backend.model).__name__ != "BPE" or type(self.backend.decoder).__name__ != "ByteLevel":
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
            if piece is None:
                raise ValueError(f"this tokenizer.json has no token with id {i}: its ids must be 0..{self.vocab_size - 1}")
            try:
                self.token_bytes.append(piece.encode("utf-8") if piece in specials
                                        else bytes(alphabet[c] for c in piece))
            except KeyError as err:
                raise ValueError(f"token {i} ({piece!r}) has the character {err.args[0]!r}, which no byte stands "
                                 "for in a byte-level BPE: the tokenizer.json was edited or is not byte-level") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> BPETokenizer:
        """The tokenizer a `train-tokenizer` folder holds."""
        file = Path(path) / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: pass a folder written by `python -m project train-tokenizer`")
        return cls(file.read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json into the new folder `path`, all at once: a reader never sees it half-written."""
        with atomic_path(path, folder=True) as staging:
            (staging / TOKENIZER_FILE).write_text(self.spec, encoding="utf-8")
        return Path(path) / TOKENIZER_FILE

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self.spec}  # the whole tokenizer: checkpoints need no folder

    @classmethod
    def from_state(cls, state: dict) -> BPETokenizer:
        return cls(state["tokenizer_json"])

    def describe(self) -> str:
        return f"byte-level BPE ({self.vocab_size:,} tokens)"

    def hf_backend(self):
        from tokenizers import Tokenizer as RustTokenizer

        return RustTokenizer.from_str(self.spec)  # the tokenizer itself, merges and all

    @classmethod
    def from_hf_spec(cls, spec: dict) -> BPETokenizer | None:
        """An exported byte-level BPE tokenizer.json, or None for another kind."""
        if (spec.get("model") or {}).get("type") != "BPE":
            return None
        return cls(json.dumps(spec))


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
    """Whether a `--data.tokenizer` value names a folder (written by train-tokenizer) rather than a kind: a path
    with a separator (tokenizers/mine, ./mine). A bare name is a kind, so a folder called gpt2 never shadows it."""
    return "/" in name or os.sep in name


def tokenizer_spec(folder: str | Path) -> str:
    """The `--data.tokenizer` value naming a tokenizer folder: its path, with ./ before a bare name."""
    return str(folder) if is_tokenizer_folder(str(folder)) else f".{os.sep}{folder}"


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


KINDS: dict[str, type[Tokenizer]] = {cls.kind: cls for cls in (TiktokenTokenizer, CharTokenizer, BPETokenizer)}


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.state_dict()` (as stored in checkpoints); ValueError for a state that
    is not one (an unknown kind, missing or mistyped fields)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in KINDS:
        raise ValueError(f"unrecognised tokenizer state kind {kind!r}: expected one of {', '.join(KINDS)}")
    try:
        return KINDS[kind].from_state(state)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"the stored {kind} tokenizer is incomplete or damaged ({type(err).__name__}: {err})") from None


def tokenizer_from_hf_file(path: str | Path) -> Tokenizer:
    """The tokenizer of an exported tokenizer.json (characters or a byte-level BPE), without tiktoken or network."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): export or download it again") from None
    for kind in (CharTokenizer, BPETokenizer):
        tokenizer = kind.from_hf_spec(spec) if isinstance(spec, dict) else None
        if tokenizer is not None:
            return tokenizer
    raise ValueError(f"{path} is neither a character vocabulary nor a byte-level BPE: cannot use it")


def spec_kind(name: str) -> str:
    """The tokenizer kind a `--data.tokenizer` value builds: "char", "bpe" (bpe:N or a folder) or "tiktoken"."""
    if name == "char":
        return "char"
    if bpe_vocab_size(name) is not None or is_tokenizer_folder(name):
        return "bpe"
    return "tiktoken"
