"""Every write degrades to one line (issue 31): commands that write into a run folder or an --out
on a full disk (a real tmpfs), a read-only folder (a real read-only mount), a closed or full stdout.
Each gives one `error:` line, a non-zero exit, and leaves no 0-byte or temporary file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.files import check_can_write, write_error
from tests.support.disks import fill, tmpfs
from tests.support.run_folders import cnnlab_env
from tests.support.tiny_runs import make_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("tiny"))


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """0-byte files and temporaries: what a failed write must never leave."""
    return sorted(p.name for p in folder.iterdir() if p.name != "filler" and p.is_file()
                  and (p.stat().st_size == 0 or p.name.endswith(".tmp")))


def test_write_error_codes():
    assert write_error("x", OSError(28, "No space left on device")).exit_code == 4
    assert write_error("x", OSError(30, "Read-only file system")).exit_code == 2
    assert "closed the pipe" in str(write_error(None, OSError(32, "Broken pipe")))


def test_check_can_write_on_a_full_and_a_read_only_disk(tmp_path):
    with tmpfs(tmp_path / "full", "64k") as disk:
        fill(disk)
        with pytest.raises(CnnlabError, match="No space left") as err:
            check_can_write(disk / "out.html", "the report")
        assert err.value.exit_code == 4 and leftovers(disk) == []
    with tmpfs(tmp_path / "ro", read_only=True) as disk:
        with pytest.raises(CnnlabError, match="Read-only file system"):
            check_can_write(disk / "out.html")


def test_show_out_on_a_full_disk_leaves_no_empty_png(tiny_run, tmp_path, capsys):
    with tmpfs(tmp_path / "full", "64k") as disk:
        fill(disk)
        assert main(["show", "filters", str(tiny_run), "--out", str(disk / "f.png")]) == 4
        assert "No space left" in one_error(capsys)
        assert not (disk / "f.png").exists() and leftovers(disk) == []


def test_report_into_a_read_only_folder_is_one_line(tiny_run, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", read_only=True) as disk:
        assert main(["report", str(tiny_run), "--out", str(disk / "r.html")]) == 2
        assert "Read-only file system" in one_error(capsys)


def test_explorer_on_a_read_only_run_folder_is_one_line(tiny_run, tmp_path, capsys):
    with tmpfs(tmp_path / "run", "4m", read_only=True, fill_from=tiny_run) as run:
        assert main(["explorer", str(run)]) == 2
        assert "the explorer" in one_error(capsys) and not (run / "explorer.html").exists()


def test_explorer_on_a_full_disk_is_one_line(tiny_run, tmp_path, capsys):
    with tmpfs(tmp_path / "run", "4m", fill_from=tiny_run) as run:
        fill(run)
        assert main(["explorer", str(run)]) == 4
        one_error(capsys)
        assert leftovers(run) == []


def test_explain_check_on_a_read_only_run_is_refused_before_the_work(tiny_run, tmp_path, capsys):
    with tmpfs(tmp_path / "run", "4m", read_only=True, fill_from=tiny_run) as run:
        assert main(["explain", str(run), "--check", "--images", "4"]) == 2
        captured = capsys.readouterr()
        assert "checking the attribution methods" not in captured.out  # refused before the work
        assert "Read-only file system" in captured.err and "Traceback" not in captured.err


@pytest.mark.slow  # subprocesses
def test_predict_json_into_a_full_stdout_is_one_line(tiny_run, tmp_path):
    image = next((tiny_run.parent / "data").rglob("*.png"))
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "cnnlab", "predict", str(tiny_run), str(image), "--json"],
                                stdout=full, stderr=subprocess.PIPE, text=True, env=cnnlab_env(), timeout=120)
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "No space left" in errors[0], result.stderr


@pytest.mark.slow  # subprocesses
def test_predict_json_into_a_closed_pipe_is_one_line(tiny_run):
    images = [str(p) for p in sorted((tiny_run.parent / "data").rglob("*.png"))]
    process = subprocess.Popen([sys.executable, "-m", "cnnlab", "predict", str(tiny_run), *images, "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cnnlab_env())
    process.stdout.close()  # the reader goes away before the first line (`| head -0`)
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 4, stderr
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "closed the pipe" in errors[0], stderr


def test_a_disk_that_fills_mid_run_with_tensorboard_on_is_one_warning_then_the_save_line(tmp_path):
    """The probe's case 3 on a real full disk: TensorBoard's failed writes are one warning, the epoch's
    save stops the run with its own line (exit 4), epoch 1 stays resumable."""
    from cnnlab.config import Config, DataConfig, TrainConfig
    from cnnlab.training import fit
    from tests.support.helpers import TINY_SPEC, pattern_dataset

    config = Config(model=list(TINY_SPEC), data=DataConfig(),
                    train=TrainConfig(epochs=3, batch_size=30, device="cpu", threads=1, tensorboard=True))
    lines: list[str] = []
    with tmpfs(tmp_path / "disk", "8m") as disk:
        def fill_after_first(metrics):
            if metrics["epoch"] == 1:
                fill(disk)

        with pytest.raises(CnnlabError) as err:
            fit(config, disk / "run", data=pattern_dataset(), progress=False, log=lines.append, on_epoch=fill_after_first)
        assert err.value.exit_code == 4
        assert "cannot save epoch 2" in str(err.value) and "--resume" in str(err.value)
        assert sum("TensorBoard" in line for line in lines) <= 1, lines
        assert [p.name for p in (disk / "run").iterdir() if p.name.endswith(".tmp")] == []
        from cnnlab.runs import read_resume

        assert read_resume(disk / "run")[1][3]["epoch"] == 1
