"""File helpers every layer shares: checksums, atomic writes, folders published whole, locks.

They live in `data/` because it is the lowest layer: `models/` and `pipeline/` import it, it imports
neither. Locks are `filelock` (fcntl on POSIX): the kernel drops them when a process dies, even by
SIGKILL, so a killed job never leaves a lock behind.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, Union

from filelock import FileLock, Timeout

__all__ = ["sha256_file", "atomic_write", "atomic_folder", "file_lock", "try_lock", "move_aside", "write_csv", "read_csv", "Timeout"]


class StorageFull(OSError):
    """No space (or quota) left where a file was being written; the message names the file. A job stopped by it
    keeps what it wrote before, so the same command resumes it once there is room (pipeline/journal.py)."""

    def __init__(self, path: Union[str, Path], reason: str = "no space left on device"):
        super().__init__(errno.ENOSPC, f"{reason} while writing {path}")
        self.path = str(path)


FULL = (errno.ENOSPC, errno.EDQUOT)


def storage_full(err: BaseException, path: Union[str, Path]) -> StorageFull | None:
    """`err` as a StorageFull naming `path` when it means the disk or quota is full, else None."""
    if isinstance(err, StorageFull):
        return err
    if isinstance(err, OSError) and err.errno in FULL:
        return StorageFull(path, os.strerror(err.errno).lower())
    text = str(err)
    if "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text:
        return StorageFull(path)  # e.g. safetensors' SafetensorError, which carries the OS error as text
    return None


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed, any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Writes `data` to a temporary file beside `path`, flushes it, then renames it over `path`: a
    reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        full = storage_full(err, path)
        if full is not None:
            raise full from err
        raise
    return path


@contextlib.contextmanager
def atomic_folder(target: Union[str, Path]) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target`; when the block ends without an error it
    replaces `target` (an old `target` is moved aside first and then removed). On an error, or a kill,
    `target` is untouched and the temporary folder is removed (or left as `.<name>.tmp-*`, which the
    next call removes: call it with a lock held when several processes may build the same folder)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; what it publishes is not
    try:
        yield tmp
        old = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def move_aside(path: Union[str, Path], label: str) -> Path:
    """Renames `path` to `<path>.<label>-<UTC time>` (kept for inspection, out of the way); returns it."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:6]}")
    os.rename(path, aside)
    return aside


@contextlib.contextmanager
def file_lock(path: Union[str, Path]) -> Iterator[None]:
    """An exclusive lock on `path` shared by every process on this machine; waits for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def try_lock(path: Union[str, Path]) -> FileLock | None:
    """The lock on `path` if nobody holds it now (the caller releases it), else None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def write_csv(rows: list[dict], path: Union[str, Path]) -> Path:
    """Rows of one shape (the first row's keys are the header), written atomically."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def read_csv(path: Union[str, Path]) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
