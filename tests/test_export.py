"""`cnnlab export`: ONNX and torch.export (.pt2) with a dynamic batch, BatchNorm folded, metadata,
and the parity check against the original model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import export as export_module
from cnnlab.runs import open_run
from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.export import export_model, fold_batchnorm

from .conftest import mnist_root
from tests.support.user_digits import save_tiny_model

onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model.safetensors")


def test_fold_batchnorm_keeps_outputs_and_folds_what_can_be_folded(tiny_model):
    model = open_run(tiny_model).model
    folded, count, left = fold_batchnorm(model)
    # conv+bn and linear+bn fold; the bn after a relu cannot.
    assert (count, left) == (2, 1)
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2  # the original is untouched


def test_onnx_export_runs_in_onnxruntime_with_any_batch_and_carries_metadata(tiny_model, tmp_path):
    out = tmp_path / "digits.onnx"
    report = export_model(tiny_model, "onnx", out, check_real=False)
    assert report["path"] == str(out) and report["max_abs_diff"]["random"] <= 1e-4
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)  # what Netron and other viewers need
    assert len(proto.graph.initializer) > 0 and not any(t.data_location == 1 for t in proto.graph.initializer)  # weights inside
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("BatchNormalization") == 1  # only the one that cannot be folded
    meta = {p.key: p.value for p in proto.metadata_props}
    stored = json.loads(meta["cnnlab"])
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)] and stored["input_shape"] == [1, 28, 28]
    assert stored["preprocessing"]["kind"] == "digit" and stored["mean"] == [0.1307] and stored["std"] == [0.3081]

    model = open_run(tiny_model).model
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 32):
        x = torch.randn(batch, 1, 28, 28)
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.inference_mode():
            assert np.abs(logits - model(x).numpy()).max() <= 1e-4


@pytest.mark.slow  # an exporter run takes seconds; the ONNX test above stays in the fast tier
def test_pt2_export_loads_with_torch_export_and_has_metadata(tiny_model, tmp_path):
    out = tmp_path / "digits.pt2"
    report = export_model(tiny_model, "pt2", out, check_real=False)
    assert report["max_abs_diff"]["random"] <= 1e-4
    sidecar = json.loads((tmp_path / "digits.pt2.json").read_text())
    assert sidecar["classes"] == [str(i) for i in range(10)] and sidecar["batchnorm_folded"] == 2
    with zipfile.ZipFile(out) as archive:
        inside = [name for name in archive.namelist() if name.endswith("cnnlab.json")]
        assert inside and json.loads(archive.read(inside[0]))["input_shape"] == [1, 28, 28]
    program = torch.export.load(str(out))  # our own file: loading it is safe
    model = open_run(tiny_model).model
    for batch in (1, 9):
        x = torch.randn(batch, 1, 28, 28)
        with torch.inference_mode():
            assert (program.module()(x) - model(x)).abs().max() <= 1e-4


@pytest.mark.slow  # an exporter run takes seconds; the ONNX test above stays in the fast tier
def test_default_output_path_is_beside_the_model(tiny_model, capsys):
    assert main(["export", str(tiny_model), "--no-real-images"]) == 0  # ONNX when no --format is given
    out = capsys.readouterr().out
    target = tiny_model.with_suffix(".onnx")
    assert target.exists() and f"exported {target}" in out and "parity with the original" in out
    assert oct(target.stat().st_mode & 0o777) != "0o600"  # shareable, not the temp file's mode


@pytest.mark.slow  # an exporter run takes seconds; the ONNX test above stays in the fast tier
def test_parity_failure_fails_and_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    real_run = export_module.run_exported
    monkeypatch.setattr(export_module, "run_exported", lambda path, fmt, x: real_run(path, fmt, x) + 1e-3)
    out = tmp_path / "bad.onnx"
    with pytest.raises(CnnlabError, match="parity check failed.*1.00e-03"):
        export_model(tiny_model, "onnx", out, check_real=False)
    assert not out.exists() and not list(tmp_path.iterdir())  # not even the temporary file


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--out", "model.pt2"], "should end in .onnx"),
    (["--format", "onnx", "--tolerance", "0"], "--tolerance must be positive"),
])
def test_bad_arguments_are_one_line_errors(tiny_model, tmp_path, capsys, args, message):
    args = [a if a != "model.pt2" else str(tmp_path / a) for a in args]
    assert main(["export", str(tiny_model), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "pt2"]) == 2
    assert "no such model file" in capsys.readouterr().err


@pytest.mark.skipif(mnist_root() is None, reason="MNIST not found (set CNNLAB_DATA to the folder holding MNIST/raw)")
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.slow  # real MNIST
def test_parity_on_real_mnist_images(tiny_model, tmp_path, fmt):
    report = export_model(tiny_model, fmt, tmp_path / f"m.{fmt}")
    assert "mnist test images" in report["real_inputs"]
    assert report["max_abs_diff"]["real"] <= 1e-4 and report["max_abs_diff"]["random"] <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(mnist_root() is None, reason="MNIST not found (set CNNLAB_DATA to the folder holding MNIST/raw)")
def test_trained_model_exports_to_both_formats_within_tolerance(trained_mnist_run, tmp_path, capsys):
    for fmt in ("onnx", "pt2"):
        assert main(["export", str(trained_mnist_run), "--format", fmt, "--out", str(tmp_path / f"m.{fmt}"), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["max_abs_diff"]["real"] <= 1e-4 and report["max_abs_diff"]["random"] <= 1e-4


@pytest.mark.slow  # an exporter run takes seconds; the ONNX test above stays in the fast tier
def test_residual_network_exports_with_parity(tmp_path):
    from cnnlab.checkpoint import save_model
    from cnnlab.layers import build_model, parse_layers, spec_to_list

    block = {"type": "residual", "layers": [{"type": "conv", "out_channels": 8, "kernel_size": 3, "stride": 2,
                                             "padding": 1, "bias": False}, "batchnorm", "relu",
                                            {"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1,
                                             "bias": False}, "batchnorm"]}
    layers = parse_layers([{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, "relu", block,
                           "global_avg_pool", {"type": "linear"}])
    torch.manual_seed(0)
    model = build_model(layers, (1, 12, 12), 3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, so folding is really tested
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"layers": spec_to_list(layers), "input_shape": [1, 12, 12], "classes": ["a", "b", "c"],
                             "preprocessing": {"kind": "resize", "channels": 1, "size": [12, 12], "mean": [0.5],
                                               "std": [0.25]}})
    for fmt in ("onnx", "pt2"):
        report = export_model(path, fmt, tmp_path / f"m.{fmt}", check_real=False)
        assert report["max_abs_diff"]["random"] <= 1e-4
        assert report["batchnorm_folded"] == 3  # body's two and the shortcut's, inside the block
