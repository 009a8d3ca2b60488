"""End to end on the real data: MNIST accuracy floors, CIFAR-10 JPEG folders, interrupt + resume.

These train real models (a minute or two in all); the `default` run is shared with other tests
through the `default_run` session fixture.
"""

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cnnlab.config import resolve_config
from cnnlab.training import fit

from .conftest import needs_mnist

pytestmark = pytest.mark.slow  # real data, real training, subprocesses

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


@needs_mnist
def test_tutorial_preset_one_epoch(tmp_path):
    config = resolve_config("tutorial", overrides={"train": {"epochs": 1}})
    result = fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert result["metrics"]["test_accuracy"] >= 0.975


@needs_mnist
def test_default_preset_reaches_99(default_run):
    meta = json.loads((default_run / "model.json").read_text())
    assert meta["metrics"]["test_accuracy"] >= 0.99
    assert meta["preprocessing"]["kind"] == "digit" and meta["classes"] == [str(d) for d in range(10)]


def extract_cifar_subset(target: Path, train_per_class: int, test_per_class: int) -> Path:
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            split, label = parts[-3], parts[-2]
            limit = train_per_class if split == "train" else test_per_class
            if counts.get((split, label), 0) >= limit:
                continue
            counts[(split, label)] = counts.get((split, label), 0) + 1
            destination = target / split / label / parts[-1]
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.extractfile(member).read())
    return target


@pytest.mark.skipif(not CIFAR.exists(), reason="cifar10-jpg.tar.gz not found beside the checkout")
def test_cifar10_jpeg_folder(tmp_path):
    root = extract_cifar_subset(tmp_path / "cifar", train_per_class=150, test_per_class=40)
    # A small colour net keeps this test quick; the rgb32/cifar-fast presets are measured by the benchmark.
    spec = tmp_path / "small.yaml"
    spec.write_text("model:\n  - {type: conv, out_channels: 16, kernel_size: 3, padding: 1}\n  - batchnorm\n  - relu\n"
                    "  - {type: maxpool, kernel_size: 2}\n  - {type: conv, out_channels: 32, kernel_size: 3, padding: 1}\n"
                    "  - batchnorm\n  - relu\n  - {type: maxpool, kernel_size: 2}\n  - global_avg_pool\n  - {type: linear}\n"
                    "train: {batch_size: 32, lr: 0.05, optimizer: sgd, flip: true}\n")
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--config", str(spec), "--dataset", f"folder:{root}",
                             "--epochs", "3", "--out", str(tmp_path / "run"), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["input_shape"] == [3, 32, 32] and len(meta["classes"]) == 10 and "airplane" in meta["classes"]
    assert meta["preprocessing"]["kind"] == "resize" and len(meta["preprocessing"]["mean"]) == 3
    assert meta["metrics"]["test_accuracy"] > 0.2  # chance is 0.1; 1,500 images and 3 epochs


@pytest.mark.skipif(not CIFAR.exists(), reason="cifar10-jpg.tar.gz not found beside the checkout")
@pytest.mark.parametrize("preset", ["cifar-fast", "cifar-gpu"])
def test_cifar_preset_trains_exports_and_predicts(tmp_path, preset):
    """The whitened bf16 presets end to end on a CIFAR subset: train, ONNX export (parity-checked), predict.

    cifar-gpu adds airbench's pieces (Lookahead, alternating flips, reflect shifts, frozen whitening bias, ...).
    """
    root = extract_cifar_subset(tmp_path / "cifar", train_per_class=100, test_per_class=20)
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--preset", preset, "--dataset", f"folder:{root}",
                             "--epochs", "6", "--batch-size", "64", "--lr", "0.1", "--out", str(run), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    meta = json.loads((run / "model.json").read_text())
    assert meta["layers"][0]["whiten"] is True and meta["config"]["train"]["precision"] == "bf16"
    assert meta["metrics"]["test_accuracy"] > 0.15  # chance is 0.1; 1,000 images, 90 steps
    exported = subprocess.run([sys.executable, "-m", "cnnlab", "export", str(run), "--format", "onnx"],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    image = next((root / "test" / "cat").iterdir())
    predicted = subprocess.run([sys.executable, "-m", "cnnlab", "predict", str(run), str(image), "--json"],
                               capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout.splitlines()[0])["label"] in meta["classes"]


@needs_mnist
def test_interrupt_then_resume_continues_with_the_right_epoch(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "cnnlab", "train", "--preset", "tutorial", "--epochs", "2", "--out", str(run),
               "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("epoch 1/2"):
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "cnnlab train --resume" in stderr and "Traceback" not in stderr
    done = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert done == [1]
    resumed = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--resume", str(run), "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # Ctrl-C saves the exact step it stopped at: resume continues inside epoch 2 (or after epoch 1
    # when the signal landed before epoch 2's first step).
    first_line = resumed.stdout.splitlines()[0]
    assert first_line.startswith(f"resuming {run}") and ("in epoch 2/2" in first_line or "after epoch 1 of 2" in first_line)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
