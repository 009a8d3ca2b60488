"""The benchmark (benchmarks/run.py, also `cnnlab bench`) runs end to end on a tiny budget. Benchmarks are
never timed in tests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import markdown, time_to_accuracy_png
from benchmarks.run import ALL_PRESETS, parse_presets
from cnnlab.cli import main
from cnnlab.commands import bench
from cnnlab.errors import CnnlabError
from cnnlab.presets import PRESETS

from .conftest import needs_mnist

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@needs_mnist
@pytest.mark.slow
def test_benchmark_script_runs_on_a_tiny_budget(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--presets", "fast", "--out", str(tmp_path),
                             "--machine", "test"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (json_file,) = tmp_path.glob("test-*-quick.json")
    results = json.loads(json_file.read_text())
    assert results["machine"]["matmul_gflops"] > 0
    names = [row["name"] for row in results["runs"]]
    assert names[0].startswith("tutorial") and names[1] == "cnnlab fast"
    for row in results["runs"]:
        assert row["ok"], row
        assert 0 <= row["test_accuracy"] <= 1 and row["wall_seconds"] > 0 and row["peak_rss_mb"] > 0
        assert row["train_gflops"] > 0
    runtimes = {row["runtime"]: row for row in results["inference"]["runtimes"]}
    assert runtimes["eager"]["images_per_second"] > 0 and runtimes["eager"]["latency_ms"] > 0
    table = json_file.with_suffix(".md").read_text()
    assert re.search(r"\| cnnlab fast (\(bf16\) )?\|", table) and "--quick run" in table
    assert json_file.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_preset_list_is_checked():
    assert parse_presets("all") == list(ALL_PRESETS)
    assert {"fast", "default", "best", "resnet-mnist", "cifar-fast", "resnet32", "cifar-gpu"} <= set(ALL_PRESETS) <= set(PRESETS)
    assert parse_presets("none") == []
    with pytest.raises(CnnlabError, match="unknown preset 'fastest'"):
        parse_presets("fast,fastest")


def test_cnnlab_bench_runs_the_checkouts_script(capsys):
    assert bench.benchmark_script() == SCRIPT
    assert main(["bench", "--presets", "fast,fastest"]) == 2  # refused before anything runs
    err = capsys.readouterr().err
    assert err.startswith("error: --presets: unknown preset 'fastest'") and len(err.strip().splitlines()) == 1


def test_cnnlab_bench_outside_a_checkout_says_what_it_needs(monkeypatch, capsys):
    monkeypatch.setattr(bench, "benchmark_script", lambda: None)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/run.py of a cnnlab checkout" in err and len(err.strip().splitlines()) == 1


def test_markdown_marks_failed_and_missed_runs():
    machine = {"host": "h", "cpu": "c", "gpu": None, "cores": 2, "memory_gb": 4, "os": "o", "python": "3", "torch": "2",
               "torch_threads": 2, "omp_wait_policy": "PASSIVE", "matmul_gflops": 100.0, "load_average": [0, 0, 0]}
    row = {"name": "cnnlab fast", "ok": True, "test_accuracy": 0.985, "seconds_to_0.9806": 5.0, "seconds_to_0.9900": None,
           "wall_seconds": 9.0, "cpu_seconds": 15.0, "images_per_second": 9000.0, "train_gflops": 50.0,
           "train_gflops_of_matmul": 0.5, "peak_rss_mb": 700.0}
    text = markdown({"machine": machine, "started": "2026-01-01T00:00:00", "runs": [row, {"name": "x", "ok": False,
                                                                                         "error": "boom"}]})
    assert "| cnnlab fast | 98.50% | 5.0 s | — | 9.0 s |" in text
    assert "| x | failed: boom |" in text


def test_markdown_puts_cifar_runs_in_their_own_table_with_the_85_percent_target():
    machine = {"host": "h", "cpu": "c", "gpu": None, "cores": 2, "memory_gb": 4, "os": "o", "python": "3", "torch": "2",
               "torch_threads": 2, "omp_wait_policy": "PASSIVE", "matmul_gflops": 100.0, "load_average": [0, 0, 0]}
    seed = {"name": "cnnlab cifar-fast", "preset": "cifar-fast", "precision": "bf16", "ok": True, "test_accuracy": 0.88,
            "seconds_to_0.8500": 180.0, "seconds_to_0.9806": None, "seconds_to_0.9900": None, "wall_seconds": 220.0,
            "cpu_seconds": 430.0, "images_per_second": 2500.0, "train_gflops": 250.0, "train_gflops_of_matmul": 2.5,
            "peak_rss_mb": 1500.0}
    row = {**seed, "seeds": [seed, seed, seed]}
    text = markdown({"machine": machine, "started": "2026-01-01T00:00:00", "runs": [row]})
    cifar = text.split("## CIFAR-10")[1]
    assert "| cnnlab cifar-fast (bf16, median of 3 seeds) | 88.00% | 180.0 s | 220.0 s |" in cifar
    assert "cifar-fast" not in text.split("## CIFAR-10")[0]


def test_time_to_accuracy_chart_draws_every_run_with_a_curve():
    curve = [{"seconds": 2.0, "test_accuracy": 0.97}, {"seconds": 6.0, "test_accuracy": 0.991}]
    results = {"machine": {"cpu": "test", "cores": 2, "load_average": [0.5]},
               "runs": [{"name": "tutorial recipe", "kind": "tutorial", "ok": True, "curve": curve},
                        {"name": "cnnlab fast", "kind": "preset", "preset": "fast", "ok": True, "seed": "median",
                         "seeds": [{"ok": True, "test_accuracy": 0.99, "curve": curve}], "curve": curve},
                        {"name": "cnnlab broken", "kind": "preset", "preset": "best", "ok": False}]}
    png = time_to_accuracy_png(results)
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert time_to_accuracy_png({"runs": [{"ok": False}]}) is None


def test_predict_speed_rounds_give_each_ratio_and_the_median():
    """`predict_speed.py --rounds`: each round's cnnlab / plain ONNX Runtime ratio, a failed arm's round left out
    of the median, not counted as 0."""
    from benchmarks.predict_speed import markdown as predict_markdown
    from benchmarks.predict_speed import round_ratios

    def files(ours, plain):
        return [{"arm": "cnnlab predict", "images_per_second": ours}, {"arm": "ONNX Runtime (same DataLoader)",
                                                                       "images_per_second": plain}]

    def servers(ours, plain):
        return [{"arm": "cnnlab serve", "requests_per_second": ours},
                {"arm": "plain FastAPI + ONNX Runtime", "requests_per_second": plain} if plain else
                {"arm": "plain FastAPI + ONNX Runtime", "error": "the server did not come up in time"}]

    rounds = [round_ratios(files(200, 100), servers(90, 100)), round_ratios(files(110, 100), servers(120, 100)),
              round_ratios(files(300, 100), servers(50, None))]
    assert [r["predict"]["ratio"] for r in rounds] == [2.0, 1.1, 3.0]
    assert [r["serve"]["ratio"] for r in rounds] == [0.9, 1.2, None]
    results = {"machine": "m", "date": "d", "cpu": "c", "cores": 2, "torch": "t", "onnxruntime": "o", "command": "x",
               "clients": 8, "requests": 10,
               "runs": [{"run": "r", "images": 3, "files": [], "server": [], "rounds": rounds}]}
    text = predict_markdown(results)
    assert "| 3 | 300 / 100 | 3.00x | — | — |" in text
    assert "| **median** | | **2.00x** | | **1.05x** |" in text
