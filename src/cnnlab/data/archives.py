"""`folder:photos.zip` (or .tar.gz, .tgz, .tar): an archive of class folders, unpacked once into the cache.

The archive is unpacked into `$CNNLAB_CACHE/archives/<key>/`, the key a hash of its content (the
hash itself remembered by path, size and modification time, so an unchanged archive is read once):
a changed archive is unpacked again, an archive copied or touched is not. Free space is checked
before and while unpacking, and the cache is trimmed to `CNNLAB_CACHE_MAX_GB` (default 20),
oldest use first (`cnnlab cache list|clear`). Unpacking
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

from ..errors import CnnlabError, shorten
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
    key = content_key(archive)
    target = archives_dir() / key
    if not target.is_dir():
        _unpack_atomically(archive, target)
        trim_cache(keep=target)
    _remember(archive, key)
    (target / LAST_USED).touch()  # its last use, for trimming (a file: the folder's own time stays)
    return _dataset_root(target)


LAST_USED = ".last-used"


def archives_dir() -> Path:
    return cache_root() / "archives"


def _index_path() -> Path:
    return cache_root() / "archives-index.json"  # beside archives/, which holds only unpacked folders


def _stamp(archive: Path) -> str:
    info = archive.stat()
    return json.dumps([str(archive.resolve()), info.st_size, info.st_mtime_ns])


def _read_index() -> dict[str, str]:
    try:
        index = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in index.items() if isinstance(v, str)} if isinstance(index, dict) else {}


def content_key(archive: Path) -> str:
    """A hash of the archive's bytes; remembered by (path, size, mtime) so that only a changed file is read again."""
    known = _read_index().get(_stamp(archive))
    if known:
        return known
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _remember(archive: Path, key: str) -> None:
    index = {k: v for k, v in _read_index().items() if (archives_dir() / v).is_dir()}
    if index.get(_stamp(archive)) == key:
        return
    index[_stamp(archive)] = key
    try:
        from ..files import atomic_write_text

        atomic_write_text(_index_path(), json.dumps(index))
    except OSError:
        pass  # only a cache of hashes: the next run reads the archive again


def cache_max_bytes() -> int:
    """The archive cache's size limit: CNNLAB_CACHE_MAX_GB (default 20 GB)."""
    try:
        return int(float(os.environ.get("CNNLAB_CACHE_MAX_GB", "20")) * 1e9)
    except ValueError:
        raise CnnlabError(f"CNNLAB_CACHE_MAX_GB must be a number of GB, got {shorten(os.environ['CNNLAB_CACHE_MAX_GB'])}") from None


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _last_used(folder: Path) -> float:
    marker = folder / LAST_USED
    return (marker if marker.exists() else folder).stat().st_mtime


def trim_cache(keep: Path | None = None) -> list[Path]:
    """Remove unpacked archives, least recently used first, until the cache is within `cache_max_bytes`."""
    if not archives_dir().is_dir():
        return []
    entries = sorted((p for p in archives_dir().iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=_last_used)
    sizes = {p: folder_size(p) for p in entries}
    total, removed = sum(sizes.values()), []
    for entry in entries:
        if total <= cache_max_bytes():
            break
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]
            removed.append(entry)
    return removed


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
    _check_free_space(archive, target.parent, _declared_size(archive))
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
        return f"it holds {shorten(Path(exc.filename or '').name)} twice"
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def _safe_relative(archive: Path, name: str) -> PurePosixPath | None:
    """The member's path inside the target, or None for entries to leave out (macOS metadata)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]) or ".." in path.parts:
        raise CnnlabError(f"{archive}: member {shorten(name)} points outside the folder it unpacks into; refused")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or parts[0] == "__MACOSX":
        return None
    return PurePosixPath(*parts)


SPACE_MARGIN = 256 << 20  # kept free on the cache's disk while unpacking


def _declared_size(archive: Path) -> int:
    """What the archive says it unpacks to: a zip's sizes; for a tar, its own size (a compressed tar
    tells its size only by being read, so that is checked while writing)."""
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                return sum(m.file_size for m in zf.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        pass  # reported by the unpacking itself
    return archive.stat().st_size


def _check_free_space(archive: Path, folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed + SPACE_MARGIN > free:
        raise CnnlabError(f"{archive}: unpacking needs about {needed / 1e9:.2f} GB but the cache's disk ({folder}) has "
                          f"{free / 1e9:.2f} GB free; free some space (cnnlab cache clear) or set CNNLAB_CACHE")


class _Budget:
    """Counts files and bytes written; refuses the archive beyond the limits and before the disk is full."""

    def __init__(self, archive: Path, target: Path | None = None):
        self.archive, self.files, self.bytes, self.target, self.checked = archive, 0, 0, target, 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > MAX_FILES:
            raise CnnlabError(f"{self.archive}: more than {MAX_FILES:,} files; refused")

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > MAX_BYTES:
            raise CnnlabError(f"{self.archive}: unpacks to more than {MAX_BYTES / 2**30:.0f} GiB; refused")
        if self.target is not None and self.bytes - self.checked > SPACE_MARGIN // 4:
            self.checked = self.bytes
            if shutil.disk_usage(self.target).free < SPACE_MARGIN // 2:
                raise CnnlabError(f"{self.archive}: the cache's disk is nearly full after {self.bytes / 1e9:.2f} GB "
                                  "unpacked; nothing was kept; free some space (cnnlab cache clear) or set CNNLAB_CACHE")


def _copy(source, destination: Path, budget: _Budget) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "xb") as out:  # "x": a second member of the same name cannot overwrite the first
        while chunk := source.read(_CHUNK):
            budget.add_bytes(len(chunk))  # the bytes really written, whatever the header claimed
            out.write(chunk)


def _unpack_tar(archive: Path, target: Path) -> None:
    budget = _Budget(archive, target)
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
                raise CnnlabError(f"{archive}: member {shorten(member.name)} is a {kind}; archives may hold only files "
                                  "and folders")


def _unpack_zip(archive: Path, target: Path) -> None:
    budget = _Budget(archive, target)
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
                raise CnnlabError(f"{archive}: member {shorten(member.filename)} is a {kind}; archives may hold only files "
                                  "and folders")
            if member.is_dir():
                (target / relative).mkdir(parents=True, exist_ok=True)
                continue
            budget.add_file()
            with zf.open(member) as source:  # checks the CRC at the end: corrupt data raises
                _copy(source, target / relative, budget)
