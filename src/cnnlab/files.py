"""Files written so that a crash never leaves half of one, and files read with a bound.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target:
a kill at any moment leaves either the old or the new file. Reads of files a user hands us are
bounded, so a huge or endless file (/dev/zero, a FIFO) is an error, not a hung process.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import CnnlabError, first_line


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a model file is as shareable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the half-written temporaries of `atomic_write_bytes` left by a process killed mid-write."""
    for path in folder.glob(".*.tmp"):
        try:
            path.unlink()
        except OSError:
            pass


def read_up_to(handle: Any, expected: int, limit: int) -> bytes:
    """At most `limit` + 1 bytes of an open file whose stat said `expected` bytes, read at that size first
    (a read of `limit` bytes allocates them all: 64 MiB for each small JPEG, 3x slower to read), then the
    rest up to `limit` + 1 if it grew (the caller refuses more than `limit`)."""
    data = handle.read(min(expected, limit) + 1)
    if len(data) > expected:
        data += handle.read(limit + 1 - len(data))
    return data


def read_bytes_bounded(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a clear error for anything else
    (a folder, a device, a FIFO, a file too large) instead of reading without end or hanging."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise CnnlabError(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CnnlabError(f"{path}: not a regular file (a folder, device or pipe), so not a {what}")
    if info.st_size > limit:
        raise CnnlabError(f"{path}: {info.st_size:,} bytes, more than the {limit:,} a {what} may have")
    try:
        with open(path, "rb") as f:
            data = read_up_to(f, info.st_size, limit)
    except OSError as exc:
        raise CnnlabError(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None
    if len(data) > limit:  # it grew while we read it
        raise CnnlabError(f"{path}: more than the {limit:,} bytes a {what} may have")
    return data


def read_json(path: str | Path, what: str = "JSON file", limit: int = 64 << 20) -> Any:
    """A JSON file's content; a one-line error naming the file when it is missing or not JSON."""
    try:
        return json.loads(read_bytes_bounded(path, limit, what))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CnnlabError(f"{path}: not valid JSON ({first_line(exc)})") from None


# Faults of the disk or the reader rather than of the user's command: exit 4, as a full disk at an epoch's save.
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(path: str | Path | None, exc: OSError, what: str = "") -> CnnlabError:
    """The one line for a write that failed (full disk, read-only folder, closed pipe): exit 4 for a full
    disk or a closed output, 2 for a folder the user may not write (a choice of --out to change)."""
    where = f"{what} {path}" if what and path else str(path or what or "the output")
    if exc.errno == errno.EPIPE:
        return CnnlabError(f"cannot write {where}: the reader closed the pipe before cnnlab finished", exit_code=4)
    code = 4 if exc.errno in FULL else 2
    advice = "; free some space" if exc.errno in FULL else ""
    return CnnlabError(f"cannot write {where} ({exc.strerror or exc}){advice}", exit_code=code)


def check_can_write(path: str | Path, what: str = "") -> None:
    """Prove now, before minutes of work, that a file can be created beside `path` (a read-only run folder,
    a full disk): one line instead of a traceback after the work is done. Nothing is left behind."""
    folder = Path(path).expanduser().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise write_error(path, exc, what) from None
