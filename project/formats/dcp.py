"""Reading distributed (DCP) checkpoint folders: the one way this project, and Lightning's resume under it, does.

A folder written by `torch.distributed.checkpoint` (ModelParallelStrategy: configs/strategy/tp.yaml) holds tensor
shards `__R_0.distcp`, a `.metadata` index and Lightning's `meta.pt`. torch's own reader would unpickle `.metadata`
with plain `pickle`, fall back to an unchecked rank-local `__R.metadata` when that read fails, and unpickle every
non-tensor item with `torch.load(weights_only=False)`: three ways for a folder to run code. Here instead:

1. `read_dcp_metadata(folder)` unpickles `.metadata` once, with an allow-list of the classes DCP writes there, and
   checks its structure (shard files named `__R_N.distcp` in the folder, tensors where weights go, non-tensor items
   only for optimizer settings, no stream transforms). It returns the checked `Metadata` object.
2. `load_dcp(state, folder, metadata)` hands that object to `dcp.load` through `CheckedMetadataReader`, whose
   `read_metadata` returns it and takes no `**kwargs` (so torch's fallback to `__R.metadata` never exists), and
   `WeightsOnlyLoadPlanner`, which reads non-tensor items with `torch.load(weights_only=True)`. Tensor shards are
   read by torch with `weights_only=True` already.
3. `read_dcp_state(folder)` reads a whole folder in one process (consolidation, single-device reading and resume).

Every error is a one-line ValueError. Nothing else in the project calls `dcp.load` or builds a `FileSystemReader`
(tests/test_bad_inputs.py greps for it).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   StorageMeta, TensorProperties, TensorStorageMetadata)

from project.formats.runs import META_FILE, METADATA_FILE  # a DCP folder's index and Lightning's meta.pt

# what `.metadata` may name: unpickling builds nothing else (and torch dtypes)
DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch pickles a layout: looked up by its name
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")  # what FileSystemWriter names shards: a plain name in the folder
# the only non-tensor items Lightning's sharded checkpoints hold: the optimizers' param_groups settings (lr, betas,
# eps, weight_decay, ..., the parameter names)
SETTINGS_ITEM = re.compile(r"optimizer_\d+\.param_groups\.\d+\.[A-Za-z_][A-Za-z0-9_]*")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a class or function outside the allow-list."""


class DistributedMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, refusing every global but DCP_METADATA_GLOBALS and torch dtypes."""

    def find_class(self, module: str, name: str):
        if (module, name) in DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def class_name(obj) -> str:
    """`module.Class` of an object: every object in checked metadata comes from the allow-list or is a builtin."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def is_count(value) -> bool:
    return type(value) is int and value >= 0


def is_shape(value) -> bool:
    return isinstance(value, torch.Size) and all(is_count(n) for n in value)


def read_dcp_metadata(folder: str | Path) -> Metadata:
    """The folder's `.metadata`, unpickled with DistributedMetadataUnpickler and checked item by item: the only
    object this project ever hands to `dcp.load` as metadata. ValueError ("refusing ...") otherwise."""
    folder = Path(folder)
    try:
        with open(folder / METADATA_FILE, "rb") as f:
            metadata = DistributedMetadataUnpickler(f).load()
    except RefusedGlobal as err:
        raise ValueError(f"refusing checkpoint {folder}: its .metadata names {err}, which no distributed checkpoint "
                         "holds (it would run code when unpickled)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError) as err:  # RuntimeError: TensorProperties' own check of its memory format
        raise ValueError(f"checkpoint {folder} has a truncated or foreign .metadata ({type(err).__name__}: "
                         f"{str(err)[:120]})") from None

    def refuse(what: str) -> ValueError:
        return ValueError(f"refusing checkpoint {folder}: its .metadata {what}, which torch.distributed.checkpoint "
                          "never writes: the folder was altered")

    if type(metadata) is not Metadata:
        raise refuse(f"holds a {class_name(metadata)} instead of the checkpoint's Metadata")
    if metadata.storage_meta is not None and type(metadata.storage_meta) is not StorageMeta:
        raise refuse(f"has a {class_name(metadata.storage_meta)} as storage_meta")
    items, keys, storage = metadata.state_dict_metadata, metadata.planner_data, metadata.storage_data
    if type(items) is not dict or type(storage) is not dict or type(keys) is not dict:
        raise refuse("lacks its item, key or storage tables")
    for key, item in items.items():
        if type(key) is not str:
            raise refuse(f"names an item {key!r} that is not a string")
        path = keys.get(key)  # where the item goes in the nested state: its key is the path joined with dots
        if (type(path) is not tuple or not path or not all(type(p) is str or is_count(p) for p in path)
                or ".".join(map(str, path)) != key):
            raise refuse(f"gives item {key} no key path of its own")
        if type(item) is BytesStorageMetadata:
            if not SETTINGS_ITEM.fullmatch(key):  # e.g. a weight declared as pickled bytes
                raise refuse(f"declares {key} as pickled data (only optimizer settings are)")
        elif type(item) is TensorStorageMetadata:
            properties, chunks = item.properties, item.chunks
            if (type(properties) is not TensorProperties or not isinstance(properties.dtype, torch.dtype)
                    or not is_shape(item.size) or type(chunks) is not list
                    or not all(type(c) is ChunkStorageMetadata and is_shape(c.offsets) and is_shape(c.sizes)
                               and len(c.offsets) == len(c.sizes) == len(item.size) for c in chunks)):
                raise refuse(f"describes tensor {key} with malformed sizes or types")
        else:
            raise refuse(f"describes {key} as a {class_name(item)}")
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(index.fqn) is not str or index.fqn not in items:
            raise refuse(f"indexes storage by {index!r}")
        if class_name(info) != "torch.distributed.checkpoint.filesystem._StorageInfo":
            raise refuse(f"describes the storage of {index.fqn} as a {class_name(info)}")
        relative_path = getattr(info, "relative_path", None)
        if type(relative_path) is not str or not SHARD_FILE.fullmatch(relative_path):
            raise refuse(f"points {index.fqn} at {relative_path!r}, not a shard file in the folder")
        if not is_count(getattr(info, "offset", None)) or not is_count(getattr(info, "length", None)):
            raise refuse(f"gives {index.fqn} a malformed offset or length")
        if getattr(info, "transform_descriptors", None):  # compression and other stream extensions
            raise refuse(f"asks for stream transforms on {index.fqn}")
    return metadata


def set_at_path(root: dict, path: tuple, value) -> None:
    """Put `value` at `path` (keys, and list positions as ints) inside `root`, making containers as needed."""
    node = root
    for key, following in zip(path[:-1], path[1:]):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = [] if type(following) is int else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if type(following) is int else {})
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


class CheckedMetadataReader(FileSystemReader):
    """FileSystemReader that gives dcp.load the folder's metadata as `read_dcp_metadata` read and checked it (or the
    object it returned, passed as `metadata`), and reads nothing else as metadata."""

    def __init__(self, folder: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(folder)
        self.checked_metadata = read_dcp_metadata(folder) if metadata is None else metadata

    def read_metadata(self) -> Metadata:  # no **kwargs: dcp.load falls back to `__R.metadata` only with them
        if self.checked_metadata.storage_meta is None:
            self.checked_metadata.storage_meta = StorageMeta()
        self.checked_metadata.storage_meta.load_id = self.load_id  # what FileSystemReader.read_metadata sets
        return self.checked_metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor items with `torch.load(weights_only=True)`: plain values only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            named = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
            raise ValueError(f"refusing item {read_item.dest_index.fqn}: it holds pickled "
                             f"{named.group(1) if named else 'objects'}, which are never loaded (plain values "
                             "only)") from None
        # where DefaultLoadPlanner puts it (with flatten_state_dict, its default, `mappings` maps keys to paths)
        set_at_path(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)


def load_dcp(state: dict, folder: str | Path, metadata: Metadata | None = None, *, no_dist: bool = False) -> None:
    """`dcp.load(state, ...)` from `folder` through the checked reader (metadata from `read_dcp_metadata`, read
    here when not given): the destination tensors in `state` are filled in place, resharded as they are laid out.
    `no_dist`: one process reads the whole folder. ValueError (one line) for a folder that cannot be read."""
    folder = Path(folder)
    metadata = read_dcp_metadata(folder) if metadata is None else metadata
    try:
        with warnings.catch_warnings():
            # torch warns that it "assumes" a single process even when no_dist asks for exactly that
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized",
                                    UserWarning)
            dcp.load(state, storage_reader=CheckedMetadataReader(folder, metadata), planner=WeightsOnlyLoadPlanner(),
                     no_dist=no_dist)
    except dcp.CheckpointException as err:  # a BaseException: every rank's failure, wrapped
        first = next(iter(err.failures.values()), (err, None))[0]
        if isinstance(first, ValueError) and str(first).startswith("refusing"):
            raise ValueError(f"{str(first)} in checkpoint {folder}") from None
        reason = str(first).splitlines()[0][:200] if str(first) else type(first).__name__
        raise ValueError(f"checkpoint {folder} cannot be read: a shard is missing, truncated or does not match "
                         f".metadata ({reason})") from None


def read_dcp_state(folder: str | Path, metadata: Metadata | None = None, *, prefix: str = "") -> dict:
    """Every item of a DCP folder whose flat key starts with `prefix` ("state_dict." for the weights alone), read
    in this process as full tensors and plain values, nested as they were saved (e.g.
    {"state_dict": {"model.wte.weight": ...}, "optimizer_0": {"state": ..., "param_groups": [...]}})."""
    metadata = read_dcp_metadata(folder) if metadata is None else metadata
    flat = {key: torch.empty(item.size, dtype=item.properties.dtype) if type(item) is TensorStorageMetadata else None
            for key, item in metadata.state_dict_metadata.items() if key.startswith(prefix)}
    load_dcp(flat, folder, metadata, no_dist=True)
    nested: dict = {}
    for key, value in flat.items():
        set_at_path(nested, metadata.planner_data[key], value)
    return nested
