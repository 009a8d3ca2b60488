"""`folder:photos.zip` (or .tar.gz, .tgz, .tar): an archive of class folders, unpacked once into the cache.

The archive is unpacked into `$CNNLAB_CACHE/archives/<key>/`, the key made of its path, size and
modification time, so a changed archive is unpacked again and an unchanged one never is. Unpacking
is safe against hostile archives: every member must be a plain file or folder (links, devices and
FIFOs are refused), its path must stay inside the target (no absolute paths, no `..`), and the
total size and number of files are limited. Files are written into a temporary folder that is
renamed into place only once complete: an interrupted unpack leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import CnnlabError
from ..runtime import cache_root

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
MAX_BYTES = 16 * 2**30    # unpacked size: a zip or gzip bomb stops here
MAX_FILES = 2_000_000
_CHUNK = 1 << 20


def is_archive_name(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def unpacked_folder(path: str | Path) -> Path:
    """The folder of class folders inside archive `path`, unpacking it into the cache the first time."""
    archive = Path(path).expanduser()
    if not is_archive_name(archive):
        raise CnnlabError(f"{archive} is a file, not a folder: folder: takes a folder of class folders "
                          f"or an archive of one ({', '.join(ARCHIVE_SUFFIXES)})")
    info = archive.stat()
    key = hashlib.sha256(json.dumps([str(archive.resolve()), info.st_size, info.st_mtime_ns]).encode()).hexdigest()[:24]
    target = cache_root() / "archives" / key
    if not target.is_dir():
        _unpack_atomically(archive, target)
    return _dataset_root(target)


def _dataset_root(folder: Path) -> Path:
    """An archive of one top-level folder (photos/cat/..., photos/dog/...) holds its dataset in that folder."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if not p.name.startswith(".")]
        if inner and all(p.is_dir() for p in inner):
            return entries[0]
    return folder


def _unpack_atomically(archive: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=target.parent))
    try:
        if archive.name.lower().endswith(".zip"):
            _unpack_zip(archive, temporary)
        else:
            _unpack_tar(archive, temporary)
        try:
            os.rename(temporary, target)
        except OSError:
            if not target.is_dir():  # not "another process finished first"
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except CnnlabError:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, ValueError) as exc:
        # a corrupt or truncated archive, a full disk, an encrypted zip: one line, nothing left behind
        shutil.rmtree(temporary, ignore_errors=True)
        raise CnnlabError(f"{archive}: cannot unpack ({_reason(exc)})") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileExistsError):
        return f"it holds {Path(exc.filename or '').name!r} twice"
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def _safe_relative(archive: Path, name: str) -> PurePosixPath | None:
    """The member's path inside the target, or None for entries to leave out (macOS metadata)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]) or ".." in path.parts:
        raise CnnlabError(f"{archive}: member {name!r} points outside the folder it unpacks into; refused")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or parts[0] == "__MACOSX":
        return None
    return PurePosixPath(*parts)


class _Budget:
    """Counts files and bytes written; refuses the archive beyond the limits."""

    def __init__(self, archive: Path):
        self.archive, self.files, self.bytes = archive, 0, 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > MAX_FILES:
            raise CnnlabError(f"{self.archive}: more than {MAX_FILES:,} files; refused")

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > MAX_BYTES:
            raise CnnlabError(f"{self.archive}: unpacks to more than {MAX_BYTES / 2**30:.0f} GiB; refused")


def _copy(source, destination: Path, budget: _Budget) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "xb") as out:  # "x": a second member of the same name cannot overwrite the first
        while chunk := source.read(_CHUNK):
            budget.add_bytes(len(chunk))  # the bytes really written, whatever the header claimed
            out.write(chunk)


def _unpack_tar(archive: Path, target: Path) -> None:
    budget = _Budget(archive)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # streaming: one pass over a compressed archive
            relative = _safe_relative(archive, member.name)
            if relative is None:
                continue
            if member.isdir():
                (target / relative).mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                budget.add_file()
                source = tar.extractfile(member)
                if source is not None:
                    _copy(source, target / relative, budget)
            else:
                kind = "link" if member.issym() or member.islnk() else "device or FIFO"
                raise CnnlabError(f"{archive}: member {member.name!r} is a {kind}; archives may hold only files "
                                  "and folders")


def _unpack_zip(archive: Path, target: Path) -> None:
    budget = _Budget(archive)
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        if sum(m.file_size for m in members) > MAX_BYTES:
            raise CnnlabError(f"{archive}: unpacks to more than {MAX_BYTES / 2**30:.0f} GiB; refused")
        for member in members:
            relative = _safe_relative(archive, member.filename)
            if relative is None:
                continue
            mode = member.external_attr >> 16  # Unix mode, when the archive was made on Unix; its type bits may be 0
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "link" if stat.S_ISLNK(mode) else "device or FIFO"
                raise CnnlabError(f"{archive}: member {member.filename!r} is a {kind}; archives may hold only files "
                                  "and folders")
            if member.is_dir():
                (target / relative).mkdir(parents=True, exist_ok=True)
                continue
            budget.add_file()
            with zf.open(member) as source:  # checks the CRC at the end: corrupt data raises
                _copy(source, target / relative, budget)
