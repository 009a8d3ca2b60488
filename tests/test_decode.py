"""The image door (`data/decode.py`, issue 31): every user image is opened there, and what the
preprocessing would make of an image (a 4,900,000 x 8 strip resized to gigabytes) is refused from
its header, with one line, before anything is decoded."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from cnnlab.data import decode, folders
from cnnlab.data.decode import (MAX_ASPECT_RATIO, BadImage, ImageTooLarge, check_prepared, open_image, resized_size)
from cnnlab.data.folders import load_folder
from cnnlab.data.preprocess import Preprocessing, resize_center_crop
from cnnlab.errors import CnnlabError
from tests.support.helpers import save_random_colour_model

COLOUR_32 = Preprocessing("resize", 3, (32, 32), [0.5] * 3, [0.25] * 3)
SRC = Path(__file__).resolve().parents[1] / "src" / "cnnlab"


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, "PNG")
    return buffer.getvalue()


def test_only_the_door_opens_images():
    """No module but data/decode.py decodes a file or bytes a user handed over (Image.open)."""
    openers = sorted(str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                     if re.search(r"\bImage\.open\(", path.read_text(encoding="utf-8")))
    assert openers == ["data/decode.py"]


def test_a_long_strip_is_refused_before_decoding_with_the_size_resizing_would_give():
    strip = png(1_000_000, 8)  # 8 MB decoded, under every limit; resized for 32x32 it would be 512 MB
    with pytest.raises(ImageTooLarge) as err:
        open_image(strip, prepared=COLOUR_32)
    message = str(err.value)
    assert err.value.status == 413 and "\n" not in message
    assert "1000000x8" in message and "4000000x32" in message and "512 MB" in message
    # without the preprocessing it is only its decoded size that counts: 8 MB is allowed
    assert open_image(strip).size == (1_000_000, 8)


def test_an_extreme_aspect_ratio_is_refused_as_unusable():
    with pytest.raises(BadImage, match=r"aspect ratio of 250:1") as err:
        open_image(png(2_000, 8), prepared=COLOUR_32)
    assert err.value.status == 422
    assert open_image(png(8 * MAX_ASPECT_RATIO, 8), prepared=COLOUR_32).size == (800, 8)


@pytest.mark.parametrize("width, height", [(640, 480), (8, 8), (33, 7000 // 100), (4000, 3000)])
def test_the_check_uses_the_resize_formula_itself(width, height):
    """What is checked is what `resize_center_crop` allocates: the same formula."""
    new = resized_size(width, height, (32, 32))
    check_prepared(width, height, COLOUR_32, new[0] * new[1] * 4)  # exactly fits: no error
    with pytest.raises(ImageTooLarge):
        check_prepared(width, height, COLOUR_32, new[0] * new[1] * 4 - 1)
    if width * height < 1_000_000:
        resized = resize_center_crop(Image.new("RGB", (width, height)), (32, 32), 3)
        assert resized.shape == (32, 32, 3)


def test_digit_models_check_only_the_aspect_ratio():
    digit = Preprocessing("digit", 1, (28, 28), [0.1], [0.3])
    check_prepared(6_000, 6_000, digit, 1)  # the digit pipeline shrinks first: no resized copy to count
    with pytest.raises(BadImage, match="aspect ratio"):
        check_prepared(6_000, 8, digit, 1)


def test_a_dangling_symlink_is_named_as_such(tmp_path):
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "missing.png")
    with pytest.raises(BadImage, match="dangling symbolic link"):
        open_image(link)


def test_a_memory_error_while_decoding_is_one_line(monkeypatch):
    def no_memory(self):
        raise MemoryError

    data = png(64, 64)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_memory)
    with pytest.raises(decode.OutOfMemory, match="not enough memory") as err:
        open_image(data)
    assert err.value.status == 503


# ---------------------------------------------------------------------------------------------
# The server, predict and datasets go through the door
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> Path:
    return save_random_colour_model(tmp_path_factory.mktemp("model"))


def test_the_server_answers_a_strip_with_413_not_500(colour_model):
    from fastapi.testclient import TestClient

    from cnnlab.serve.app import create_app

    with TestClient(create_app(colour_model)) as client:
        response = client.post("/predict", content=png(1_000_000, 8), headers={"content-type": "image/png"})
        assert response.status_code == 413, response.text
        assert "resizing" in response.json()["detail"]
        normal = client.post("/predict", content=png(64, 48, "RGB"), headers={"content-type": "image/png"})
        assert normal.status_code == 200


def test_the_server_answers_a_decode_out_of_memory_with_503_not_500(colour_model, monkeypatch):
    from fastapi.testclient import TestClient

    from cnnlab.serve.app import create_app

    data = png(64, 48, "RGB")

    def no_memory(self):
        raise MemoryError

    with TestClient(create_app(colour_model)) as client:
        monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_memory)
        response = client.post("/predict", content=data, headers={"content-type": "image/png"})
        assert response.status_code == 503 and "not enough memory" in response.json()["detail"]
        monkeypatch.undo()
        assert client.post("/predict", content=data, headers={"content-type": "image/png"}).status_code == 200


def test_predict_refuses_a_strip_in_one_line(colour_model, tmp_path, capsys):
    from cnnlab.cli import main

    strip = tmp_path / "strip.png"
    strip.write_bytes(png(1_000_000, 8))
    assert main(["predict", str(colour_model), str(strip)]) == 1
    err = capsys.readouterr().err
    assert "strip.png" in err and "resizing its shorter side" in err and "Traceback" not in err


def _folder(root: Path, extra: dict[str, tuple[int, int]]) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    for name, size in extra.items():
        Image.new("L", size, 200).save(root / "a" / name)
    return root


def test_a_dataset_strip_over_the_budget_once_resized_names_the_file(tmp_path):
    root = _folder(tmp_path / "d", {"strip.png": (10, 1_000)})  # 10 KB decoded; 64 x 6400 x 4 = 1.6 MB resized
    with pytest.raises(CnnlabError, match=r"strip\.png.*resizing") as err:
        load_folder(root, image_size=64, max_decoded_mb=0.1, progress=False)
    assert "data.skip_bad" in str(err.value)
    data = load_folder(root, image_size=64, max_decoded_mb=0.1, skip_bad=True, progress=False)
    assert data.stats["skipped"] == 1


def test_a_skip_for_lack_of_memory_is_not_cached(tmp_path, monkeypatch, capsys):
    root = _folder(tmp_path / "d", {})
    real = folders.resize_center_crop
    calls = {"n": 0}

    def short_of_memory(image, size, channels):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError
        return real(image, size, channels)

    monkeypatch.setattr(folders, "resize_center_crop", short_of_memory)
    first = load_folder(root, image_size=12, progress=False)
    err = capsys.readouterr().err
    assert first.stats["skipped"] == 1 and "out of memory" in err and "not cached" in err
    second = load_folder(root, image_size=12, progress=False)  # decoded again: the file is whole
    assert second.stats["skipped"] == 0 and len(second.train) + len(second.test) == 6


def test_the_size_statistics_name_real_images(tmp_path):
    """30x3 and 3x30 images are not "3x3 to 30x30": the smallest and largest images are named as they are."""
    root = _folder(tmp_path / "d", {"wide.png": (60, 6), "tall.png": (6, 60), "big.png": (200, 100)})
    data = load_folder(root, image_size=12, progress=False)
    assert data.stats["sizes"][:2] in ([60, 6], [6, 60]) and data.stats["sizes"][2:] == [200, 100]


def test_a_dangling_symlink_in_a_dataset_is_skipped_with_a_warning(tmp_path, capsys):
    root = _folder(tmp_path / "d", {})
    (root / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    data = load_folder(root, image_size=12, progress=False)
    err = capsys.readouterr().err
    assert data.stats["skipped"] == 1 and "gone.png: a dangling symbolic link" in err


def test_a_link_to_the_dataset_root_is_not_a_class(tmp_path, capsys):
    root = _folder(tmp_path / "d", {})
    (root / "loop").symlink_to(root)
    data = load_folder(root, image_size=12, progress=False)
    assert data.classes == ["a", "b"] and "loop" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess under a memory cap
def test_the_probes_strip_under_a_memory_cap_is_one_line(colour_model, tmp_path):
    """The probe's case: 4,900,000 x 8 (38 KB, 39 MB decoded) to predict on a colour run, under a 6 GB
    address-space cap: was a 4.6 GB peak and a MemoryError traceback; now one line from the header."""
    import shutil
    import subprocess
    import sys

    from tests.support.run_folders import cnnlab_env

    if shutil.which("prlimit") is None:
        pytest.skip("no prlimit here")
    strip = tmp_path / "strip.png"
    strip.write_bytes(png(4_900_000, 8))
    result = subprocess.run(["prlimit", f"--as={6 * 10**9}", sys.executable, "-m", "cnnlab", "predict", str(colour_model),
                             str(strip)], capture_output=True, text=True, env=cnnlab_env(), timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "4900000x8" in lines[0] and "MemoryError" not in result.stderr, result.stderr
