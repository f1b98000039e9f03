"""Bigger corpora: a folder of text or parquet files -> litdata token chunks -> streamed training windows.

    python -m project prepare --input_dir texts/ --output_dir tokens/      (tokens/ may be s3://bucket/prefix)
      -> tokens/{train,val,test}/: litdata chunks of token ids (TokensLoader), <|endoftext|> after each document
      -> tokens/meta.json: the token store record (project/data/store.py), written last
    python -m project fit --config configs/shakespeare.yaml --data.streaming_dir tokens/
      -> train: shuffled (block_size + 1)-token windows; litdata splits the chunks across ranks and workers
      -> val: fixed, evenly spaced windows; Lightning's DistributedSampler gives every rank at least one

Every document (a .txt file, or one row of a .parquet file's text column) is split by `Split` (its head for
training, then validation, then test), so every split covers the whole corpus.
This module is only the litdata store: the split, the record, the token type, the windows and the (x, y) shift are
those of project/data/corpus.py, store.py and windows.py, which the single-file path uses too.
litdata is imported inside the functions: the single-file path of project/data/datamodule.py never needs it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from project.data.corpus import SPLITS, Split, read_text
from project.data.store import RECORD_FILE, StoreRecordError, TokenStoreRecord, token_dtype
from project.data.windows import inputs_and_targets
from project.extras import require_extra
from project.tokenizer import Tokenizer, build_tokenizer, tokenizer_from_state


CHUNK_STAGING = "DATA_OPTIMIZER_CACHE_FOLDER"  # where litdata.optimize stages chunks before moving them


def import_litdata():
    """The litdata module, or a one-line error naming the install command.

    litdata asks PyPI for a newer release of itself when a StreamingDataset is built (see docs/scaling.md); 0.2.44,
    the pinned extra, has no switch, and its one lookup per process returns nothing when offline.
    """
    return require_extra("litdata", "data", "streaming a prepared corpus",
                         " (litdata 0.2.44, the last release that does not pull a torchvision, which breaks a CPU "
                         "torch; see docs/scaling.md)")


def is_url(path: str) -> bool:
    """s3://, gs://, ... (litdata streams those); anything else is a local path."""
    return "://" in path


def join(root: str, name: str) -> str:
    """root/name for a local folder or an object-store prefix."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


# --- the record, local or on object storage ---------------------------------------------------------------

def read_record(streaming_dir: str) -> TokenStoreRecord:
    """The record (meta.json) of a prepared folder, or FileNotFoundError / ValueError saying how to prepare one."""
    path = join(streaming_dir, RECORD_FILE)
    hint = (f"streaming_dir {streaming_dir} has no {RECORD_FILE} (missing, or `prepare` did not finish): run "
            f"python -m project prepare --input_dir <folder of .txt/.parquet files> --output_dir {streaming_dir}")
    if is_url(streaming_dir):
        provider = fs_provider(path)
        if not provider.exists(path):
            raise FileNotFoundError(hint)
        with tempfile.TemporaryDirectory() as tmp:
            provider.download_file(path, str(Path(tmp) / RECORD_FILE))
            text = (Path(tmp) / RECORD_FILE).read_text()
    elif not Path(path).is_file():
        raise FileNotFoundError(hint)
    else:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        return TokenStoreRecord.from_json(text, path)
    except StoreRecordError as err:
        raise ValueError(f"{err}: prepare the folder again (python -m project prepare ... --output_dir NEW)") from None


def write_record(output_dir: str, record: TokenStoreRecord) -> None:
    if not is_url(output_dir):
        record.save(Path(output_dir))  # a folder with meta.json is a finished one
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / RECORD_FILE
        local.write_text(record.to_json())
        fs_provider(output_dir).upload_file(str(local), join(output_dir, RECORD_FILE))


def fs_provider(url: str):
    """litdata's own object-store client for `url` (same credentials and storage options as its chunk uploads)."""
    import_litdata()
    from litdata.streaming.fs_provider import GCPFsProvider, S3FsProvider

    providers = {"s3": S3FsProvider, "gs": GCPFsProvider}
    scheme = url.split("://", 1)[0]
    if scheme not in providers:
        raise ValueError(f"{url}: litdata streams from s3:// and gs:// (or a local folder), not {scheme}://")
    return providers[scheme]()


# --- preparing: files -> documents -> token chunks -----------------------------------------------------

def list_inputs(input_dir: str, text_column: str) -> list[tuple[int, str, int]]:
    """Work items (index, path, parquet row group or -1 for a text file), sorted, empty files left out."""
    root = Path(input_dir)
    if not root.exists():
        raise FileNotFoundError(f"input_dir {input_dir} does not exist: pass a folder of .txt or .parquet files")
    if not root.is_dir():
        raise NotADirectoryError(f"input_dir {input_dir} is not a folder: pass a folder of .txt or .parquet files")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".parquet") and p.is_file())
    files = [p for p in files if p.stat().st_size > 0]  # litdata refuses 0-byte input files
    items: list[tuple[int, str, int]] = []
    for path in files:
        if path.suffix == ".txt":
            items.append((len(items), str(path), -1))
            continue
        parquet = _parquet_file(path)
        if text_column not in parquet.schema_arrow.names:
            raise ValueError(f"{path} has no column {text_column!r} (columns: {parquet.schema_arrow.names}): "
                             "pass --text_column")
        # one item per row group, so the workers share a big parquet file
        items.extend((len(items) + i, str(path), i) for i in range(parquet.num_row_groups))
    if not items:
        raise ValueError(f"input_dir {input_dir} has no non-empty .txt or .parquet files")
    return items


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.ParquetFile(path)


def read_documents(path: str, row_group: int, text_column: str) -> list[str]:
    """The documents of one work item: a whole text file, or the text column of one parquet row group."""
    if row_group >= 0:
        column = _parquet_file(Path(path)).read_row_group(row_group, columns=[text_column]).column(text_column)
        texts = column.to_pylist()
        if any(t is not None and not isinstance(t, str) for t in texts):
            raise ValueError(f"column {text_column!r} of {path} is not text")
        return [t for t in texts if t]
    return [read_text(Path(path))]


@functools.lru_cache(maxsize=2)
def _tokenizer(state: str) -> Tokenizer:
    return tokenizer_from_state(json.loads(state))  # once per worker process, not once per document


def tokenize_item(item: tuple[int, str, int], *, split: str, tokenizer_state: str, fractions: Split,
                  dtype: str, text_column: str, counts_dir: str):
    """optimize() worker function: yields one token array per document part, records bytes and tokens.

    Bad input (a file that is not UTF-8, a parquet column that is not text) is recorded, not raised: a
    raising worker makes litdata abandon its helper processes, which then print tracebacks after our error.
    `prepare_corpus` reports the recorded error once every worker has finished cleanly.
    """
    index, path, row_group = item
    if any(Path(counts_dir).glob("*.error")):  # another item already failed: the run is lost, stop early
        return
    tokenizer = _tokenizer(tokenizer_state)
    try:
        documents = read_documents(path, row_group, text_column)
    except ValueError as err:
        Path(counts_dir, f"{index}.error").write_text(str(err))
        return
    n_bytes = n_tokens = 0
    for text in documents:
        part = fractions.cut(text)[split]
        if not part:
            continue
        ids = tokenizer.encode(part)
        if tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)  # BPE: <|endoftext|> between documents, as GPT-2 was trained
        n_bytes += len(part.encode("utf-8"))
        n_tokens += len(ids)
        yield np.asarray(ids, dtype=dtype)
    # the workers are processes: the counts travel back through small files
    Path(counts_dir, f"{index}.json").write_text(json.dumps({"bytes": n_bytes, "tokens": n_tokens}))


def _check_output_dir(output_dir: str) -> bool:
    """FileExistsError for a non-empty output_dir; returns whether this call creates the (local) folder."""
    if is_url(output_dir):
        provider = fs_provider(output_dir)
        if provider.exists(join(output_dir, RECORD_FILE)) or not provider.is_empty(output_dir):
            raise FileExistsError(f"output_dir {output_dir} is not empty: pick a new prefix or delete it first")
        return False
    path = Path(output_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output_dir {output_dir} is not empty: pick a new folder or delete it first")
    return not path.exists()


def _run_optimize(fn, items: list, output_dir: str, num_workers: int, chunk_tokens: int) -> None:
    litdata = import_litdata()
    from litdata import TokensLoader

    kwargs = dict(fn=fn, inputs=items, output_dir=output_dir, chunk_size=chunk_tokens, item_loader=TokensLoader(),
                  num_workers=num_workers, reorder_files=False, start_method="spawn")
    accepted = inspect.signature(litdata.optimize).parameters
    # newer litdata: a fixed slice of the work per worker (reproducible chunks), no progress bar or ads
    kwargs.update({k: v for k, v in dict(keep_data_ordered=True, verbose=False).items() if k in accepted})
    # litdata stages chunks in one shared folder (~/.lightning/chunks or /tmp/chunks) and refuses to finish when it
    # holds chunks of another run: a killed or concurrent prepare would break every later one. A folder per run
    # (litdata's DATA_OPTIMIZER_CACHE_FOLDER, read by its spawned workers too) keeps runs apart
    previous = os.environ.get(CHUNK_STAGING)
    with tempfile.TemporaryDirectory(prefix="prepare-chunks-") as staging:
        os.environ[CHUNK_STAGING] = staging
        try:
            litdata.optimize(**kwargs)
        finally:
            if previous is None:
                os.environ.pop(CHUNK_STAGING, None)
            else:
                os.environ[CHUNK_STAGING] = previous


def prepare_corpus(
    *,
    input_dir: str,
    output_dir: str,
    tokenizer: str = "gpt2",
    split: Split = Split(),
    num_workers: int | None = None,
    chunk_tokens: int = 2**24,
    text_column: str = "text",
) -> TokenStoreRecord:
    """Tokenize a folder of .txt and/or .parquet files into litdata chunks for `fit --data.streaming_dir`.

    Writes <output_dir>/{train,val,test} (litdata TokensLoader chunks) and <output_dir>/meta.json (the token store
    record: tokenizer, token type, tokens and bytes per split). Each document is split by `split`. Files are found
    recursively; a parquet row is a document.

    Args:
        input_dir: local folder of UTF-8 .txt files and/or .parquet files with a text column.
        output_dir: new or empty folder, or an object-store prefix litdata can write (s3://bucket/tokens).
        tokenizer: a tiktoken encoding ("gpt2") or "char" (vocabulary = every character of every file).
        split: the validation and test shares of each document (by characters); the rest trains.
        num_workers: tokenizer processes (default: one per CPU core, at most one per file or row group).
        chunk_tokens: tokens per chunk file (2**24 = 32 MiB of uint16): the unit of streaming and sharding.
        text_column: the parquet column holding the documents.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    import_litdata()  # fail before any work when it is missing
    items = list_inputs(input_dir, text_column)
    created = _check_output_dir(output_dir)
    chars: set[str] = set()
    if tokenizer == "char":  # a character vocabulary needs every character of every file before any file is tokenized
        for _, path, row_group in items:
            for text in read_documents(path, row_group, text_column):
                chars.update(text)
    tok = build_tokenizer(tokenizer, "".join(sorted(chars)))
    dtype = token_dtype(tok.vocab_size)
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(items)))
    names = [name for name in SPLITS if name != "test" or split.test_fraction > 0]
    tokens, text_bytes = {}, {}
    counts_dir = tempfile.mkdtemp(prefix="prepare-counts-")
    try:
        for name in names:
            fn = functools.partial(tokenize_item, split=name, tokenizer_state=json.dumps(tok.state_dict()),
                                   fractions=split, dtype=dtype, text_column=text_column, counts_dir=counts_dir)
            _run_optimize(fn, items, join(output_dir, name), workers, chunk_tokens)
            errors = sorted(Path(counts_dir).glob("*.error"), key=lambda p: int(p.stem))
            if errors:
                raise ValueError(errors[0].read_text())
            counts = [json.loads(p.read_text()) for p in Path(counts_dir).glob("*.json")]
            for p in Path(counts_dir).glob("*.json"):
                p.unlink()
            if len(counts) != len(items):  # e.g. a worker that could not start: litdata does not always say
                raise RuntimeError(
                    f"the tokenizer processes finished {len(counts)} of {len(items)} files: see the errors above "
                    "(they are spawned: from a script, call prepare_corpus under `if __name__ == '__main__':`)"
                )
            text_bytes[name] = sum(c["bytes"] for c in counts)
            tokens[name] = sum(c["tokens"] for c in counts)
            if tokens[name] == 0:
                raise ValueError(f"the {name} split of {input_dir} is empty: add text or change --split")
        record = TokenStoreRecord(tok.state_dict(), dtype, asdict(split), tokens, text_bytes)
        write_record(output_dir, record)
    except BaseException:
        # a half-written folder would block the next attempt: remove what this call made, nothing else
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        elif not is_url(output_dir):
            for name in names:
                shutil.rmtree(Path(output_dir) / name, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(counts_dir, ignore_errors=True)
    return record


# --- reading: litdata chunks -> (x, y) batches ------------------------------------------------------------

def _token_windows(streaming_dir: str, split: str, block_size: int, **options):
    """litdata's non-overlapping (block_size + 1)-token windows of one split (MemmapWindows' layout)."""
    litdata = import_litdata()
    return litdata.StreamingDataset(join(streaming_dir, split),
                                    item_loader=litdata.TokensLoader(block_size=block_size + 1), **options)


@dataclass(frozen=True)
class DataParallelRanks:
    """What a StreamingDataset reads from its public `distributed_env` attribute to split chunks between ranks."""

    world_size: int
    global_rank: int
    num_nodes: int = 1


def set_replicas(dataset, num_replicas: int, rank: int) -> None:
    """Split the chunks by data-parallel rank (litdata's default is torch.distributed's global rank).

    They differ under tensor parallelism: the ranks of one tensor-parallel group must read the same windows.
    litdata has no setter for this, so the dataset's `distributed_env` attribute is replaced by an object with the
    same three fields (tests/test_streaming.py checks that litdata shards by it).
    """
    detected = dataset.distributed_env
    if (detected.world_size, detected.global_rank) != (num_replicas, rank):
        dataset.distributed_env = DataParallelRanks(world_size=num_replicas, global_rank=rank)


@functools.cache
def _endless_loader_class():
    from litdata import StreamingDataLoader

    class EndlessStreamingDataLoader(StreamingDataLoader):
        """litdata's stateful loader, restarted at each epoch's end: training runs by max_steps, like TrainWindows.

        It has no length, so Lightning validates every val_check_interval batches however small an epoch is.
        Each pass reshuffles (litdata seeds a pass by seed and epoch); partial batches are dropped.
        `consumed` (batches the trainer has used) makes checkpoints exact: Lightning fetches one batch ahead of
        training_step from a loader without length, and litdata's own state would count that batch as used.
        """

        consumed: Callable[[], int] | None = None

        def __iter__(self):
            self._snapshots: dict[int, dict] = {}  # batches yielded -> litdata's state right after them
            yielded = 0
            while True:
                full = False
                for batch in super().__iter__():
                    if len(batch[0]) == self.batch_size:
                        full, yielded = True, yielded + 1
                        self._snapshots[yielded] = super().state_dict()
                        self._snapshots.pop(yielded - 8, None)  # a fetcher never runs this far ahead
                        yield batch
                if not full:
                    raise ValueError(
                        f"the training split has fewer than {self.batch_size} windows for one batch per rank and "
                        "worker: prepare more text, or lower batch_size, block_size or num_workers"
                    )

        def state_dict(self) -> dict:
            snapshots = getattr(self, "_snapshots", {})
            if self.consumed is not None and self.consumed() in snapshots:
                return snapshots[self.consumed()]
            return super().state_dict()

        def __len__(self) -> int:
            raise TypeError("an endless stream has no length")

    return EndlessStreamingDataLoader


def train_loader(streaming_dir: str, *, block_size: int, batch_size: int, seed: int, num_workers: int = 0,
                 replicas: tuple[int, int] | None = None, consumed: Callable[[], int] | None = None):
    """An endless StreamingDataLoader of shuffled (x, y) batches over <streaming_dir>/train.

    replicas: (data-parallel ranks, this rank); None reads them from torch.distributed, as litdata does.
    consumed: how many of this loader's batches the trainer has used, so state_dict() matches a checkpoint.
    """
    dataset = _token_windows(streaming_dir, "train", block_size, shuffle=True, seed=seed, drop_last=True)
    if replicas is not None:
        set_replicas(dataset, *replicas)
    loader = _endless_loader_class()(dataset, batch_size=batch_size, num_workers=num_workers,
                                     collate_fn=inputs_and_targets)
    loader.consumed = consumed
    return loader


def eval_windows(streaming_dir: str, split: str, block_size: int):
    """The non-overlapping (block_size + 1)-token windows of <streaming_dir>/<split> (val or test), in stored order,
    on every rank. EvalWindows picks from them; Lightning's DistributedSampler then splits the picks by rank.
    """
    windows = _token_windows(streaming_dir, split, block_size)
    set_replicas(windows, 1, 0)  # indices are global: every rank may read every window
    return windows
