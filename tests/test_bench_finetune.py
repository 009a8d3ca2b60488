"""benchmarks/finetune.py (the fine-tuning experiment) runs end to end on a tiny CIFAR-shaped archive and
writes its table. Never timed: the numbers of a --quick run mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.finetune import SOURCE_CLASSES, TARGET_CLASSES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py"


def tiny_cifar(folder: Path, per_class: int) -> Path:
    """A .tar.gz in the layout of cifar10-jpg.tar.gz: train/<class>/*.jpg and test/<class>/*.jpg."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for index, name in enumerate(SOURCE_CLASSES + TARGET_CLASSES):
            (folder / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8) + np.uint8(19 * index)
                Image.fromarray(pixels).save(folder / split / name / f"{i}.jpg")
    archive = folder / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "train", "train")
        tar.add(folder / "test", "test")
    return archive


@pytest.mark.slow
def test_finetune_experiment_runs_on_a_tiny_archive(tmp_path):
    archive = tiny_cifar(tmp_path / "images", per_class=6)
    out, work = tmp_path / "results", tmp_path / "work"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--archive", str(archive), "--per-class", "4",
                             "--out", str(out), "--work", str(work), "--machine", "test"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (json_file,) = out.glob("finetune-test-*-quick.json")
    results = json.loads(json_file.read_text())
    (row,) = results["seeds"]
    for arm in ("scratch", "fine-tune", "head only", "rgb32"):
        assert 0 <= row[arm]["test_accuracy"] <= 1 and row[arm]["seconds"] > 0, arm
    # The fine-tuned runs really started from the source model: training said what it loaded and replaced.
    assert any("init from" in line for line in row["fine-tune"]["log"]), row["fine-tune"]["log"]
    assert any("frozen" in line for line in row["head only"]["log"]), row["head only"]["log"]
    table = json_file.with_suffix(".md").read_text()
    assert "| fine-tune |" in table and "| scratch |" in table
    assert not (work / "quick").exists()  # removed once the results are written
