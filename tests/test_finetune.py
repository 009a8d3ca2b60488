"""Fine-tuning (`finetune.py`): weights from a trained model, a new head for new classes, frozen layers,
the learning rate of loaded layers, resume, and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.config import Config, DataConfig, TrainConfig, resolve_config
from cnnlab.data import Dataset
from cnnlab.errors import CnnlabError
from cnnlab.finetune import Start, scale_loaded_lr
from cnnlab.layers import build_model, parse_layers
from cnnlab.optim import make_optimizer
from cnnlab.training import fit

from .support.helpers import pattern_dataset

SPEC = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False}, "batchnorm", "relu",
        {"type": "maxpool", "kernel_size": 2}, "flatten", {"type": "linear"}]


def config(**train) -> Config:
    settings = {"epochs": 2, "batch_size": 16, "lr": 0.05, "optimizer": "sgd", "device": "cpu", "threads": 1}
    return Config(preset=None, model=list(SPEC), data=DataConfig(), train=TrainConfig(**{**settings, **train}))


def two_classes() -> Dataset:
    """The pattern data without its 'square' class: other classes than the source model's."""
    data = pattern_dataset()
    keep_train, keep_test = data.train.labels < 2, data.test.labels < 2
    return Dataset("two", data.train.subset(keep_train.nonzero().flatten()), data.test.subset(keep_test.nonzero().flatten()),
                   ["horizontal", "vertical"], "resize")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A model trained on the three pattern classes."""
    run = tmp_path_factory.mktemp("source") / "run"
    fit(config(), run, data=pattern_dataset(), progress=False, log=lambda *_: None)
    return run


def test_other_classes_get_a_new_head_and_frozen_layers_keep_their_weights_and_statistics(source, tmp_path):
    lines = []
    result = fit(config(init=str(source), freeze="features", epochs=3), tmp_path / "tuned", data=two_classes(),
                 progress=False, log=lines.append)
    assert any("loaded the weights of layers 1-2" in line and "replaced layer 6 (144 → 2, new: the classes differ: 3 there, "
               "2 here)" in line for line in lines), lines
    assert any(line.startswith("frozen: layers 1-4 (features, 44 weights)") for line in lines), lines
    before, after = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "tuned" / "model.safetensors"))
    for key in ("features.0.weight", "features.1.weight", "features.1.bias", "features.1.running_mean", "features.1.running_var"):
        assert torch.equal(before[key], after[key]), key  # loaded, and frozen: neither trained nor re-estimated
    assert after["head.1.weight"].shape == (2, 144) and result["metrics"]["test_accuracy"] >= 0.9
    start = json.loads((tmp_path / "tuned" / "init.json").read_text())
    assert start["replaced"] == [6] and "features.0.weight" in start["loaded"] and "head.1.weight" not in start["loaded"]
    meta = json.loads((tmp_path / "tuned" / "model.json").read_text())
    source_meta = json.loads((source / "model.json").read_text())
    assert meta["preprocessing"]["mean"] == source_meta["preprocessing"]["mean"]  # the source's normalisation


def test_the_same_classes_keep_the_last_layer(source, tmp_path):
    lines = []
    fit(config(init=str(source), lr=1e-6, epochs=1), tmp_path / "same", data=pattern_dataset(), progress=False,
        log=lines.append)
    assert any("kept its last layer (the same classes)" in line for line in lines), lines
    before, after = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "same" / "model.safetensors"))
    assert torch.allclose(before["head.1.weight"], after["head.1.weight"], atol=1e-4)


def test_init_lr_scale_scales_only_the_loaded_layers():
    model = build_model(parse_layers(SPEC), (1, 12, 12), 2)
    optimizer = make_optimizer(TrainConfig(optimizer="sgd"), model)
    start = Start(source="x", mean=[0.0], std=[1.0], loaded=["features.0.weight", "features.1.weight", "features.1.bias"])
    scale_loaded_lr(optimizer, model, start, 0.1)
    scales = {name: group["lr_scale"] for group in optimizer.param_groups for name, p in model.named_parameters()
              if any(p is q for q in group["params"])}
    assert scales == {"features.0.weight": 0.1, "features.1.weight": 0.1, "features.1.bias": 0.1,
                      "head.1.weight": 1.0, "head.1.bias": 1.0}


def test_resume_after_init_continues_exactly_without_the_source(source, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    settings = dict(init=str(copy), freeze="1", init_lr_scale=0.5, schedule="constant")
    fit(config(**settings, epochs=2), tmp_path / "straight", data=two_classes(), progress=False, log=lambda *_: None)
    fit(config(**settings, epochs=1), tmp_path / "partial", data=two_classes(), progress=False, log=lambda *_: None)
    shutil.rmtree(copy)  # the resume needs only the run folder's init.json
    fit(config(**settings, epochs=2), tmp_path / "partial", resume=True, data=two_classes(), progress=False,
        log=lambda *_: None)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "partial" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_preset_the_run_takes_the_models_layers_size_and_recipe(source, tmp_path):
    resolved = resolve_config(None, overrides={"data": {"dataset": f"folder:{tmp_path}"}, "train": {"init": str(source)}})
    assert parse_layers(resolved.model) == parse_layers(SPEC)
    assert resolved.data.image_size == 12 and resolved.train.batch_size == 16 and resolved.train.lr == 0.05
    assert resolved.train.init == str(source) and resolved.train.threads == 0  # the machine's own, not the source run's


def test_mistakes_are_one_line_errors(source, tmp_path):
    rgb = pattern_dataset()
    rgb = Dataset("rgb", type(rgb.train)(rgb.train.images.expand(-1, 3, -1, -1), rgb.train.labels),
                  type(rgb.test)(rgb.test.images.expand(-1, 3, -1, -1), rgb.test.labels), rgb.classes, "resize")
    cases = [
        (config(init=str(source)), rgb, "takes 1x12x12 inputs but the data gives 3x12x12 images; --set data.channels=1"),
        (Config(preset=None, model=[{"type": "conv", "out_channels": 5, "kernel_size": 3}, "flatten", "linear"],
                train=TrainConfig(init=str(source), device="cpu")), pattern_dataset(), "its layers differ"),
        (config(freeze="9"), pattern_dataset(), "train.freeze: 9 layers asked for, the model has 6"),
        (config(freeze="6"), pattern_dataset(), "train.freeze: 6 leaves no weight to train"),
        (config(init=str(tmp_path / "nothing")), pattern_dataset(), "no such model file or run folder"),
    ]
    for cfg, data, words in cases:
        with pytest.raises(CnnlabError) as err:
            fit(cfg, tmp_path / "run", data=data, progress=False, log=lambda *_: None)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CnnlabError, match="train.freeze: expected a number of layers or 'features'"):
        TrainConfig(freeze="all")
