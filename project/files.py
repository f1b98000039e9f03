"""Writing outputs so that no reader ever sees half of one: stage beside the target, then rename.

Every file or folder the project writes for later use (token stores, tokenizers, checkpoints, exports, the guide)
goes through `atomic_path`: the content is written to a hidden temporary name in the same folder, `.NAME.PID.tmp`,
and renamed into place only once complete, so a crash or a kill leaves the old output or the new one, never a
mix. A killed writer leaves its temporary behind; `remove_stale_temporaries` deletes those whose process is gone.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temporary_path(path: Path) -> Path:
    """The hidden name `path` is staged under by this process: `.NAME.PID.tmp` in the same folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the output to; on success it is renamed to `path`.

    A file replaces an existing `path`. A `folder` (created empty for the caller) may only take the place of a
    missing or empty folder: FileExistsError otherwise, and nothing is changed. On any error the temporary is
    removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)  # what killed writers of this output left
    staging = temporary_path(path)
    remove_path(staging)  # left by an earlier process that had this pid
    if folder:
        staging.mkdir()
    try:
        yield staging
        set_default_modes(staging)
        if not folder:
            os.replace(staging, path)
        elif path.is_dir() and not any(path.iterdir()):
            os.replace(staging, path)  # an empty folder is replaced
        else:
            try:
                staging.rename(path)
            except OSError:
                raise FileExistsError(f"{path} exists: choose another path or remove it") from None
    finally:
        remove_path(staging)


def check_new_file(path: str | Path, flag: str) -> Path:
    """`path` as a Path to a file this command may create, checked before any work: one-line errors when it exists
    (outputs are never replaced silently), is a folder, or its folder is missing or not writable."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder: pass a file path inside it")
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{flag} {path} exists: choose another path or remove it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: folder {path.parent} does not exist: create it first")
    probe = temporary_path(path)
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{flag} {path}: cannot write in {path.parent} ({err.strerror or err})") from None
    return path


@functools.cache
def default_umask() -> int:
    """The process's umask (read once: setting it is the only way to read it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def set_default_modes(path: Path) -> None:
    """Give `path` (and a folder's contents) the permissions new files get here (0644 and 0755 under umask 022):
    some writers (safetensors) create files 0600, which a staged output would otherwise keep."""
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~default_umask())


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as staging:
        staging.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the `.NAME.PID.tmp` files and folders in `folder` (of output `name` only, if given) whose writer is no
    longer running; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = TEMPORARY.match(path.name)
        if match and (name is None or match["name"] == name) and not process_alive(int(match["pid"])):
            remove_path(path)
            removed.append(path)
    return removed
