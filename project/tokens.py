"""The part of the data pipeline both token stores share: text -> token ids -> (x, y) windows.

    reader: project/data.py (one text file -> numpy memmap) or project/streaming.py (a folder -> litdata chunks)
      -> read_text (UTF-8 or a one-line error), split_text (the last val_fraction of the characters is val)
      -> token ids stored as token_dtype(vocab_size), with meta.json (tokenizer, bytes and tokens per split)
      -> windows of block_size + 1 tokens -> inputs_and_targets: (x, y), y = x shifted by one
      -> ValWindows: fixed, evenly spaced windows, the same val loss on every run

A reader only has to store tokens and hand back windows: a validation window is the i-th non-overlapping
(block_size + 1)-token slice of the val split in both stores, so both give the same val loss on the same text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def check_val_fraction(val_fraction: float) -> None:
    """ValueError unless 0 < val_fraction < 1."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def read_text(path: Path) -> str:
    """The text of a UTF-8 file, or a one-line ValueError saying how to re-encode it."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 (byte {err.start}): re-encode it, e.g. iconv -t utf-8") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train part, val part): the last val_fraction of the characters are held out for validation."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id: half the bytes of uint32 for GPT-2."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash or a concurrent rank never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def inputs_and_targets(windows: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate (block_size + 1)-token windows into int64 (x, y), where y is x shifted by one token."""
    batch = torch.from_numpy(np.stack([np.asarray(w) for w in windows]).astype(np.int64))
    return batch[:, :-1], batch[:, 1:]  # (B, T) each


class ValWindows(Dataset):
    """Fixed, evenly spaced picks of a store's validation windows: the same val loss on every run.

    `windows` is any sequence of (block_size + 1)-token windows (a memmap's or litdata's). A map-style
    dataset, so Lightning's DistributedSampler splits and pads it: every rank gets at least one batch.
    """

    def __init__(self, windows: Sequence, block_size: int, max_windows: int | None, source: str) -> None:
        self.windows = windows
        available = len(windows)
        if available < 1:
            raise ValueError(
                f"the val split of {source} has fewer tokens than one window of {block_size + 1}: "
                "use more text, a larger val_fraction or a smaller block_size"
            )
        count = available if max_windows is None else max(1, min(available, max_windows))
        self.indices = np.linspace(0, available - 1, count).astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = inputs_and_targets([self.windows[int(self.indices[i])]])
        return x[0], y[0]
