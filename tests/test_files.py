"""Atomic writes and bounded reads (`cnnlab.files`)."""

from __future__ import annotations

import os

import pytest

from cnnlab.errors import CnnlabError
from cnnlab.files import (atomic_write_bytes, atomic_write_text, read_bytes_bounded, read_json, read_up_to,
                          remove_stale_temp_files)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as shareable as any new file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  (fails inside the write)
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".model.safetensors.abc.tmp").write_bytes(b"half")
    (tmp_path / "model.safetensors").write_bytes(b"whole")
    remove_stale_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_bounded_reads_refuse_folders_devices_and_large_files(tmp_path):
    small = tmp_path / "a.json"
    small.write_text('{"epoch": 1}')
    assert read_bytes_bounded(small, 100) == b'{"epoch": 1}'
    assert read_json(small) == {"epoch": 1}
    for path, limit, message in ((small, 5, "more than the 5"), (tmp_path, 100, "not a regular file"),
                                 ("/dev/zero", 100, "not a regular file"), (tmp_path / "missing", 100, "cannot read")):
        with pytest.raises(CnnlabError, match=message):
            read_bytes_bounded(path, limit, "config")


def test_read_up_to_reads_what_stat_said_and_what_a_growing_file_added_up_to_the_limit():
    import io

    assert read_up_to(io.BytesIO(b"abcd"), 4, 100) == b"abcd"
    assert read_up_to(io.BytesIO(b"abcdefgh"), 4, 100) == b"abcdefgh"  # grew after its stat: all of it
    assert read_up_to(io.BytesIO(b"abcdefgh"), 4, 5) == b"abcdef"      # grew past the limit: limit + 1, refused by the caller
    assert read_up_to(io.BytesIO(b"ab"), 4, 100) == b"ab"              # shrank


def test_read_json_names_the_file_when_it_is_not_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CnnlabError, match=f"{bad}: not valid JSON") as error:
        read_json(bad)
    assert "\n" not in str(error.value)
