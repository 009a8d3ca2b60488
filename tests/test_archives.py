"""`folder:ARCHIVE` (`data/archives.py`): unpacked once, safely, atomically; hostile archives refused."""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from cnnlab.cli import main
from cnnlab.config import DataConfig
from cnnlab.data import archives, load_dataset
from cnnlab.errors import CnnlabError

from .support.helpers import write_image_folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_archive(folder: Path, archive: Path) -> Path:
    """`folder` packed as a zip or tar(.gz) with `folder.name` as its one top-level folder."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(folder.rglob("*")):
                zf.write(path, path.relative_to(folder.parent))
    else:
        with tarfile.open(archive, "w:gz" if archive.name.endswith(("gz", "tgz")) else "w") as tar:
            tar.add(folder, arcname=folder.name)
    return archive


def unpacked_folders(cache: Path) -> list[Path]:
    return sorted((cache / "archives").iterdir()) if (cache / "archives").is_dir() else []


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz", ".tgz", ".tar"])
def test_an_archive_of_class_folders_is_a_dataset_unpacked_once(tmp_path, cache, suffix):
    write_image_folder(tmp_path / "photos", n_per_class=6)
    archive = make_archive(tmp_path / "photos", tmp_path / f"photos{suffix}")
    shutil.rmtree(tmp_path / "photos")
    data = load_dataset(DataConfig(dataset=f"folder:{archive}", image_size=12), progress=False)
    assert data.classes == ["horizontal", "square", "vertical"] and len(data.train) + len(data.val) + len(data.test) == 18
    (first,) = unpacked_folders(cache)
    stamp = first.stat().st_mtime_ns
    load_dataset(DataConfig(dataset=f"folder:{archive}", image_size=12), progress=False)
    assert unpacked_folders(cache) == [first] and first.stat().st_mtime_ns == stamp  # not unpacked again


def test_an_archive_with_class_folders_at_its_top_works_too(tmp_path, cache):
    root = write_image_folder(tmp_path / "photos", n_per_class=4)
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, path.relative_to(root))
    assert len(load_dataset(DataConfig(dataset=f"folder:{tmp_path / 'flat.zip'}", image_size=12), progress=False).classes) == 3


def test_a_file_that_is_not_an_archive_says_so(tmp_path, cache):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CnnlabError, match="is a file, not a folder") as err:
        load_dataset(DataConfig(dataset=f"folder:{tmp_path / 'notes.txt'}"))
    assert ".zip" in str(err.value) and ".tgz" in str(err.value)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CnnlabError, match="broken.zip: cannot unpack"):
        load_dataset(DataConfig(dataset=f"folder:{tmp_path / 'broken.zip'}"))
    assert unpacked_folders(cache) == []


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("photos/a/ok.png")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, target
    return info


@pytest.mark.parametrize("member, words", [
    (_member("/etc/evil.png", size=1), "points outside"),
    (_member("photos/../../evil.png", size=1), "points outside"),
    (_member("photos/a/link.png", tarfile.SYMTYPE, target="/etc/passwd"), "is a link"),
    (_member("photos/a/hard.png", tarfile.LNKTYPE, target="photos/a/ok.png"), "is a link"),
    (_member("photos/a/tty", tarfile.CHRTYPE), "device or FIFO"),
    (_member("photos/a/pipe", tarfile.FIFOTYPE), "device or FIFO"),
])
def test_hostile_tar_members_are_refused_and_nothing_is_left(tmp_path, cache, member, words):
    archive = _tar_with(tmp_path / "evil.tar.gz", member, b"x" * member.size)
    with pytest.raises(CnnlabError, match=words):
        archives.unpacked_folder(archive)
    assert unpacked_folders(cache) == [] and not (tmp_path / "evil.png").exists()


def test_hostile_zip_members_are_refused(tmp_path, cache):
    with zipfile.ZipFile(tmp_path / "slip.zip", "w") as zf:
        zf.writestr("../outside.png", b"abc")
    with pytest.raises(CnnlabError, match="points outside"):
        archives.unpacked_folder(tmp_path / "slip.zip")
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        info = zipfile.ZipInfo("photos/a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(CnnlabError, match="is a link"):
        archives.unpacked_folder(tmp_path / "link.zip")
    assert unpacked_folders(cache) == [] and not (tmp_path / "outside.png").exists()


def test_size_and_file_count_limits(tmp_path, cache, monkeypatch):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photos/a/zeros.png", b"\0" * 200_000)  # a few hundred bytes compressed
    monkeypatch.setattr(archives, "MAX_BYTES", 100_000)
    with pytest.raises(CnnlabError, match="unpacks to more than"):
        archives.unpacked_folder(tmp_path / "bomb.zip")
    # a tar header can understate nothing (its size is what is read), but a gzip stream hides the total: counted as written
    with tarfile.open(tmp_path / "bomb.tgz", "w:gz") as tar:
        big = tarfile.TarInfo("photos/a/zeros.png")
        big.size = 200_000
        tar.addfile(big, io.BytesIO(b"\0" * 200_000))
    with pytest.raises(CnnlabError, match="unpacks to more than"):
        archives.unpacked_folder(tmp_path / "bomb.tgz")
    monkeypatch.setattr(archives, "MAX_FILES", 2)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zf:
        for i in range(3):
            zf.writestr(f"photos/a/{i}.png", b"abc")
    with pytest.raises(CnnlabError, match="more than 2 files"):
        archives.unpacked_folder(tmp_path / "many.zip")
    assert unpacked_folders(cache) == [] and not any(p.name.startswith(".unpacking") for p in (cache / "archives").iterdir())


def test_an_interrupted_unpack_leaves_nothing_that_looks_finished(tmp_path, cache, monkeypatch):
    write_image_folder(tmp_path / "photos", n_per_class=3)
    archive = make_archive(tmp_path / "photos", tmp_path / "photos.zip")

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(archives, "_copy", killed)
        with pytest.raises(KeyboardInterrupt):
            archives.unpacked_folder(archive)
    assert list((cache / "archives").iterdir()) == []
    assert archives.unpacked_folder(archive).name == "photos"  # the next try unpacks it whole


def test_show_samples_of_an_archive(tmp_path, cache):
    write_image_folder(tmp_path / "data", n_per_class=6, rgb=True)
    archive = make_archive(tmp_path / "data", tmp_path / "data.tar.gz")
    out = tmp_path / "samples.png"
    assert main(["show", "samples", "--dataset", f"folder:{archive}", "--count", "6", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
