"""`cnnlab show ...`: every picture is written, non-blank and of the expected size; the convolution
demo computes what PyTorch computes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnlab.cli import build_parser, main
from cnnlab.commands.show import build_picture
from cnnlab.errors import CnnlabError
from cnnlab.layers import conv_output_size
from cnnlab.visualize import FILTERS, convolve, parse_kernel
from tests.support.tiny_runs import make_tiny_run

MNIST = Path(os.environ.get("CNNLAB_DATA", "")) / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason="MNIST test images not found (set CNNLAB_DATA)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("grey"))


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("rgb"), rgb=True)


def assert_picture(path: Path, expected_size: tuple[int, int]) -> None:
    """The PNG exists, has the figure's size and actually shows something."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == expected_size
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    not_white = (pixels < 245).any(axis=2).mean()
    assert not_white > 0.05, f"{path.name} is nearly blank ({100 * not_white:.1f}% drawn)"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # more than a few flat colours
    assert pixels.std() > 20


def _expected_size(argv: list[str]) -> tuple[int, int]:
    args = build_parser(argv[0]).parse_args(argv)
    fig = build_picture(args)
    return round(fig.get_figwidth() * args.dpi), round(fig.get_figheight() * args.dpi)


def write_png(tmp_path: Path) -> Path:
    image = np.zeros((20, 24, 3), dtype=np.uint8)
    image[:, 12:] = (200, 50, 20)  # a vertical edge between two colours
    path = tmp_path / "edge.png"
    Image.fromarray(image).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Every picture through the CLI
# ---------------------------------------------------------------------------------------------

def variant(*values):
    """A variant of a picture another case already draws: `make test` runs it, `make test-fast` skips it."""
    return pytest.param(*values, marks=pytest.mark.slow)


# Expected sizes follow each picture's figsize rule (inches × 100 dpi) for the tiny run's
# 4 + 6 conv filters and 6 conv/relu/pool layers.
RUN_PICTURES = [
    (["filters"], (720, 245)),
    variant(["filters", "--layer", "4"], (520, 600)),
    variant(["feature-maps", "--maps", "4"], (800, 1165)),  # drawn fast by test_feature_maps_of_an_image_file
    variant(["feature-maps", "--index", "2", "--maps", "3"], (665, 1165)),
    (["curves"], (1100, 420)),
    (["confusion"], (620, 500)),
    variant(["confusion", "--normalize"], (620, 500)),
    (["mistakes", "--count", "5"], None),
]


@pytest.mark.parametrize("picture, size", RUN_PICTURES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_run_pictures(tiny_run, tmp_path, capsys, picture, size):
    out = tmp_path / "picture.png"
    argv = ["show", picture[0], str(tiny_run), *picture[1:], "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_picture(out, size or _expected_size(argv))


@pytest.mark.slow  # large figures (seconds each); the grey tiny run's pictures stay in the fast tier
def test_rgb_filters_and_feature_maps(rgb_run, tmp_path):
    for picture, extra, size in (("filters", [], (620, 245)), ("feature-maps", ["--maps", "2"], (530, 1165))):
        out = tmp_path / f"{picture}.png"
        assert main(["show", picture, str(rgb_run), *extra, "--out", str(out)]) == 0
        assert_picture(out, size)


def test_feature_maps_of_an_image_file(tiny_run, tmp_path):
    out = tmp_path / "maps.png"
    argv = ["show", "feature-maps", str(tiny_run), "--image", str(write_png(tmp_path)), "--maps", "2", "--out", str(out)]
    assert main(argv) == 0
    assert_picture(out, (530, 1165))


def test_samples_of_a_folder_dataset(tiny_run, tmp_path):
    out = tmp_path / "samples.png"
    argv = ["show", "samples", "--dataset", f"folder:{tiny_run.parent / 'data'}", "--image-size", "12",
            "--count", "6", "--columns", "3", "--out", str(out)]
    assert main(argv) == 0
    assert_picture(out, (round((1.3 * 3 + 0.4) * 100), round((1.45 * 2 + 0.6) * 100)))


@needs_mnist
@pytest.mark.slow  # real MNIST
def test_samples_of_mnist(tmp_path):
    out = tmp_path / "samples.png"
    assert main(["show", "samples", "--count", "8", "--split", "test", "--out", str(out)]) == 0
    assert_picture(out, (round((1.3 * 8 + 0.4) * 100), round((1.45 + 0.6) * 100)))


@needs_mnist
@pytest.mark.slow  # real MNIST
def test_convolve_defaults_to_a_real_mnist_digit(tmp_path, capsys):
    out = tmp_path / "convolve.png"
    assert main(["show", "convolve", "--out", str(out)]) == 0
    assert_picture(out, (1650, 390))  # input, kernel, feature map, ReLU, pooling


@pytest.mark.parametrize("extra, size", [
    variant(["--grey", "--filter", "emboss", "--pool", "none"], (1320, 390)),  # no pooling panel
    (["--grey", "--filter", "1,0,-1; 2,0,-2; 1,0,-1", "--stride", "2", "--padding", "0", "--pool", "avg"], (1650, 390)),
    variant(["--grey", "--filter", "sharpen", "--padding", "same", "--padding-mode", "circular"], (1650, 390)),
    # colour: per-channel rows (channel, kernel, product), then the sum, ReLU and pooling
    variant(["--filter", "sobel-x", "--filter", "sobel-y", "--filter", "blur", "--padding-mode", "reflect"],
            (1450, 1350)),  # the largest figure: seconds
])
def test_convolve_an_image_file(tmp_path, extra, size):
    out = tmp_path / "convolve.png"
    assert main(["show", "convolve", "--image", str(write_png(tmp_path)), *extra, "--out", str(out)]) == 0
    assert_picture(out, size)


@pytest.mark.parametrize("argv, message", [
    (["show", "convolve", "--filter", "wobble"], "unknown filter name"),
    (["show", "convolve", "--filter", "1,2;3"], "same number of values"),
    (["show", "convolve", "--image", "/nonexistent.png"], "no such file"),
    # --image files are decoded by predict.open_image, with its one-line reasons
    (["show", "convolve", "--image", "TEXT"], "not an image"),
    (["show", "feature-maps", "RUN", "--image", "TEXT"], "not an image"),
    (["show", "feature-maps", "RUN", "--image", "/nonexistent.png"], "no such file"),
    (["show", "convolve", "--image", "IMAGE", "--filter", "edge", "--filter", "blur"], "one per channel"),
    (["show", "convolve", "--image", "IMAGE", "--padding", "30", "--padding-mode", "reflect"], "reflect padding 30"),
    (["show", "convolve", "--image", "IMAGE", "--padding", "same", "--stride", "2"], "stride 1"),
    (["show", "convolve", "--image", "IMAGE", "--out", "picture.jpg"], "PNG"),
    (["show", "filters", "RUN", "--layer", "2"], "not a conv layer"),
    (["show", "feature-maps", "RUN", "--index", "999"], "--index 999"),
    (["show", "curves", "/nonexistent/run"], "no such model"),
])
def test_user_mistakes_are_one_line(tiny_run, tmp_path, capsys, argv, message):
    image = write_png(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    names = {"IMAGE": str(image), "RUN": str(tiny_run), "TEXT": str(text)}
    argv = [names.get(a, a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_curves_without_history(tiny_run, tmp_path, capsys):
    history = tiny_run / "metrics.jsonl"
    saved = history.read_text()
    history.unlink()
    try:
        assert main(["show", "curves", str(tiny_run), "--out", str(tmp_path / "c.png")]) == 2
        assert "no training history" in capsys.readouterr().err
    finally:
        history.write_text(saved)


# ---------------------------------------------------------------------------------------------
# The convolution itself
# ---------------------------------------------------------------------------------------------

def test_sobel_x_finds_vertical_edges_only():
    image = np.zeros((1, 16, 16), dtype=np.float32)
    image[:, :, 8:] = 1.0  # vertical edge between columns 7 and 8
    vertical = convolve(image, [parse_kernel("sobel-x")[1]], padding=0, pool="none")
    assert np.abs(vertical.feature_map[:, 6:8]).min() == 4.0  # the two columns that straddle the edge
    assert np.abs(vertical.feature_map[:, :5]).max() == 0 and np.abs(vertical.feature_map[:, 9:]).max() == 0
    horizontal = convolve(image.transpose(0, 2, 1).copy(), [parse_kernel("sobel-x")[1]], padding=0, pool="none")
    assert np.abs(horizontal.feature_map).max() == 0  # a horizontal edge gives no sobel-x response


@pytest.mark.parametrize("stride, padding, mode, dilation", [
    (1, 0, "zeros", 1), (2, 1, "zeros", 1), (3, 2, "reflect", 1), (2, 1, "replicate", 2), (1, 3, "circular", 1),
    (1, "same", "zeros", 2), (2, "valid", "zeros", 1),
])
def test_output_size_follows_the_formula(stride, padding, mode, dilation):
    image = np.random.default_rng(0).random((1, 13, 11)).astype(np.float32)
    result = convolve(image, [np.ones((3, 3), dtype=np.float32)], stride, padding, mode, dilation, pool="max")
    pad = {"same": dilation, "valid": 0}.get(padding, padding)  # 3x3: 'same' pads d·(3−1)/2
    expected = tuple(conv_output_size(n, 3, stride, pad, dilation) for n in (13, 11))
    assert result.feature_map.shape == expected
    assert str(expected[0]) in result.conv_formula
    assert result.pooled.shape == tuple(n // 2 for n in expected)


def test_rgb_products_sum_to_the_multichannel_convolution():
    rng = np.random.default_rng(1)
    image = rng.random((3, 10, 9)).astype(np.float32)
    kernels = [parse_kernel(name)[1] for name in ("sobel-x", "emboss", "blur")]
    result = convolve(image, kernels, stride=2, padding=1, pool="none")
    weight = torch.from_numpy(np.stack(kernels))[None]  # (1 output, 3 input channels, 3, 3)
    expected = F.conv2d(torch.from_numpy(image)[None], weight, stride=2, padding=1)[0, 0].numpy()
    assert np.allclose(result.products.sum(0), result.feature_map)
    assert np.allclose(result.feature_map, expected, atol=1e-5)
    assert np.allclose(result.relu, np.maximum(expected, 0), atol=1e-5)


def test_parse_kernel_forms():
    assert parse_kernel("Sobel-X")[0] == "sobel-x"
    assert parse_kernel("-1,0,1; -2,0,2; -1,0,1")[1].tolist() == FILTERS["sobel-x"]
    assert parse_kernel("[[0, 1], [1, 0]]")[1].shape == (2, 2)
    assert parse_kernel("1 2 1")[1].shape == (1, 3)
    for bad in ("", "a,b;c,d", "[[1,2],[3]]", ";".join(["1"] * 40)):
        with pytest.raises(CnnlabError):
            parse_kernel(bad)


@needs_mnist
@pytest.mark.slow  # real MNIST
def test_mnist_digit_reader():
    from cnnlab.visualize import mnist_test_digit

    digit, label = mnist_test_digit(4)
    assert label == 4 and digit.shape == (1, 28, 28) and 0.9 < digit.max() <= 1.0
    with pytest.raises(CnnlabError):
        mnist_test_digit(10_000)


RESIDUAL_SPEC = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, "relu",
                 {"type": "residual", "layers": [{"type": "conv", "out_channels": 6, "kernel_size": 3, "stride": 2,
                                                  "padding": 1}, "relu",
                                                 {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1}]},
                 "global_avg_pool", {"type": "linear"}]


@pytest.mark.slow  # large figures (seconds each); the grey tiny run's pictures stay in the fast tier
def test_residual_blocks_in_filters_and_feature_maps(tmp_path, capsys):
    from cnnlab.runs import open_run
    from cnnlab.visualize import conv_layers, feature_maps_figure, pick_test_image

    run = make_tiny_run(tmp_path, spec=RESIDUAL_SPEC)
    context = open_run(run)
    assert [path for path, _, _ in conv_layers(context)] == ["1", "3.1", "3.3"]  # not the 1x1 shortcut
    out = tmp_path / "f.png"
    assert main(["show", "filters", str(run), "--layer", "3.3", "--out", str(out)]) == 0 and out.exists()
    assert "3.1" in (main(["show", "filters", str(run), "--layer", "3.9", "--out", str(out)]) == 2
                     and capsys.readouterr().err)
    image, caption = pick_test_image(context, 0)
    fig = feature_maps_figure(context, image, caption)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert any(t.startswith("layer 3: residual: 3 layers + conv shortcut") and "→  6x6x6  (" in t for t in titles)
