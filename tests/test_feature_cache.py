"""The head trained on cached features (feature_cache.py) learns what training on the images learns, faster.

A tiny network whose features are frozen stands in for a pretrained backbone: its head trains the same on cached
features as on images (same order, same flips), the probe is epoch 0 of the history and a run resumes after it.
"""

from __future__ import annotations

import json

import pytest
import torch

from cnnlab.config import resolve_config
from cnnlab.data import Dataset
from cnnlab.errors import CnnlabError
from cnnlab.feature_cache import head_start, why_not
from cnnlab.training import fit
from tests.support.helpers import pattern_images

SPEC = [{"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1}, "batchnorm", "relu",
        {"type": "maxpool", "kernel_size": 2}, "global_avg_pool", {"type": "linear"}]


def dataset() -> Dataset:
    from cnnlab.data.tensors import ImageTensors

    images, labels = pattern_images(20, 12, seed=0)
    images = images.repeat(1, 3, 1, 1)  # colour, as photos are
    test_images, test_labels = pattern_images(6, 12, seed=1)
    val = torch.arange(0, len(labels), 6)
    keep = torch.tensor([i for i in range(len(labels)) if i % 6])
    return Dataset("patterns", ImageTensors(images[keep], labels[keep]), ImageTensors(test_images.repeat(1, 3, 1, 1), test_labels),
                   ["horizontal", "vertical", "square"], "resize", val=ImageTensors(images[val], labels[val]))


def config(**train):
    settings = {"epochs": 2, "batch_size": 8, "lr": 0.05, "optimizer": "sgd", "flip": True, "freeze": "features",
                "device": "cpu", "threads": 1, "tensorboard": False, "schedule": "constant", **train}
    return resolve_config(None, {"model": SPEC}, {"train": settings})


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "resume.safetensors"))


def trained(tmp_path, name, **train):
    lines: list[str] = []
    fit(config(**train), tmp_path / name, progress=False, data=dataset(), log=lines.append)
    return tmp_path / name, lines


def test_the_head_learns_the_same_on_cached_features_as_on_images(tmp_path):
    cached, lines = trained(tmp_path, "cached")
    plain, plain_lines = trained(tmp_path, "plain", cache_features=False)
    assert any(line.startswith("cached features: 50 training images x 2 views") for line in lines)
    assert not any(line.startswith("cached features") for line in plain_lines)
    a, b = weights(cached), weights(plain)
    head = [k for k in a if k.startswith("model.") and "head" in k] or [k for k in a if "head" in k]
    assert head, sorted(a)[:5]
    for key in a:
        if torch.is_tensor(a[key]) and a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    history = [json.loads(line) for line in (cached / "metrics.jsonl").read_text().splitlines()]
    plain_history = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert [round(m["val_accuracy"], 6) for m in history] == [round(m["val_accuracy"], 6) for m in plain_history]


def test_the_probe_is_epoch_0_and_a_resume_goes_on_after_it(tmp_path):
    run, lines = trained(tmp_path, "probe", freeze=None, probe_epochs=5, epochs=1, init_lr_scale=0.1)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0, 1]
    assert history[0]["passes"] == 5 and "val_accuracy" in history[0] and history[0]["cache_seconds"] >= 0
    assert any(line.startswith("epoch 0 (the head alone on the cached features, 5 passes") for line in lines)
    assert "test_accuracy" in history[-1] and history[-1]["best_epoch"] in (0, 1)
    # a run stopped after epoch 0 resumes at epoch 1, without fitting the head again
    resumed = tmp_path / "resumed"
    first = config(freeze=None, probe_epochs=5, epochs=1)
    fit(first, resumed, progress=False, data=dataset(), log=lambda *_: None)
    again: list[str] = []
    longer = config(freeze=None, probe_epochs=5, epochs=2)
    fit(longer, resumed, resume=True, progress=False, data=dataset(), log=again.append)
    assert not any("the head alone" in line for line in again)
    assert [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_the_cache_takes_in_the_pooling_but_not_the_linear_layer():
    from cnnlab.layers import build_model, parse_layers

    data = dataset()
    model = build_model(parse_layers(SPEC), data.input_shape, 3)
    assert head_start(config(), data, model) == 1  # global_avg_pool folded in; linear trains


def test_augmentation_that_changes_images_each_epoch_rules_out_the_cache(tmp_path):
    assert why_not(config(shift=1)) and why_not(config(cache_features=False)) and why_not(config()) is None
    with pytest.raises(CnnlabError, match="train.probe_epochs: the head cannot train on cached features"):
        fit(config(freeze=None, probe_epochs=2, shift=1), tmp_path / "x", progress=False, data=dataset(),
            log=lambda *_: None)
