"""Has the model seen this text? A fingerprint of the training text's lines, kept in every checkpoint.

`fit` stores `line_fingerprint(training split)` in its checkpoints (GPTModule); `evaluate` measures how much of
the text it scores is in it (`overlap`) and warns when that is a noticeable share, since a model's scores on text it
trained on say little about text it has not seen.

The fingerprint is a bottom-k sketch: 63-bit BLAKE2b hashes of the distinct lines of at least MIN_LINE_CHARS
characters (whitespace-stripped: short lines such as speaker names recur everywhere), the MAX_LINES smallest of them
kept. A hash at most the sketch's largest is a uniform sample of both texts, so the share of such lines of the
scored text found in the sketch estimates the share of its lines found in the training text (exactly, when the
training text has at most MAX_LINES long lines, as TinyShakespeare's).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MIN_LINE_CHARS = 24
MAX_LINES = 1 << 16  # 512 KB of int64 at most


def line_hashes(text: str) -> set[int]:
    """63-bit hashes of the distinct whitespace-stripped lines of `text` of at least MIN_LINE_CHARS characters."""
    lines = {line.strip() for line in text.splitlines()}
    return {int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), "big") >> 1
            for line in lines if len(line) >= MIN_LINE_CHARS}


def line_fingerprint(text: str) -> torch.Tensor:
    """The sketch of `text`: its MAX_LINES smallest line hashes, sorted (int64; empty when no line is long enough)."""
    return torch.tensor(sorted(line_hashes(text))[:MAX_LINES], dtype=torch.int64)


@dataclass(frozen=True)
class Overlap:
    """How much of a text the fingerprint holds: `found` of the `compared` lines (the sampled long ones)."""

    found: int
    compared: int

    @property
    def share(self) -> float:
        return self.found / self.compared if self.compared else 0.0


def overlap(text: str, fingerprint: torch.Tensor) -> Overlap:
    """The share of `text`'s long lines that are in the text `fingerprint` was made from (see the module docstring)."""
    if fingerprint.numel() == 0:
        return Overlap(0, 0)
    ceiling = int(fingerprint[-1]) if fingerprint.numel() == MAX_LINES else (1 << 63) - 1
    sampled = [h for h in line_hashes(text) if h <= ceiling]
    known = set(fingerprint.tolist())
    return Overlap(sum(h in known for h in sampled), len(sampled))
