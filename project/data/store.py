"""Token stores: a corpus tokenized once, its token ids per split, and the record (meta.json) that describes them.

Two stores share one record, `TokenStoreRecord`: the memmap store here (one text file -> <folder>/{train,val,test}.bin,
numpy-readable token files), and litdata chunks for bigger corpora (project/data/streaming.py). The record carries
a format version and a checksum of its own fields, so a record of another version, or one edited by hand (its dtype,
say), is never trusted; the memmap store also records each token file's size, mtime and SHA-256, compared in that
order (a file whose size and mtime match is not read again).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from project.data.corpus import Split, sha256_of
from project.files import atomic_write
from project.tokenizer import Tokenizer

RECORD_FILE = "meta.json"
STORE_FORMAT = 3  # bump when the record or the token layout changes: older stores are rebuilt (or refused)


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id: half the bytes of uint32 for GPT-2."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class StoreRecordError(ValueError):
    """A token store's record is missing, of another format version, or altered."""


@dataclass
class TokenStoreRecord:
    """meta.json of a token store: what the tokens are and how many there are per split.

    `text_bytes` (UTF-8 bytes of each split's text) turns a loss per token into bits per byte. `files` (memmap
    store only) holds each token file's size, mtime and SHA-256.
    """

    tokenizer: dict  # Tokenizer.state_dict()
    dtype: str
    split: dict  # Split's fields
    tokens: dict[str, int]
    text_bytes: dict[str, int]
    files: dict[str, dict] = field(default_factory=dict)
    format: int = STORE_FORMAT

    def checksum(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "checksum": self.checksum()}, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> TokenStoreRecord:
        """The record in `text`; StoreRecordError naming the problem for anything else."""
        try:
            data = json.loads(text)
            stored_checksum = data.pop("checksum")
            if data.get("format") != STORE_FORMAT:
                raise StoreRecordError(f"{where} is of store format {data.get('format')}, this project reads "
                                       f"{STORE_FORMAT}")
            record = cls(**{f.name: data[f.name] for f in fields(cls)})
        except StoreRecordError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreRecordError(f"{where} is unreadable ({type(err).__name__})") from None
        if record.checksum() != stored_checksum or set(data) != {f.name for f in fields(cls)}:
            raise StoreRecordError(f"{where} was altered after it was written (its checksum does not match)")
        if record.dtype not in ("uint16", "uint32"):
            raise StoreRecordError(f"{where} names an unknown token type {record.dtype!r}")
        return record

    def save(self, folder: Path) -> None:
        atomic_write(folder / RECORD_FILE, self.to_json())

    @classmethod
    def load(cls, folder: Path) -> TokenStoreRecord:
        path = folder / RECORD_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise StoreRecordError(f"{path} is unreadable ({type(err).__name__})") from None
        return cls.from_json(text, str(path))

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token in `split`: turns nats per token into bits per byte."""
        return self.text_bytes[split] / self.tokens[split]


def file_record(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(path)}


def file_problem(path: Path, recorded: dict) -> str | None:
    """Why `path` is not the file `recorded` describes, or None. Size first, then mtime, then (only when the
    mtime differs, e.g. after a copy) the checksum: an intact store is never read whole at start-up."""
    if not path.is_file():
        return f"{path.name} is missing"
    stat = path.stat()
    if stat.st_size != recorded.get("size"):
        return f"{path.name} is not the size the record says"
    if stat.st_mtime_ns == recorded.get("mtime_ns"):
        return None
    if sha256_of(path) != recorded.get("sha256"):
        return f"{path.name} does not match its checksum"
    return None


def store_problem(folder: Path) -> str | None:
    """Why a memmap token store cannot be used (record unreadable, altered or of another format, a token file
    missing, cut short or changed), or None when it is intact."""
    try:
        record = TokenStoreRecord.load(folder)
    except StoreRecordError as err:
        return str(err)
    for name, recorded in record.files.items():
        if problem := file_problem(folder / name, recorded):
            return problem
    return None


def write_memmap_store(folder: Path, text: str, tokenizer: Tokenizer, split: Split, min_tokens: int,
                       source: Path) -> TokenStoreRecord:
    """Tokenize `text` split by `split` into <folder>/<split>.bin files plus the record. The training and validation
    splits must hold at least `min_tokens` tokens (one window); a test split too short for a window is stored all
    the same, and `test` says so when it runs."""
    dtype = token_dtype(tokenizer.vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    tokens, text_bytes, files = {}, {}, {}
    for name, part in split.cut(text).items():
        if name == "test" and not part:
            continue  # no test split asked for
        ids = np.array(tokenizer.encode(part), dtype=dtype)
        if len(ids) < min_tokens and name != "test":
            raise ValueError(f"the {name} split of {source} has {len(ids)} tokens, fewer than one window of "
                             f"{min_tokens - 1}: use a longer corpus or a smaller --model.config.block_size")
        atomic_write(folder / f"{name}.bin", ids.tobytes())
        tokens[name], text_bytes[name] = int(len(ids)), len(part.encode("utf-8"))
        files[f"{name}.bin"] = file_record(folder / f"{name}.bin")
    record = TokenStoreRecord(tokenizer.state_dict(), dtype, asdict(split), tokens, text_bytes, files)
    record.save(folder)
    return record


class MemmapWindows:
    """The non-overlapping (block_size + 1)-token windows of a token file, as litdata's TokensLoader cuts chunks."""

    def __init__(self, tokens_path: Path, dtype: str, block_size: int) -> None:
        self.tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
        self.length = block_size + 1

    def __len__(self) -> int:
        return len(self.tokens) // self.length

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i * self.length : (i + 1) * self.length]

