"""`cnnlab predict`: every image format and mode, bad files, JSON lines, exit codes, and the accuracy
of a trained model on MNIST digits re-drawn the way users hand them in."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main
from cnnlab.predict import BadImage, Predictor, open_image

from .conftest import mnist_root
from tests.support.user_digits import STYLES, drawn_one, encode, png_with_header, save_tiny_model, write_user_style_set


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model.safetensors")


def good_files(folder: Path) -> list[Path]:
    """The same drawn '1' in every format and mode predict must read."""
    folder.mkdir(parents=True, exist_ok=True)
    one = drawn_one()
    grey = one.convert("L")
    rgba = Image.new("RGBA", one.size, (0, 0, 0, 0))
    rgba.putalpha(Image.eval(grey, lambda v: 255 - v))  # black ink, transparent paper: a canvas export
    sixteen = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)
    frames = [one.convert("P"), Image.new("RGB", one.size, "white").convert("P")]
    files = {
        "grey.png": encode(grey), "rgb.jpg": encode(one, "JPEG", quality=80), "canvas.png": encode(rgba),
        "photo.webp": encode(one, "WEBP"), "scan.bmp": encode(one, "BMP"), "palette.png": encode(one.convert("P")),
        "sixteen-bit.tif": encode(sixteen, "TIFF"), "sixteen-bit.png": encode(sixteen),
        "animated.gif": _gif(frames), "bilevel.tiff": encode(grey.convert("1"), "TIFF"),
        "cmyk.jpg": encode(one.convert("CMYK"), "JPEG"), "large.png": encode(grey.resize((2400, 2400))),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


def _gif(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def bad_files(folder: Path) -> dict[Path, str]:
    """Broken files and the words their error line must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = encode(drawn_one(), "JPEG")
    files = {
        "empty.png": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "notes.png": (b"these are my notes, not a picture\n", "not an image"),
        "bomb.png": (png_with_header(60_000, 60_000), "limit"),
        "pixel.png": (encode(Image.new("L", (1, 1), 255)), "1x1"),
        "garbage.tif": (b"II*\x00" + b"\xff" * 64, "corrupt TIFF"),
        "broken-header.png": (encode(drawn_one())[:40], "corrupt PNG"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {folder / name: words for name, (_, words) in files.items()}


def test_every_format_and_mode_is_predicted(tiny_model, tmp_path, capsys):
    files = good_files(tmp_path / "good")
    assert main(["predict", str(tiny_model), str(tmp_path / "good"), "--json", "--top-k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(line["path"]) for line in lines] == files
    labels = set()
    for line in lines:
        assert set(line) == {"path", "label", "index", "confidence", "top_k"}
        assert len(line["top_k"]) == 3 and line["top_k"][0]["label"] == line["label"]
        probabilities = [item["probability"] for item in line["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
        assert line["confidence"] == probabilities[0]
        labels.add(line["label"])
    # The same drawing in every format: the same preprocessed input, hence the same answer.
    assert len(labels) == 1


def test_bad_files_give_one_error_line_each_and_the_rest_is_predicted(tiny_model, tmp_path, capsys):
    good = good_files(tmp_path / "mixed")
    bad = bad_files(tmp_path / "mixed")
    missing = tmp_path / "no-such-file.png"
    code = main(["predict", str(tiny_model), str(tmp_path / "mixed"), str(missing)])
    out, err = capsys.readouterr()
    assert code == 1
    predicted = [line for line in out.splitlines() if line]
    assert sorted(Path(line.rsplit(": ", 1)[0]) for line in predicted) == good
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) + 1
    for path, words in bad.items():
        (line,) = [e for e in errors if e.startswith(f"error: {path}: ")]
        assert words in line, line
    assert any(str(missing) in e and "no such file" in e for e in errors)
    assert "Traceback" not in err


def test_a_folders_files_that_are_not_images_by_extension_are_skipped_with_one_line(tiny_model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "one.PNG").write_bytes(encode(drawn_one()))
    (folder / "notes.txt").write_text("my notes")
    (folder / "labels.json").write_text("{}")
    (folder / "README").write_text("read me")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert main(["predict", str(tiny_model), str(folder)]) == 1  # the broken .jpg is still an error
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{folder / 'one.PNG'}: ") and captured.out.count("\n") == 1
    errors = captured.err.splitlines()
    assert [e for e in errors if e.startswith("error: ")] == [e for e in errors if "broken.jpg" in e]
    assert "skipped 3 file(s) whose extension is not an image's (.json, .txt, no extension)" in errors
    (folder / "broken.jpg").unlink()
    (folder / "one.PNG").unlink()
    assert main(["predict", str(tiny_model), str(folder)]) == 2
    assert "no image files found (only 3 that are not images)" in capsys.readouterr().err
    (tmp_path / "scan").write_bytes(encode(drawn_one()))  # named on its own, the content decides
    assert main(["predict", str(tiny_model), str(tmp_path / "scan")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'scan'}: ")


def test_json_errors_are_json_lines_with_path_and_error(tiny_model, tmp_path, capsys):
    bad = bad_files(tmp_path / "bad")
    assert main(["predict", str(tiny_model), *map(str, bad), "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(line["path"]) for line in lines] == list(bad)
    assert all(set(line) == {"path", "error"} for line in lines)


def test_max_pixels_flag_refuses_big_images(tiny_model, tmp_path, capsys):
    (tmp_path / "big.png").write_bytes(encode(drawn_one(600)))
    assert main(["predict", str(tiny_model), str(tmp_path / "big.png"), "--max-pixels", "100000"]) == 1
    assert "more than the limit of 100,000" in capsys.readouterr().err


def test_text_output_shows_label_confidence_and_top_k(tiny_model, tmp_path, capsys):
    (tmp_path / "one.png").write_bytes(encode(drawn_one()))
    assert main(["predict", str(tiny_model), str(tmp_path / "one.png"), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'one.png'}: ") and "%)" in line and "top-2: " in line


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_flags_are_one_line_errors(tiny_model, tmp_path, capsys, args, message):
    (tmp_path / "one.png").write_bytes(encode(drawn_one()))
    assert main(["predict", str(tiny_model), str(tmp_path / "one.png"), *args]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}, got 0"


def test_bad_model_and_empty_folder_are_one_line_errors(tiny_model, tmp_path, capsys):
    (tmp_path / "one.png").write_bytes(encode(drawn_one()))
    (tmp_path / "fake.safetensors").write_text("not a model")
    assert main(["predict", str(tmp_path / "fake.safetensors"), str(tmp_path / "one.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_model), str(tmp_path / "empty")]) == 2
    assert "no files found" in capsys.readouterr().err


def test_open_image_statuses():
    with pytest.raises(BadImage) as excinfo:
        open_image(b"hello")
    assert excinfo.value.status == 415
    with pytest.raises(BadImage) as excinfo:
        open_image(png_with_header(100_000, 100_000))
    assert excinfo.value.status == 413
    with pytest.raises(BadImage) as excinfo:
        open_image(encode(Image.new("L", (1, 1))))
    assert excinfo.value.status == 422
    assert open_image(encode(drawn_one())).size == (280, 280)


def test_predictor_batch_equals_one_by_one(tiny_model):
    predictor = Predictor.from_path(tiny_model)
    images = [drawn_one(), drawn_one(200, 30).rotate(40, fillcolor="white"), drawn_one(60, 4)]
    together = predictor.predict_images(images, k=3)
    alone = [predictor.predict_images([image], k=3)[0] for image in images]
    for a, b in zip(together, alone):
        assert a.label == b.label and abs(a.confidence - b.confidence) < 1e-5


def blank_files(folder: Path) -> list[Path]:
    """Pictures with no digit: blank paper, empty canvases (opaque or transparent), noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paper = np.clip(rng.normal(215, 4, (480, 640, 3)) * np.linspace(0.85, 1.05, 640)[None, :, None], 0, 255)
    files = {
        "white.png": encode(Image.new("L", (280, 280), 255)), "black.png": encode(Image.new("RGB", (280, 280), "black")),
        "transparent.png": encode(Image.new("RGBA", (280, 280), (0, 0, 0, 0))),
        "transparent-white.png": encode(Image.new("RGBA", (280, 280), (255, 255, 255, 0))),
        "noise.png": encode(Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8))),
        "paper-photo.jpg": encode(Image.fromarray(paper.astype(np.uint8)), "JPEG", quality=80),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


def white_one_on_transparency() -> Image.Image:
    """`drawn_one` as a dark-mode drawing app exports it: white strokes, transparent background."""
    alpha = Image.eval(drawn_one().convert("L"), lambda v: 255 - v)
    rgba = Image.new("RGBA", alpha.size, (255, 255, 255, 0))
    rgba.putalpha(alpha)
    return rgba


def test_pictures_without_a_digit_get_no_digit_found_and_the_rest_is_predicted(tiny_model, tmp_path, capsys):
    blanks = blank_files(tmp_path / "mixed")
    (tmp_path / "mixed" / "one.png").write_bytes(encode(drawn_one()))
    (tmp_path / "mixed" / "white-one.png").write_bytes(encode(white_one_on_transparency()))
    assert main(["predict", str(tiny_model), str(tmp_path / "mixed")]) == 1
    out, err = capsys.readouterr()
    assert sorted(line.rsplit(": ", 1)[0] for line in out.splitlines()) == \
        [str(tmp_path / "mixed" / "one.png"), str(tmp_path / "mixed" / "white-one.png")]
    for path in blanks:
        assert f"error: {path}: no digit found" in err, err
    assert f"{len(blanks)} of {len(blanks) + 2} file(s)" in err and "Traceback" not in err

    assert main(["predict", str(tiny_model), *map(str, blanks), "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(line["path"]) for line in lines] == blanks
    assert all(set(line) == {"path", "error"} and line["error"].startswith("no digit found") for line in lines)


def test_white_strokes_on_a_transparent_canvas_are_the_same_digit(tiny_model):
    predictor = Predictor.from_path(tiny_model)
    seen = predictor.prepare(white_one_on_transparency()).float()
    assert (seen - predictor.prepare(drawn_one()).float()).abs().mean() < 2


def test_colour_models_still_classify_blank_pictures(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "colour.safetensors", kind="resize", input_shape=(3, 16, 16))
    blanks = blank_files(tmp_path / "blanks")
    assert main(["predict", str(model), *map(str, blanks), "--json"]) == 0
    assert all("label" in json.loads(line) for line in capsys.readouterr().out.splitlines())


ACCURACY_FLOOR = 0.97
USER_STYLE_COUNT = 480


@pytest.mark.slow
@pytest.mark.skipif(mnist_root() is None, reason="MNIST not found (set CNNLAB_DATA to the folder holding MNIST/raw)")
def test_user_style_digits_accuracy(trained_mnist_run, tmp_path, capsys):
    """>= 97% on MNIST test digits as users hand them in: dark ink on light paper, large and
    off-centre on a big canvas, JPEG/PNG photos with uneven light, RGBA canvas exports."""
    import torchvision

    test = torchvision.datasets.MNIST(str(mnist_root()), train=False)
    index = np.random.default_rng(2024).choice(len(test), USER_STYLE_COUNT, replace=False)
    digits, labels = test.data.numpy()[index], test.targets.numpy()[index]
    files = write_user_style_set(tmp_path / "user-digits", digits, labels, seed=7)
    code = main(["predict", str(trained_mnist_run), str(tmp_path / "user-digits"), "--json"])
    lines = {Path(line["path"]): line for line in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 0 and len(lines) == len(files)
    by_style: dict[str, list[bool]] = defaultdict(list)
    for i, (path, label) in enumerate(files):
        by_style[STYLES[i % len(STYLES)]].append(lines[path]["label"] == str(label))
    correct = [ok for oks in by_style.values() for ok in oks]
    accuracy = sum(correct) / len(correct)
    summary = ", ".join(f"{style} {np.mean(oks):.1%}" for style, oks in by_style.items())
    print(f"user-style accuracy {accuracy:.2%} on {len(correct)} digits ({summary})")
    assert accuracy >= ACCURACY_FLOOR, summary
    assert min(np.mean(oks) for oks in by_style.values()) >= 0.93, summary


def test_channels_last_on_the_cpu_gives_the_models_own_probabilities(tiny_model):
    import torch

    predictor = Predictor.from_path(tiny_model)
    assert predictor.channels_last  # a conv net on the CPU
    inputs = torch.stack([predictor.prepare(drawn_one()), predictor.prepare(drawn_one(60, 4))])
    with torch.inference_mode():
        plain = torch.softmax(predictor.model(predictor.preprocessing.normalize(inputs).contiguous()), 1)
    assert torch.allclose(predictor.probabilities(inputs), plain, atol=1e-5)


def test_runtime_onnx_needs_the_export_and_refuses_a_stale_one(tiny_model, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import shutil

    from cnnlab.errors import CnnlabError
    from cnnlab.export import export_model

    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_model, model)
    shutil.copy(tiny_model.with_suffix(".json"), model.with_suffix(".json"))
    with pytest.raises(CnnlabError, match="does not exist; write it first with: cnnlab export"):
        Predictor.from_path(model, runtime="onnx")
    export_model(model, "onnx", check_real=False)
    fast, plain = Predictor.from_path(model, runtime="onnx"), Predictor.from_path(model)
    images = [drawn_one(), drawn_one(200, 30).rotate(40, fillcolor="white")]
    for a, b in zip(fast.predict_images(images, k=3), plain.predict_images(images, k=3)):
        assert a.label == b.label and abs(a.confidence - b.confidence) < 1e-4
    assert main(["predict", str(model), *map(str, good_files(tmp_path / "files")[:2]), "--runtime", "onnx"]) == 0
    # weights changed after the export: the file no longer gives the model's logits
    other = tmp_path / "other"
    other.mkdir()
    save_tiny_model(other / "model.safetensors", seed=1)
    shutil.copy(model.with_suffix(".onnx"), other / "model.onnx")
    with pytest.raises(CnnlabError, match="exported from other weights"):
        Predictor.from_path(other / "model.safetensors", runtime="onnx")
    # auto (the predict command's default): ONNX Runtime where the file passes the check, else PyTorch and one line
    assert Predictor.from_path(model, runtime="auto").runtime == "onnx"
    capsys.readouterr()
    assert Predictor.from_path(other / "model.safetensors", runtime="auto").runtime == "torch"
    assert "exported from other weights" in capsys.readouterr().err


def test_many_large_photos_are_decoded_in_worker_processes_without_hanging(tmp_path):
    """Forked decoders with a parent that ran torch on 2 threads: copying a 3x128x128 input is large enough
    for a parallel copy, which waited forever on the parent's OpenMP threads before the workers were set to
    one thread (a photos run's `predict` on a folder hung on its first chunk)."""
    import os
    import subprocess
    import sys

    import torch

    from cnnlab.checkpoint import save_model
    from cnnlab.layers import build_model, parse_layers
    from tests.support.helpers import TINY_SPEC
    from tests.support.run_folders import cnnlab_env

    torch.manual_seed(0)
    meta = {"layers": TINY_SPEC, "input_shape": [3, 128, 128], "classes": ["a", "b"],
            "preprocessing": {"kind": "resize", "channels": 3, "size": [128, 128], "mean": [0.5] * 3, "std": [0.25] * 3},
            "dataset": "patterns", "epoch": 1, "metrics": {}, "config": {}}
    save_model(tmp_path / "run" / "model.safetensors", build_model(parse_layers(TINY_SPEC), (3, 128, 128), 2), meta)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (150 + i, 140), (20 * i, 100, 200 - 10 * i)).save(folder / f"{i}.jpg")
    # As `predict` with an exported model does: torch runs in parallel (the ONNX parity check) before the fork.
    script = ("import sys, torch; from cnnlab.predict import Predictor, prepared_chunks, default_decodes; "
              "torch.set_num_threads(2); torch.ones(3, 400, 400).permute(1, 2, 0).contiguous(); "
              "p = Predictor.from_path(sys.argv[1], 'cpu'); "
              "print(default_decodes(), sum(len(c) for c in prepared_chunks(p, [sys.argv[2]], 2)))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(folder)], capture_output=True,
                            text=True, timeout=120, env=cnnlab_env(OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stderr
    workers, decoded = map(int, result.stdout.split())
    assert decoded == 12 and (workers >= 2 or os.cpu_count() == 1)  # forked decoders wherever there are 2 cores


def test_batches_side_by_side_give_the_same_answers_in_the_same_order(tiny_model, tmp_path):
    """`predict`'s two ONNX Runtime batches at a time (one thread each on 2 cores): the same lines, in the order of
    the files, as one batch at a time; bad files keep their place."""
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import shutil

    from cnnlab.export import export_model
    from cnnlab.predict import predict_files

    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_model, model)
    shutil.copy(tiny_model.with_suffix(".json"), model.with_suffix(".json"))
    export_model(model, "onnx", check_real=False)
    files = good_files(tmp_path / "files")
    files[3:3] = list(bad_files(tmp_path / "bad"))[:2]
    one, two = Predictor.from_path(model, runtime="onnx"), Predictor.from_path(model, runtime="onnx", batches_at_once=2)
    assert (one.batches_at_once, two.batches_at_once) == (1, 2)
    lines = [[(path, result if isinstance(result, str) else result.to_dict())
              for path, result in predict_files(predictor, files, top_k=2, batch_size=3)] for predictor in (one, two)]
    assert [path for path, _ in lines[1]] == files
    assert lines[0] == lines[1]
    assert sum(isinstance(result, str) for _, result in lines[1]) == 2
    # PyTorch keeps one batch at a time: its forward passes share one thread pool
    assert Predictor.from_path(model, runtime="torch", batches_at_once=2).batches_at_once == 1


def test_default_batch_is_smaller_for_large_inputs():
    from cnnlab.predict import BATCH_SIZE, batch_size_for

    assert batch_size_for((1, 28, 28)) == batch_size_for((3, 32, 32)) == BATCH_SIZE
    assert batch_size_for((3, 128, 128)) == 16 and batch_size_for((3, 224, 224)) == 5
    assert batch_size_for((3, 2000, 2000)) == 4
