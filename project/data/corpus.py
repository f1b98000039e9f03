"""The corpus: TinyShakespeare (downloaded and checksummed) or any UTF-8 text, and its train/val/test split.

Every store (project/data/store.py, project/data/streaming.py) splits text the same way, by `Split`: the last
`test_fraction` of the characters is the test split, the `val_fraction` before it validation, the rest training.
"""

from __future__ import annotations

import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from project.files import atomic_write
from project.tokenizer import BPETokenizer, train_bpe

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SPLITS = ("train", "val", "test")
TextPart = Literal["all", "train", "val", "test"]  # the whole of a text, or one of its splits


@dataclass(frozen=True)
class Split:
    """How text is divided: the tail `test_fraction` of the characters is the test split, the `val_fraction`
    before it validation, the rest training (in every document, for a folder of documents).

    Args:
        val_fraction: the validation share, in (0, 1).
        test_fraction: the test share, in [0, 1) (0: no test split; `test` then refuses to run).
    """

    val_fraction: float = 0.05
    test_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1) (0 = no test split), got {self.test_fraction}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must leave text to train on, got "
                             f"{self.val_fraction} + {self.test_fraction}")

    def cut(self, text: str) -> dict[str, str]:
        """{"train": ..., "val": ..., "test": ...}: consecutive parts of `text`, by characters."""
        test_start = len(text) - round(len(text) * self.test_fraction)  # rounded lengths: 0.9 of 200,000 is 180,000
        val_start = test_start - round(len(text) * self.val_fraction)
        return {"train": text[:val_start], "val": text[val_start:test_start], "test": text[test_start:]}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_shakespeare(dest: Path, url: str = SHAKESPEARE_URL) -> None:
    """Download TinyShakespeare to `dest`, verifying its SHA-256."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as err:
        raise ConnectionError(
            f"could not download TinyShakespeare from {url} ({err}); offline? "
            f"put a local copy at {dest} or pass --data.path /path/to/input.txt"
        ) from None
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise ConnectionError(f"downloaded TinyShakespeare from {url} failed its SHA-256 check; nothing was written")
    atomic_write(dest, data)


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file, or a one-line ValueError saying how to re-encode it."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 (byte {err.start}): re-encode it, e.g. iconv -t utf-8") from None


def read_corpus(path: Path, flag: str = "--data.path") -> str:
    """The corpus text, or a one-line error naming what is wrong with the file (and `flag`, the option that named it)."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty: pass {flag} pointing to a file with text")
    return text


def train_tokenizer(path: str | Path, vocab_size: int, out: str | Path) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens on the UTF-8 file `path` and save it as the new folder `out`
    (its tokenizer.json), for `--data.tokenizer OUT`."""
    path, out = Path(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another --out or remove it")
    if path.is_dir():
        raise IsADirectoryError(f"corpus file {path} is a folder: pass --path pointing to a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist: pass --path pointing to a UTF-8 text file")
    tokenizer = train_bpe(read_corpus(path, flag="--path"), vocab_size)  # refuses a bad vocab_size before training
    tokenizer.save(out)
    return tokenizer
