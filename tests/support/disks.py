"""Real faulty disks for the fault suite: a tiny tmpfs that fills up, a read-only mount.

Mounting needs root (or CAP_SYS_ADMIN): where the test cannot mount, it is skipped with that reason
rather than faked, since a real full disk is what the fault suite is for. (chmod is no substitute:
root writes through it.)
"""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def tmpfs(folder: Path, size: str = "256k", read_only: bool = False, fill_from: Path | None = None) -> Iterator[Path]:
    """`folder` mounted as a tmpfs of `size`; with `fill_from`, that folder's files copied in first;
    `read_only` remounts it read-only then. Skips the test where mounting is not allowed."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a real full or read-only disk here")
    folder.mkdir(parents=True, exist_ok=True)
    result = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}): the disk faults need one")
    try:
        if fill_from is not None:
            for path in fill_from.iterdir():
                if path.is_file():
                    shutil.copy2(path, folder / path.name)
        if read_only:
            remount = _mount("-o", "remount,ro", str(folder))
            if remount.returncode != 0:
                pytest.skip(f"cannot remount read-only ({remount.stderr.strip()})")
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the disk under `folder` to the last byte."""
    import os

    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
