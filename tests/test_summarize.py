"""The output-size formula, receptive field and jump checked against PyTorch; the summary command."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.config import read_config_file
from cnnlab.layers import build_model, conv_output_size, parse_layer, parse_layers, trace
from cnnlab.presets import PRESETS
from cnnlab.summarize import ShapeMismatch, format_summary, parse_input_shape, summarize, summary_to_dict

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Output size: trace vs. a real module, for one layer at a time
# ---------------------------------------------------------------------------------------------

def _conv_layer(draw) -> dict:
    kernel = draw(st.integers(1, 6))
    stride = draw(st.integers(1, 4))
    dilation = draw(st.integers(1, 3))
    padding = draw(st.one_of(st.integers(0, 4), st.sampled_from(["same", "valid"])))
    if padding == "same":
        stride = 1  # PyTorch forbids 'same' with stride > 1
    return {"type": "conv", "out_channels": 2, "kernel_size": kernel, "stride": stride, "dilation": dilation,
            "padding": padding, "padding_mode": draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))}


def _pool_layer(draw) -> dict:
    kind = draw(st.sampled_from(["maxpool", "avgpool"]))
    kernel = draw(st.integers(1, 5))
    layer = {"type": kind, "kernel_size": kernel, "stride": draw(st.integers(1, 4)),
             "padding": draw(st.integers(0, 3)), "ceil_mode": draw(st.booleans())}
    if kind == "maxpool":
        layer["dilation"] = draw(st.integers(1, 3))
    return layer


@st.composite
def single_layers(draw):
    raw = _conv_layer(draw) if draw(st.booleans()) else _pool_layer(draw)
    size = (draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    return raw, size


def _real_module(raw: dict) -> nn.Module:
    p = {k: v for k, v in raw.items() if k != "type"}
    if raw["type"] == "conv":
        return nn.Conv2d(2, p.pop("out_channels"), **p)
    if raw["type"] == "maxpool":
        return nn.MaxPool2d(**p)
    return nn.AvgPool2d(**p)


@FAST
@given(single_layers())
def test_trace_output_size_matches_pytorch(case):
    raw, (h, w) = case
    try:
        real = tuple(_real_module(raw)(torch.zeros(1, 2, h, w)).shape[1:])
    except RuntimeError:
        real = None  # PyTorch refuses this configuration (too small an input, too much padding, ...)
    try:
        spec = [parse_layer(1, raw), parse_layer(2, "flatten"), parse_layer(3, {"type": "linear", "out_features": 3})]
        traced = trace(spec, (2, h, w))[0].out_shape
    except CnnlabError:
        traced = None  # cnnlab must refuse exactly what PyTorch refuses
    assert traced == real, (raw, h, w)


@FAST
@given(n=st.integers(1, 40), kernel=st.integers(1, 7), stride=st.integers(1, 5), dilation=st.integers(1, 3),
       data=st.data())
def test_conv_output_size_formula_matches_pooling(n, kernel, stride, dilation, data):
    padding = data.draw(st.integers(0, kernel // 2))  # PyTorch: pooling padding <= kernel / 2
    ceil_mode = data.draw(st.booleans())
    expected = conv_output_size(n, kernel, stride, padding, dilation, ceil_mode)
    pool = nn.MaxPool1d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    try:
        real = pool(torch.zeros(1, 1, n)).shape[-1]
    except RuntimeError:
        real = None
    assert (expected if expected >= 1 else None) == real


# ---------------------------------------------------------------------------------------------
# Receptive field and jump: measured with gradients through a real network
# ---------------------------------------------------------------------------------------------

def _geometry_twin(raw: dict) -> nn.Module:
    """A module with the same window geometry as `raw` and all-positive weights, so that every input
    pixel in the window gets a nonzero gradient (max pooling would pass it to one pixel only)."""
    if raw["type"] == "conv" or raw["type"] == "maxpool":
        conv = nn.Conv2d(1, 1, raw["kernel_size"], stride=raw.get("stride") or raw["kernel_size"],
                         dilation=raw.get("dilation", 1), bias=False)
        nn.init.constant_(conv.weight, 1.0)
        return conv
    return nn.AvgPool2d(raw["kernel_size"], raw.get("stride"))


def _support(output: torch.Tensor, x: torch.Tensor, y: int, xpos: int) -> tuple[int, int, int, int]:
    grad, = torch.autograd.grad(output[0, 0, y, xpos], x, retain_graph=True)
    rows = grad[0, 0].abs().sum(1).nonzero().flatten()
    cols = grad[0, 0].abs().sum(0).nonzero().flatten()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@st.composite
def stacks(draw):
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            k = draw(st.integers(1, 5))
            d = draw(st.integers(1, 2))
            # No padding: it moves windows but never changes their size or spacing (the receptive
            # field and jump), while padded positions would hide part of a window from the gradient.
            layers.append({"type": "conv", "out_channels": 1, "kernel_size": k, "stride": draw(st.integers(1, 3)),
                           "dilation": d})
        else:
            k = draw(st.integers(1, 3))
            kind = draw(st.sampled_from(["maxpool", "avgpool"]))
            layer = {"type": kind, "kernel_size": k, "stride": draw(st.integers(1, 3)), "padding": 0}
            if kind == "maxpool":
                layer["dilation"] = draw(st.integers(1, 2))
            layers.append(layer)
    return layers


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks())
def test_receptive_field_and_jump_match_gradients(raw_layers):
    spec = parse_layers(raw_layers + ["flatten", {"type": "linear", "out_features": 2}])
    size = 1
    infos = None
    for size in (48, 128):
        try:
            infos = trace(spec, (1, size, size))
        except CnnlabError:
            continue
        if infos[len(raw_layers) - 1].out_shape[1] >= 3:
            break
    if infos is None or infos[len(raw_layers) - 1].out_shape[1] < 3:
        return  # strides shrank the map too far to have an interior output
    last = infos[len(raw_layers) - 1]
    network = nn.Sequential(*[_geometry_twin(layer) for layer in raw_layers])
    x = torch.ones(1, 1, size, size, requires_grad=True)
    out = network(x)
    centre = out.shape[-1] // 2
    top, bottom, left, right = _support(out, x, centre, centre)
    assert (bottom - top + 1, right - left + 1) == last.receptive_field
    _, _, left_next, _ = _support(out, x, centre, centre + 1)
    assert left_next - left == last.jump[1]


def test_receptive_field_of_global_pool_covers_the_input():
    infos = trace(parse_layers([{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
                                {"type": "maxpool", "kernel_size": 2}, "global_avg_pool", {"type": "linear"}]),
                  (1, 16, 16), 10)
    assert infos[2].receptive_field[0] >= 16


# ---------------------------------------------------------------------------------------------
# Known networks, computed by hand
# ---------------------------------------------------------------------------------------------

def test_tutorial_network_by_hand():
    summary = summarize(parse_layers(PRESETS["tutorial"]["model"]), (1, 28, 28), 10)
    assert summary.spatial_sizes() == [28, 28, 14, 14, 7]
    assert summary.param_terms() == [416, 12_832, 15_690]  # 16·25+16, 32·16·25+32, 1568·10+10
    assert summary.total_params == 28_938
    conv1, _, pool1, conv2, _, pool2, flatten, linear = summary.layers
    assert conv1.formula == "⌊(28 + 2·2 − 5)/1⌋ + 1 = 28"
    assert pool1.formula == "⌊(28 + 2·0 − 2)/2⌋ + 1 = 14"
    assert conv2.formula == "⌊(14 + 2·2 − 5)/1⌋ + 1 = 14"
    assert pool2.formula == "⌊(14 + 2·0 − 2)/2⌋ + 1 = 7"
    assert flatten.out_shape == (1568,)
    # receptive field r' = r + (k − 1)·j, jump j' = j·s
    assert [i.receptive_field[0] for i in (conv1, pool1, conv2, pool2)] == [5, 6, 14, 16]
    assert [i.jump[0] for i in (conv1, pool1, conv2, pool2)] == [1, 2, 2, 4]
    assert conv1.macs == 28 * 28 * 16 * 25
    assert linear.macs == 1568 * 10


def test_lenet5_by_hand():
    lenet = [{"type": "conv", "out_channels": 6, "kernel_size": 5}, "tanh", {"type": "avgpool", "kernel_size": 2},
             {"type": "conv", "out_channels": 16, "kernel_size": 5}, "tanh", {"type": "avgpool", "kernel_size": 2},
             "flatten", {"type": "linear", "out_features": 120}, "tanh", {"type": "linear", "out_features": 84}, "tanh",
             {"type": "linear"}]
    summary = summarize(parse_layers(lenet), (1, 32, 32), 10)
    assert summary.spatial_sizes() == [32, 28, 14, 10, 5]
    assert summary.total_params == 61_706  # the classic LeNet-5 count
    assert summary.layers[5].receptive_field == (16, 16)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_verifies(name):
    shape = (3, 32, 32) if PRESETS[name]["data"].get("image_size") == 32 else (1, 28, 28)
    summary = summarize(parse_layers(PRESETS[name]["model"]), shape, 10)
    assert summary.total_params == summary_to_dict(summary)["total_params"] > 0


def test_verification_catches_a_wrong_trace(monkeypatch):
    import importlib

    summary_module = importlib.import_module("cnnlab.summarize")

    real_trace = summary_module.trace

    def off_by_one(*args, **kwargs):
        infos = real_trace(*args, **kwargs)
        infos[0].out_shape = (infos[0].out_shape[0], infos[0].out_shape[1] + 1, infos[0].out_shape[2])
        return infos

    monkeypatch.setattr(summary_module, "trace", off_by_one)
    with pytest.raises(ShapeMismatch):
        summarize(parse_layers(PRESETS["tutorial"]["model"]), (1, 28, 28), 10)


def test_warnings_for_surprises():
    spec = parse_layers([{"type": "conv", "out_channels": 2, "kernel_size": 3, "stride": 2},
                         {"type": "maxpool", "kernel_size": 2, "ceil_mode": True},
                         {"type": "conv", "out_channels": 2, "kernel_size": 3, "padding": 2, "padding_mode": "reflect"},
                         "flatten", {"type": "linear"}])
    text = format_summary(summarize(spec, (1, 12, 12), 10))  # 12 → 5 → 3 → 5
    assert "floor division drops the last 1" in text
    assert "ceil_mode" in text
    assert "reflect padding 2 is at its limit" in text
    huge = parse_layers([{"type": "conv", "out_channels": 64, "kernel_size": 3, "padding": 1}, "flatten", {"type": "linear"}])
    assert any("huge" in w for w in summarize(huge, (3, 128, 128), 1000, verify=False).warnings)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def test_cli_tutorial(capsys):
    assert main(["summary", "--preset", "tutorial"]) == 0
    out = capsys.readouterr().out
    assert "28 → 28 → 14 → 14 → 7" in out
    assert "28,938 = 416 + 12,832 + 15,690" in out
    assert "⌊(28 + 2·2 − 5)/1⌋ + 1 = 28" in out
    assert "softmax" in out


@pytest.mark.parametrize("preset", ["cifar-fast", "cifar-gpu"])
def test_cli_describes_the_colour_folder_presets_without_a_folder(preset, capsys):
    """Training them needs --dataset folder:PATH; describing them needs only their 3x32x32 input."""
    assert main(["summary", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert f"preset {preset}: input 3x32x32" in out and "whitening (fixed)" in out
    assert ("scale ×0.111111" in out) == (preset == "cifar-gpu")  # airbench's logit scale


def test_cli_json_and_input(capsys):
    assert main(["summary", "--preset", "tutorial", "--input", "1x32x32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_shape"] == [1, 32, 32]
    assert data["spatial_sizes"] == [32, 32, 16, 16, 8]
    assert data["verified"] is True


def test_cli_config_file(tmp_path, capsys):
    path = tmp_path / "net.yaml"
    path.write_text("model:\n  - {type: conv, out_channels: 4, kernel_size: 3}\n  - relu\n  - global_avg_pool\n  - linear\n")
    assert main(["summary", "--config", str(path), "--classes", "3"]) == 0
    assert "26x26" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["summary"], "exactly one"),
    (["summary", "--preset", "tutorial", "--input", "28x28"], "CxHxW"),
    (["summary", "--preset", "nope"], "unknown preset"),
    (["summary", "--preset", "tutorial", "--input", "1x3x3"], "smaller than 1x1"),
    (["summary", "/nonexistent/run"], "no such model"),
])
def test_cli_user_mistakes(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_parse_input_shape():
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    assert parse_input_shape("1,28,28") == (1, 28, 28)
    with pytest.raises(CnnlabError):
        parse_input_shape("0x28x28")


def test_same_padding_and_rectangular_maps_in_the_table():
    spec = parse_layers([{"type": "conv", "out_channels": 2, "kernel_size": 4, "padding": "same", "dilation": 2},
                         {"type": "conv", "out_channels": 2, "kernel_size": [3, 5], "stride": [2, 1]},
                         "flatten", {"type": "linear"}])
    summary = summarize(spec, (1, 29, 29), 10)
    text = format_summary(summary)
    assert "'same' pads 3+3: (29 + 6 − 7)/1 + 1 = 29" in text  # d·(k−1) = 6 split evenly
    assert "⌊(29 + 2·0 − 3)/2⌋ + 1 = 14 | ⌊(29 + 2·0 − 5)/1⌋ + 1 = 25" in text
    assert summary.size_path() == "29x29 → 29x29 → 14x25"


def test_cli_json_nests_residual_blocks(tmp_path, capsys):
    path = tmp_path / "resnet.yaml"
    path.write_text("""model:
  - {type: conv, out_channels: 8, kernel_size: 3, padding: 1, bias: false}
  - batchnorm
  - relu
  - {type: residual, layers: [{type: conv, out_channels: 8, kernel_size: 3, padding: 1}, relu,
                              {type: conv, out_channels: 8, kernel_size: 3, padding: 1}]}
  - type: residual
    layers:
      - {type: conv, out_channels: 16, kernel_size: 3, stride: 2, padding: 1, bias: false}
      - batchnorm
      - relu
      - {type: conv, out_channels: 16, kernel_size: 3, padding: 1, bias: false}
      - batchnorm
  - global_avg_pool
  - linear
""")
    assert main(["summary", "--config", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    blocks = [layer for layer in data["layers"] if layer["type"] == "residual"]
    assert [b["shortcut"] for b in blocks][0] == []  # identity
    assert [s["type"] for s in blocks[1]["shortcut"]] == ["conv", "batchnorm"]
    assert [c["path"] for c in blocks[1]["children"]] == ["5.1", "5.2", "5.3", "5.4", "5.5"]
    assert blocks[1]["params"] == sum(c["params"] for c in blocks[1]["children"] + blocks[1]["shortcut"])
    model = build_model(parse_layers(read_config_file(path)["model"]), (1, 28, 28), 10)
    assert data["total_params"] == sum(p.numel() for p in model.parameters())
    assert main(["summary", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "  shortcut: identity" in text and "5.shortcut.1" in text and "  shortcut: conv 16 × 1x1, stride 2" in text


@pytest.mark.parametrize("layer", ["{type: conv, out_channels: 1000000000, kernel_size: 3}",
                                   "{type: linear, out_features: 1000000000}"])
def test_summary_refuses_a_layer_that_cannot_fit_in_memory(tmp_path, capsys, layer):
    from cnnlab.cli import main

    config = tmp_path / "huge.yaml"
    config.write_text(f"model: [{{type: conv, out_channels: 8, kernel_size: 3}}, {layer}, flatten, linear]\n"
                      if "conv" in layer else f"model: [{{type: conv, out_channels: 8, kernel_size: 3}}, flatten, "
                                              f"{layer}, linear]\n")
    assert main(["summary", "--config", str(config), "--input", "1x28x28"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "of memory free" in err and "Traceback" not in err


def test_training_refuses_a_model_that_cannot_fit_before_building(tmp_path):
    from cnnlab.config import Config, DataConfig, TrainConfig
    from cnnlab.errors import CnnlabError
    from cnnlab.training import fit
    from tests.support.helpers import pattern_dataset

    config = Config(model=[{"type": "conv", "out_channels": 8, "kernel_size": 3}, "flatten",
                           {"type": "linear", "out_features": 1_000_000_000}, {"type": "linear"}],
                    data=DataConfig(), train=TrainConfig(epochs=1, device="cpu", threads=1, tensorboard=False))
    with pytest.raises(CnnlabError, match=r"layer 3 \(linear.*of memory free"):
        fit(config, tmp_path / "run", data=pattern_dataset(), progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a subprocess under a memory cap
def test_under_an_address_space_cap_a_model_that_fits_the_machine_is_refused(tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.support.run_folders import cnnlab_env

    if shutil.which("prlimit") is None:
        pytest.skip("no prlimit here")
    config = tmp_path / "big.yaml"  # 3.2 GB of weights: fits the machine, not 6 GB of address space with torch in it
    config.write_text("model: [{type: conv, out_channels: 8, kernel_size: 3}, flatten, "
                      "{type: linear, out_features: 150000}, linear]\n")
    result = subprocess.run(["prlimit", f"--as={6 * 10**9}", sys.executable, "-m", "cnnlab", "summary", "--config",
                             str(config), "--input", "1x28x28"], capture_output=True, text=True, env=cnnlab_env(),
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "of memory free" in result.stderr and "Traceback" not in result.stderr and "MemoryError" not in result.stderr
