"""Text -> token store -> token windows, wrapped as a LightningDataModule.

    corpus (TinyShakespeare, downloaded and checksummed, or any UTF-8 file), split by `Split` (train | val | test)
      -> tokenizer (GPT-2 BPE, characters, or a byte-level BPE trained on the training split), once
      -> <data_dir>/tokens/<corpus>-<tokenizer>-<hash>/{train,val,test}.bin (numpy memmap) + meta.json
      -> train: endless seeded random windows, a distinct stream per rank; val and test: fixed windows

Corpora bigger than RAM: `python -m project prepare` (project/data/streaming.py) writes litdata chunks, and
`streaming_dir` streams them instead of the single file. Both stores share the split, the record, the windows
and the (x, y) shift (project/data/corpus.py, store.py, windows.py).
"""

from __future__ import annotations

import hashlib
import logging
import signal
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from project.data import streaming
from project.data.corpus import SHAKESPEARE_SHA256, Split, download_shakespeare, read_corpus, sha256_of
from project.data.overlap import line_fingerprint
from project.data.store import (STORE_FORMAT, MemmapWindows, TokenStoreRecord, store_problem,
                                write_memmap_store)
from project.data.windows import EvalWindows, TrainWindows
from project.files import remove_stale_temporaries
from project.tokenizer import (TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer, bpe_vocab_size, build_tokenizer,
                               spec_kind, tokenizer_from_state, train_bpe)

log = logging.getLogger(__name__)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: it reaches the whole process group, and a worker that exits on it
    breaks the loader, while training stops on its own at the next logging interval
    (project/training/interrupt.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TextDataModule(LightningDataModule):
    """TinyShakespeare (downloaded when missing) or any UTF-8 text file, tokenized once and streamed.

    Args:
        path: corpus file; None means TinyShakespeare at <data_dir>/tinyshakespeare/input.txt.
        data_dir: where downloads and token stores live.
        tokenizer: a tiktoken encoding name ("gpt2"), "char" for a character vocabulary of the corpus,
            "bpe:N" for a byte-level BPE of N tokens trained on the training split on first use (cached under
            <data_dir>/tokenizers), or a folder written by `python -m project train-tokenizer`.
        vocabulary: with tokenizer "char", the characters in id order; with "bpe:N", the tokenizer.json text.
            None derives it from the corpus. The CLI fills it from the checkpoint when one is given, so
            predicting needs no corpus.
        block_size: tokens per training window (linked from the model's config by the CLI).
        batch_size: windows per batch.
        split: the validation and test shares of the text (the rest trains).
        max_val_windows: cap on validation (and test) windows (None = every non-overlapping window).
        num_workers: DataLoader worker processes for the training stream.
        seed: seed of the training stream.
        prompts: prompts that `predict` completes.
        streaming_dir: a folder (or s3://... prefix) written by `python -m project prepare`: the splits stream
            from its litdata chunks instead of `path`, and the tokenizer comes from its meta.json.
    """

    def __init__(
        self,
        path: str | None = None,
        data_dir: str = "data",
        tokenizer: str = "gpt2",
        vocabulary: str | None = None,
        block_size: int = 256,
        batch_size: int = 16,
        split: Split = Split(),
        max_val_windows: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        prompts: list[str] | None = None,
        streaming_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                   ("max_val_windows", max_val_windows, 1)):
            if value is not None and value < least:
                raise ValueError(f"--data.{name} must be >= {least}, got {value}"
                                 + (" (null = every window)" if name == "max_val_windows" else ""))
        self.data_dir = Path(data_dir)
        if self.data_dir.is_file():
            raise NotADirectoryError(f"--data.data_dir {data_dir} is a file: pass a folder (downloads and token "
                                     "stores go there)")
        self.path = Path(path) if path else self.data_dir / "tinyshakespeare" / "input.txt"
        self.is_shakespeare = path is None
        self.tokenizer_name, self.vocabulary = tokenizer, vocabulary
        self.block_size, self.batch_size = block_size, batch_size
        self.split = split
        self.max_val_windows = max_val_windows
        self.num_workers, self.seed = num_workers, seed
        self.prompts = prompts if prompts is not None else ["\n"]
        self.streaming_dir = streaming_dir
        self._tokenizer: Tokenizer | None = None
        self.store_dir: Path | None = None  # set once by find_store_dir: it hashes the corpus
        self.record: TokenStoreRecord | None = None
        self.start_batch = 0  # set from the trainer's step count, so a resumed stream continues where it stopped

    # --- corpus and token store ----------------------------------------------------------------------

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
        key = hashlib.sha256(f"{sha256_of(self.path)}:{vocab_size}:{self.split}".encode()).hexdigest()[:12]
        folder = self.data_dir / "tokenizers" / f"{self.path.stem}-bpe{vocab_size}-{key}"
        remove_stale_temporaries(folder.parent)  # tokenizers whose training was killed
        if (folder / TOKENIZER_FILE).is_file():
            return BPETokenizer.from_dir(folder)
        tokenizer = train_bpe(self.split.cut(read_corpus(self.path))["train"], vocab_size)
        try:
            tokenizer.save(folder)
        except FileExistsError:
            pass  # another rank saved the same tokenizer first (training is deterministic)
        return tokenizer

    def find_store_dir(self) -> Path:
        """The token store folder, keyed by corpus content, tokenizer and split: a changed file, tokenizer or split
        never reuses stale tokens. Hashes the corpus on the first call only."""
        if self.store_dir is None:
            name, tokenizer_key = self.tokenizer_name, f"{self.tokenizer_name}:{self.vocabulary}"
            if spec_kind(self.tokenizer_name) == "bpe":  # a trained BPE by content: one retrained in place gets new tokens
                name = f"bpe{self.tokenizer.vocab_size}"
                tokenizer_key = hashlib.sha256(self.tokenizer.spec.encode()).hexdigest()
            key = f"{sha256_of(self.path)}:{tokenizer_key}:{self.split}:{STORE_FORMAT}"
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            self.store_dir = self.data_dir / "tokens" / f"{self.path.stem}-{name.replace('/', '_')}-{digest}"
        return self.store_dir

    def prepare_data(self) -> None:
        """Tokenize the corpus once into the memmap store (checked, and rebuilt when damaged, on every start)."""
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING:
            return  # predicting completes prompts: no corpus needed
        if self.streaming_dir or self.record is not None:
            return  # prepared beforehand by `python -m project prepare`, or checked already in this run
        self.ensure_corpus()
        folder = self.find_store_dir()
        remove_stale_temporaries(folder)  # token files of a tokenization that was killed
        if folder.exists():
            problem = store_problem(folder)
            if problem is None:
                return
            log.info("token store %s is damaged (%s): rebuilding it", folder, problem)
        write_memmap_store(folder, read_corpus(self.path), self.tokenizer, self.split, self.block_size + 2, self.path)

    def load_record(self) -> TokenStoreRecord:
        """The token store's record (read once), tokenizing the corpus first when no store exists yet."""
        if self.record is None and self.streaming_dir:
            self.record = streaming.read_record(self.streaming_dir)
        if self.record is None:
            self.prepare_data()  # no-op when stored; other ranks find the folder rank 0 wrote
            self.record = TokenStoreRecord.load(self.find_store_dir())
        return self.record

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer of this data, without tokenizing anything: a character vocabulary needs only the
        corpus' set of characters, BPE needs no corpus (predicting from a checkpoint needs no data folder)."""
        if self.streaming_dir:  # the tokenizer the folder was prepared with, whatever `tokenizer` says
            return tokenizer_from_state(self.load_record().tokenizer)
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

    def training_fingerprint(self) -> torch.Tensor | None:
        """The training split's line fingerprint (project.data.overlap), which checkpoints keep so `evaluate` can
        warn about scoring training text; None for a streaming folder (its text is not at hand)."""
        if self.streaming_dir:
            return None
        self.ensure_corpus()
        return line_fingerprint(self.split.cut(read_corpus(self.path))["train"])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token of `split`: turns nats/token into bits per byte."""
        return self.load_record().bytes_per_token(split)

    # --- loaders -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):
            self.load_record()
        if stage == "test" and "test" not in self.load_record().tokens:
            raise ValueError("this data has no test split (--data.split.test_fraction is 0): set a test fraction "
                             "or use validate")

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
        record = self.load_record()
        replicas, rank = self.data_parallel_rank()
        if self.streaming_dir:
            # litdata shards the chunks over ranks and workers; Lightning checkpoints and restores its loader
            start = self.batches_trained()
            return streaming.train_loader(self.streaming_dir, block_size=self.block_size, batch_size=self.batch_size,
                                          seed=self.seed, num_workers=self.num_workers, replicas=(replicas, rank),
                                          consumed=lambda: self.batches_trained() - start)
        if self.trainer is not None:  # resuming: continue the stream after the batches already trained on
            self.start_batch = self.batches_trained()
        windows = TrainWindows(self.find_store_dir() / "train.bin", record.dtype, self.block_size, self.batch_size,
                               self.seed, rank=rank, start_batch=self.start_batch, replicas=replicas)
        # an own generator: creating the loader's iterator then draws no number from the global RNG, so a
        # resumed run (new iterator after the RNG state is restored) keeps the same dropout stream
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers, worker_init_fn=ignore_interrupts,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))

    def eval_dataloader(self, split: str) -> DataLoader:
        """Fixed windows of the val or test split (the stores differ only in where the windows come from)."""
        record = self.load_record()
        if self.streaming_dir:
            windows = streaming.eval_windows(self.streaming_dir, split, self.block_size)
            source = f"the {split} split of {self.streaming_dir}"
        else:
            windows = MemmapWindows(self.find_store_dir() / f"{split}.bin", record.dtype, self.block_size)
            source = f"the {split} split of {self.path}"
        windows = EvalWindows(windows, self.block_size, self.max_val_windows, source=source)
        # an own generator, as for training: making the iterator then draws nothing from the global RNG
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        # one prompt per batch: prompts have different lengths, and generation needs no padding this way
        return DataLoader(self.prompts, batch_size=1, collate_fn=list)
