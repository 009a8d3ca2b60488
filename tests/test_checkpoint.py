"""Checkpoints: self-describing safetensors bundles, atomic writes, strict loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

from cnnlab.checkpoint import read_metadata, save_model
from cnnlab.files import atomic_write_bytes
from cnnlab.runs import open_run
from cnnlab.errors import CnnlabError
from cnnlab.layers import build_model, parse_layers, spec_to_list

from tests.support.helpers import TINY_SPEC


def _save_tiny(path):
    layers = parse_layers(TINY_SPEC)
    model = build_model(layers, (1, 12, 12), 3)
    meta = {"layers": spec_to_list(layers), "input_shape": [1, 12, 12], "classes": ["a", "b", "c"],
            "preprocessing": {"kind": "resize", "channels": 1, "size": [12, 12], "mean": [0.5], "std": [0.25]}}
    save_model(path, model, meta)
    return model


def test_round_trip(tmp_path):
    model = _save_tiny(tmp_path / "m.safetensors")
    bundle = open_run(tmp_path / "m.safetensors")
    x = torch.rand(2, 1, 12, 12)
    model.eval()
    assert torch.equal(model(x), bundle.model(x))
    assert bundle.classes == ["a", "b", "c"] and bundle.versions["torch"] == torch.__version__
    assert bundle.input_shape == (1, 12, 12) and bundle.preprocessing.std == [0.25]
    assert json.loads((tmp_path / "m.json").read_text())["input_shape"] == [1, 12, 12]
    assert read_metadata(tmp_path / "m.safetensors")["format"] == "cnnlab-model/1"


def test_run_folder_resolves_to_model(tmp_path):
    _save_tiny(tmp_path / "model.safetensors")
    assert open_run(tmp_path).input_shape == (1, 12, 12)


def test_truncated_file_is_a_clear_error(tmp_path):
    _save_tiny(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CnnlabError, match="t.safetensors"):
        open_run(tmp_path / "t.safetensors")


def test_weights_disagreeing_with_spec(tmp_path):
    _save_tiny(tmp_path / "m.safetensors")
    meta = read_metadata(tmp_path / "m.safetensors")
    save_file({"features.0.weight": torch.zeros(9, 9)}, str(tmp_path / "x.safetensors"), metadata={"cnnlab": json.dumps(meta)})
    with pytest.raises(CnnlabError, match="weights do not match the layer spec"):
        open_run(tmp_path / "x.safetensors")


def test_not_a_model(tmp_path):
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04\x95 this is a pickle")
    with pytest.raises(CnnlabError, match="not a valid safetensors model file"):
        open_run(tmp_path / "p.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CnnlabError, match="without cnnlab metadata"):
        open_run(tmp_path / "plain.safetensors")
    with pytest.raises(CnnlabError, match="no such model file"):
        open_run(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


def test_weights_of_another_dtype_are_refused_by_name(tmp_path):
    from cnnlab.checkpoint import read_weights

    model = build_model(parse_layers(TINY_SPEC), (1, 28, 28), 3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CnnlabError, match=r"weight '[^']+' is float64 but the model needs float32"):
        read_weights(path, model.state_dict())


def test_flipped_bits_in_a_model_files_weights_are_named_as_damage(tmp_path):
    """safetensors checks offsets, not bytes: the checksum in the header catches flipped weight bits
    that would still be finite numbers."""
    model = build_model(parse_layers(TINY_SPEC), (1, 12, 12), 3)
    meta = {"layers": TINY_SPEC, "input_shape": [1, 12, 12], "classes": ["a", "b", "c"],
            "preprocessing": {"kind": "resize", "channels": 1, "size": [12, 12], "mean": [0.5], "std": [0.25]}}
    path = tmp_path / "model.safetensors"
    save_model(path, model, meta)
    assert open_run(path).classes == ["a", "b", "c"]  # whole: loads
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x01  # the lowest mantissa bit of a weight: still a finite number
    path.write_bytes(bytes(data))
    with pytest.raises(CnnlabError, match="damaged file: its weights do not match the checksum"):
        open_run(path)
