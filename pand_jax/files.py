"""Writing a file or folder whole or not at all, the one way the package publishes one, and a
disk that refuses a write (full, over quota, past the file-size limit) reported in one line."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

# The errnos of a write the disk refused; to the user they all mean "make room".
REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How TensorStore (orbax's writer) reports them in the text of its exceptions.
_REFUSED_TEXT = re.compile(
    r"os_error_code='(\d+)'|OS error (\d+)|(No space left on device|"
    r"Disk quota exceeded|File too large)"
)
FREE_SPACE = "free space there, or use a disk with room, and run the same command again"


class DiskFullError(RuntimeError):
    """A write the disk refused; the message names the path, the size needed and what to do."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A fresh temporary path beside `path` for the block to write (a file, or a folder it
    creates); renamed over `path` when the block ends, removed when it raises. The other
    processes of a run, a run on another host sharing the disk, or a later reader see the old
    file or the new one, never half of one.

    The name is unique per call (several writers never share it) and ends with `path`'s suffix,
    so writers that add one when it is missing (`np.savez`, `np.save`) write to it unchanged.
    """
    path = pathlib.Path(path)
    tmp = _beside(path, "tmp")
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            # A folder cannot be renamed over a non-empty one: the old one steps aside first
            # (a reader in that instant finds neither, never a mixture).
            old = _beside(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _beside(path: pathlib.Path, kind: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}{path.suffix}")


def _remove(path: pathlib.Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def disk_full_errors(
    path: str | os.PathLike, size: int, what: str, *, fix: str = FREE_SPACE, needs: str = "it"
) -> Iterator[None]:
    """A write the disk refuses inside the block becomes one DiskFullError line: "no space left
    to write {what} {path}: {needs} needs about {size} ({reason}); {fix}". Writers clean up
    their own partial files (`atomic_path` does) before it gets here."""
    try:
        yield
    except DiskFullError:  # an inner block named its own file
        raise
    except Exception as e:
        if refusal(e) is None:
            raise
        raise disk_full_error(e, path, size, what, fix=fix, needs=needs) from e


def disk_full_error(
    e: BaseException,
    path: str | os.PathLike,
    size: int,
    what: str,
    *,
    fix: str = FREE_SPACE,
    needs: str = "it",
) -> DiskFullError:
    """The one line of `disk_full_errors`, for a refusal `e` caught elsewhere."""
    return DiskFullError(
        f"no space left to write {what} {path}: {needs} needs about "
        f"{human(size)} and the disk refused ({refusal(e)}); {fix}"
    )


def refusal(e: BaseException | None) -> str | None:
    """Why the disk refused a write ("No space left on device", ...) when `e`, or an exception
    it was raised from, is such a refusal; else None. Python raises it as an OSError, TensorStore
    as a ValueError whose text holds the errno."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in REFUSED:
            return os.strerror(e.errno)
        for match in _REFUSED_TEXT.finditer(str(e)):
            code = match.group(1) or match.group(2)
            if code is None:
                return match.group(3)
            if int(code) in REFUSED:
                return os.strerror(int(code))
        e = e.__cause__ or e.__context__
    return None


class RefusalLogFilter(logging.Filter):
    """Drops log records of a refused write (orbax logs each failed thread's traceback, through
    absl and asyncio); the one DiskFullError line says it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return refusal(error) is None and refusal(Exception(record.getMessage())) is None


def quiet_refusal_logs() -> None:
    """Installs `RefusalLogFilter` on the loggers orbax writes through, once."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RefusalLogFilter) for f in logger.filters):
            logger.addFilter(RefusalLogFilter())


def reserve(directory: str | os.PathLike, size: int) -> None:
    """Raises the disk's refusal (OSError) now when `directory` cannot take `size` more bytes:
    its blocks are reserved and released at once. For writers that would otherwise fail later,
    in the background (orbax's async saves), or with SIGBUS (a memory map on a full disk)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".reserve-")
    try:
        os.posix_fallocate(fd, 0, max(int(size), 1))
    finally:
        os.close(fd)
        os.unlink(tmp)


def write_file(path: str | os.PathLike, data: str | bytes, what: str) -> None:
    """Writes `data` to `path` whole or not at all (`atomic_path`); a disk that refuses it is
    one DiskFullError line and leaves no temporary file."""
    data = data.encode() if isinstance(data, str) else data
    with disk_full_errors(path, len(data), what), atomic_path(path) as tmp:
        tmp.write_bytes(data)


def human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


def write_json(path: pathlib.Path, data: Any, **dumps_kwargs: Any) -> None:
    """Writes `path` whole or not at all (`atomic_path`): the other processes of a run, or a
    later reader, never see it half written."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, **dumps_kwargs) + "\n")
