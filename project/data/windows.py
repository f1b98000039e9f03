"""Token windows, the unit of training: (block_size + 1) consecutive tokens become inputs x and targets y = x
shifted by one. Both stores hand out the same windows: random ones for training, fixed ones for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def inputs_and_targets(windows: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate (block_size + 1)-token windows into int64 (x, y), where y is x shifted by one token."""
    batch = torch.from_numpy(np.stack([np.asarray(w) for w in windows]).astype(np.int64))
    return batch[:, :-1], batch[:, 1:]  # (B, T) each


class TrainWindows(IterableDataset):
    """Endless random (block_size + 1)-token windows of a token file, yielded as whole batches (x, y).

    Global batch number i, `batch_size` windows for each of the `replicas` data-parallel ranks, is a pure function
    of (seed, i), and rank r takes its r-th slice: streams repeat between runs, differ between ranks, and can
    resume at any batch (`start_batch`), also on another number of ranks: 2 ranks of batch_size B/2 read exactly
    the windows 1 rank of B reads. DataLoader workers take every n-th batch, and the loader interleaves them
    back in order.
    """

    def __init__(self, tokens_path: Path, dtype: str, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, start_batch: int = 0, replicas: int = 1) -> None:
        self.tokens_path, self.dtype = tokens_path, dtype
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.start_batch, self.replicas = seed, rank, start_batch, replicas

    def batch(self, tokens: np.ndarray, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of global batch `index`: windows at random offsets, not only at multiples of the
        window length."""
        rng = np.random.default_rng([self.seed, 0, index])
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size * self.replicas)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return inputs_and_targets([tokens[s : s + self.block_size + 1] for s in mine])

    def __iter__(self):
        tokens = np.memmap(self.tokens_path, dtype=self.dtype, mode="r")
        worker = get_worker_info()
        step, offset = (worker.num_workers, worker.id) if worker else (1, 0)
        index = self.start_batch + offset
        while True:
            yield self.batch(tokens, index)
            index += step


class EvalWindows(Dataset):
    """Fixed, evenly spaced picks of a store's validation (or test) windows: the same loss on every run.

    `windows` is any sequence of (block_size + 1)-token windows (a memmap's or litdata's). A map-style
    dataset, so Lightning's DistributedSampler splits and pads it: every rank gets at least one batch.
    """

    def __init__(self, windows: Sequence, block_size: int, max_windows: int | None, source: str) -> None:
        self.windows = windows
        available = len(windows)
        if available < 1:
            raise ValueError(
                f"{source} has fewer tokens than one window of {block_size + 1}: use more text, a larger "
                "fraction for that split or a smaller block_size"
            )
        count = available if max_windows is None else max(1, min(available, max_windows))
        self.indices = np.linspace(0, available - 1, count).astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = inputs_and_targets([self.windows[int(self.indices[i])]])
        return x[0], y[0]
