"""Text -> token file -> token windows, wrapped as a LightningDataModule.

    corpus (TinyShakespeare, downloaded and checksummed, or any UTF-8 file)
      -> tokenizer (GPT-2 BPE, characters, or a byte-level BPE trained on the training split), once,
         90/10 split by characters
      -> <data_dir>/tokens/<corpus>-<tokenizer>-<hash>/{train,val}.bin (numpy memmap) + meta.json
      -> train: endless seeded random windows, a distinct stream per rank; val: fixed windows

Corpora bigger than RAM: `python -m project prepare` (project/streaming.py) writes litdata chunks, and
`streaming_dir` streams them instead of the single file. Both readers share everything after the read
(project/tokens.py): the split, the token type, the windows and the (x, y) shift.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from project import streaming
from project.tokenizer import (TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer, bpe_vocab_size, build_tokenizer,
                               is_tokenizer_folder, tokenizer_from_state, train_bpe)
from project.tokens import (ValWindows, atomic_write_bytes, check_val_fraction, inputs_and_targets, read_text,
                            split_text, token_dtype)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_VERSION = 2  # bump when the token file layout changes, so stale caches are rebuilt


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
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, data)


def token_cache_problem(folder: Path) -> str | None:
    """Why a token cache folder cannot be used (half-written meta.json, a token file of another size or
    checksum than meta.json records), or None when it is intact."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        files = meta["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return f"meta.json unreadable: {type(err).__name__}"
    for name in ("train.bin", "val.bin"):
        record, path = files.get(name) or {}, folder / name
        if not path.is_file() or path.stat().st_size != record.get("bytes"):
            return f"{name} is not the size meta.json records"
        if sha256_of(path) != record.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def read_corpus(path: Path) -> str:
    """The corpus text, or a one-line error naming what is wrong with the file."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty: pass --data.path pointing to a file with text")
    return text


def train_tokenizer(path: str | Path, vocab_size: int, out: str | Path) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens on the UTF-8 file `path` and save it as the new folder `out`
    (its tokenizer.json), for `--data.tokenizer OUT`."""
    path, out = Path(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another --out or remove it")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist: pass --path pointing to a UTF-8 text file")
    tokenizer = train_bpe(read_corpus(path), vocab_size)  # refuses a bad vocab_size before training
    tokenizer.save(out)
    return tokenizer


class TrainWindows(IterableDataset):
    """Endless random (block_size + 1)-token windows, yielded as whole batches (x, y).

    Batch number i of rank r is a pure function of (seed, r, i): streams differ between ranks, repeat
    between runs, and can resume at any batch (`start_batch`). DataLoader workers take every n-th batch,
    and the loader interleaves them back in order.
    """

    def __init__(self, tokens_path: Path, dtype: str, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, start_batch: int = 0) -> None:
        self.tokens_path, self.dtype = tokens_path, dtype
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.start_batch = seed, rank, start_batch

    def batch(self, tokens: np.ndarray, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index`: windows at random offsets, not only at multiples of the window length."""
        rng = np.random.default_rng([self.seed, self.rank, index])
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
        return inputs_and_targets([tokens[s : s + self.block_size + 1] for s in starts])

    def __iter__(self):
        tokens = np.memmap(self.tokens_path, dtype=self.dtype, mode="r")
        worker = get_worker_info()
        step, offset = (worker.num_workers, worker.id) if worker else (1, 0)
        index = self.start_batch + offset
        while True:
            yield self.batch(tokens, index)
            index += step


class MemmapWindows:
    """The non-overlapping (block_size + 1)-token windows of a token file, as litdata's TokensLoader cuts chunks."""

    def __init__(self, tokens_path: Path, dtype: str, block_size: int) -> None:
        self.tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
        self.length = block_size + 1

    def __len__(self) -> int:
        return len(self.tokens) // self.length

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i * self.length : (i + 1) * self.length]


class TextDataModule(LightningDataModule):
    """TinyShakespeare (downloaded when missing) or any UTF-8 text file, tokenized once and streamed.

    Args:
        path: corpus file; None means TinyShakespeare at <data_dir>/tinyshakespeare/input.txt.
        data_dir: where downloads and token caches live.
        tokenizer: a tiktoken encoding name ("gpt2"), "char" for a character vocabulary of the corpus,
            "bpe:N" for a byte-level BPE of N tokens trained on the training split on first use (cached under
            <data_dir>/tokenizers), or a folder written by `python -m project train-tokenizer`.
        vocabulary: with tokenizer "char", the characters in id order; with "bpe:N", the tokenizer.json text.
            None derives it from the corpus. The CLI fills it from the checkpoint when one is given, so
            predicting needs no corpus.
        block_size: tokens per training window (linked from the model's config by the CLI).
        batch_size: windows per batch.
        val_fraction: tail fraction of the text (by characters) held out for validation.
        max_val_windows: cap on validation windows (None = every non-overlapping window).
        num_workers: DataLoader worker processes for the training stream.
        seed: seed of the training stream.
        prompts: prompts that `predict` completes.
        streaming_dir: a folder (or s3://... prefix) written by `python -m project prepare`: train and val
            stream from its litdata chunks instead of `path`, and the tokenizer comes from its meta.json.
    """

    def __init__(
        self,
        path: str | None = None,
        data_dir: str = "data",
        tokenizer: str = "gpt2",
        vocabulary: str | None = None,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        max_val_windows: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        prompts: list[str] | None = None,
        streaming_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_val_fraction(val_fraction)
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                   ("max_val_windows", max_val_windows, 1)):
            if value is not None and value < least:
                raise ValueError(f"--data.{name} must be >= {least}, got {value}"
                                 + (" (null = every window)" if name == "max_val_windows" else ""))
        self.data_dir = Path(data_dir)
        if self.data_dir.is_file():
            raise NotADirectoryError(f"--data.data_dir {data_dir} is a file: pass a folder (downloads and token "
                                     "caches go there)")
        self.path = Path(path) if path else self.data_dir / "tinyshakespeare" / "input.txt"
        self.is_shakespeare = path is None
        self.tokenizer_name, self.vocabulary = tokenizer, vocabulary
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.max_val_windows = val_fraction, max_val_windows
        self.num_workers, self.seed = num_workers, seed
        self.prompts = prompts if prompts is not None else ["\n"]
        self.streaming_dir = streaming_dir
        self._tokenizer: Tokenizer | None = None
        self.cache_dir: Path | None = None  # set once by find_cache_dir (prepare_data, load_meta): it hashes the corpus
        self.meta: dict | None = None
        self.start_batch = 0  # set from the trainer's step count, so a resumed stream continues where it stopped

    # --- corpus and token cache ----------------------------------------------------------------------

    def ensure_corpus(self) -> None:
        """Download TinyShakespeare when it is the corpus and no local copy exists; verify a local copy."""
        if not self.is_shakespeare:
            if self.path.is_dir():
                raise IsADirectoryError(f"corpus file {self.path} is a folder: pass --data.path pointing to a UTF-8 "
                                        "text file (a folder of files: python -m project prepare)")
            if not self.path.is_file():
                raise FileNotFoundError(f"corpus file {self.path} does not exist: pass --data.path pointing to a UTF-8 text file")
            return
        if not self.path.exists():
            download_shakespeare(self.path)
        elif sha256_of(self.path) != SHAKESPEARE_SHA256:
            raise ValueError(f"{self.path} is not the expected TinyShakespeare (SHA-256 mismatch): delete it to re-download")

    def trained_bpe(self, vocab_size: int) -> BPETokenizer:
        """`bpe:N`: a BPE trained on the training split only (no validation text leaks into the vocabulary),
        trained once per corpus and size and cached under <data_dir>/tokenizers."""
        self.ensure_corpus()
        key = hashlib.sha256(f"{sha256_of(self.path)}:{vocab_size}:{self.val_fraction}".encode()).hexdigest()[:12]
        folder = self.data_dir / "tokenizers" / f"{self.path.stem}-bpe{vocab_size}-{key}"
        if (folder / TOKENIZER_FILE).is_file():
            return BPETokenizer.from_dir(folder)
        train_text, _ = split_text(read_corpus(self.path), self.val_fraction)
        tokenizer = train_bpe(train_text, vocab_size)
        try:
            tokenizer.save(folder)
        except FileExistsError:
            pass  # another rank saved the same tokenizer first (training is deterministic)
        return tokenizer

    def find_cache_dir(self) -> Path:
        """The token cache folder, keyed by corpus content and tokenizer: a changed file or tokenizer never reuses
        stale tokens. Hashes the corpus on the first call only."""
        if self.cache_dir is None:
            name, tokenizer_key = self.tokenizer_name, f"{self.tokenizer_name}:{self.vocabulary}"
            if bpe_vocab_size(self.tokenizer_name) is not None or is_tokenizer_folder(self.tokenizer_name):
                # a trained BPE by content: a folder retrained in place gets new tokens
                name = f"bpe{self.tokenizer.vocab_size}"
                tokenizer_key = hashlib.sha256(self.tokenizer.spec.encode()).hexdigest()
            key = f"{sha256_of(self.path)}:{tokenizer_key}:{self.val_fraction}:{CACHE_VERSION}"
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            self.cache_dir = self.data_dir / "tokens" / f"{self.path.stem}-{name}-{digest}"
        return self.cache_dir

    def prepare_data(self) -> None:
        """Tokenize the corpus once into train.bin / val.bin plus meta.json (the shared token layout)."""
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING:
            return  # predicting completes prompts: no corpus needed
        if self.streaming_dir:
            return  # prepared beforehand by `python -m project prepare`
        self.ensure_corpus()
        out = self.find_cache_dir()
        if self.meta is not None:
            return  # checked once per run
        if (out / "meta.json").exists():
            problem = token_cache_problem(out)
            if problem is None:
                return
            rank_zero_info(f"token cache {out} is damaged ({problem}): rebuilding it")
        text = read_corpus(self.path)
        tokenizer = self.tokenizer
        dtype = token_dtype(tokenizer.vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"tokenizer": tokenizer.state_dict(), "dtype": dtype, "source": str(self.path)}
        for name, part in zip(("train", "val"), split_text(text, self.val_fraction)):
            ids = np.array(tokenizer.encode(part), dtype=dtype)
            if len(ids) < self.block_size + 2:
                raise ValueError(
                    f"the {name} split of {self.path} has {len(ids)} tokens, fewer than one window of "
                    f"{self.block_size + 1}: use a longer corpus or a smaller --model.config.block_size"
                )
            atomic_write_bytes(out / f"{name}.bin", ids.tobytes())
            meta[f"{name}_tokens"] = int(len(ids))
            meta[f"{name}_bytes"] = len(part.encode("utf-8"))
            # sizes and checksums, so a cache cut short or altered later is detected and rebuilt
            meta.setdefault("files", {})[f"{name}.bin"] = {"bytes": ids.nbytes, "sha256": sha256_of(out / f"{name}.bin")}
        atomic_write_bytes(out / "meta.json", json.dumps(meta, indent=2).encode())

    def load_meta(self) -> dict:
        """meta.json of the token store (read once), tokenizing the corpus first when no cache exists yet."""
        if self.meta is None and self.streaming_dir:
            self.meta = streaming.read_meta(self.streaming_dir)
        if self.meta is None:
            self.prepare_data()  # no-op when cached; other ranks find the folder rank 0 wrote
            self.meta = json.loads((self.find_cache_dir() / "meta.json").read_text())
        return self.meta

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer of this data, without tokenizing anything: a character vocabulary needs only the
        corpus' set of characters, BPE needs no corpus (predicting from a checkpoint needs no data folder)."""
        if self.streaming_dir:  # the tokenizer the folder was prepared with, whatever `tokenizer` says
            return tokenizer_from_state(self.load_meta()["tokenizer"])
        if self.tokenizer_name == "char" and self.vocabulary:
            return CharTokenizer(self.vocabulary)
        if self.tokenizer_name == "char":
            self.ensure_corpus()
            return build_tokenizer("char", read_corpus(self.path))
        if (vocab_size := bpe_vocab_size(self.tokenizer_name)) is not None:  # stored, or trained on first use
            return BPETokenizer(self.vocabulary) if self.vocabulary else self.trained_bpe(vocab_size)
        return build_tokenizer(self.tokenizer_name)  # GPT-2 BPE or a trained folder: no corpus needed

    @property
    def tokenizer(self) -> Tokenizer:
        """Built once, on first use (the CLI links vocab_size into the model config before any hook runs)."""
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Linked into the model config by the CLI, so it is never typed twice."""
        return self.tokenizer.vocab_size

    @property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes per token of the validation split: turns nats/token into bits per byte."""
        meta = self.load_meta()
        return meta["val_bytes"] / meta["val_tokens"]

    # --- loaders -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):
            self.load_meta()

    def data_parallel_rank(self) -> tuple[int, int]:
        """(data-parallel ranks, this one's): the ranks of one tensor-parallel group must read the same batches."""
        if self.trainer is None:
            return 1, 0
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("num_replicas", getattr(self.trainer, "world_size", 1)), kwargs.get("rank", self.trainer.global_rank)

    def batches_trained(self) -> int:
        """Training batches the trainer's steps have consumed (restored ones included): where a stream resumes.

        Derived from the step count (restored before the loader is built), not from batches yielded, which
        DataLoader prefetching overcounts; checkpoints are written at optimizer-step boundaries.
        """
        return self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        meta = self.load_meta()
        replicas, rank = self.data_parallel_rank()
        if self.streaming_dir:
            # litdata shards the chunks over ranks and workers; Lightning checkpoints and restores its loader
            start = self.batches_trained()
            return streaming.train_loader(self.streaming_dir, block_size=self.block_size, batch_size=self.batch_size,
                                          seed=self.seed, num_workers=self.num_workers, replicas=(replicas, rank),
                                          consumed=lambda: self.batches_trained() - start)
        if self.trainer is not None:  # resuming: continue the stream after the batches already trained on
            self.start_batch = self.batches_trained()
        windows = TrainWindows(self.find_cache_dir() / "train.bin", meta["dtype"], self.block_size, self.batch_size,
                               self.seed, rank=rank, start_batch=self.start_batch)
        # an own generator: creating the loader's iterator then draws no number from the global RNG, so a
        # resumed run (new iterator after the RNG state is restored) keeps the same dropout stream
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        meta = self.load_meta()
        if self.streaming_dir:  # the readers differ only in where the windows come from
            windows, source = streaming.val_windows(self.streaming_dir, self.block_size), self.streaming_dir
        else:
            windows = MemmapWindows(self.find_cache_dir() / "val.bin", meta["dtype"], self.block_size)
            source = str(self.path)
        windows = ValWindows(windows, self.block_size, self.max_val_windows, source=source)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False, generator=torch.Generator().manual_seed(self.seed))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        # one prompt per batch: prompts have different lengths, and generation needs no padding this way
        return DataLoader(self.prompts, batch_size=1, collate_fn=list)
