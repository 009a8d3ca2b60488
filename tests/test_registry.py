"""The registry answers every "what kind of layer is this?": the README's `hardswish` example,
registered in one place, is seen by the summary, Grad-CAM's layer choice, the feature-map pictures
(CLI and page), fine-tuning (`train.init`, `train.freeze`) and export."""

from __future__ import annotations

import pathlib
import types

import pytest
import torch

from cnnlab.layers import LAYER_TYPES, classifier_index, layer_kind, parse_layers, trace

from tests.support.tiny_runs import SIZE, make_tiny_run

CONV = {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}


def _spec(activation: str) -> list:
    return [CONV, activation, {"type": "maxpool", "kernel_size": 2},
            {**CONV, "out_channels": 6}, "batchnorm", activation, {"type": "maxpool", "kernel_size": 2},
            "flatten", {"type": "linear"}]


@pytest.fixture
def hardswish():
    """The README's example, executed as a reader would paste it; unregistered afterwards."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("### Adding a layer type", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(example, "README.md", "exec"), {})
    try:
        yield LAYER_TYPES["hardswish"]
    finally:
        LAYER_TYPES.pop("hardswish", None)


@pytest.fixture
def hardswish_run(hardswish, tmp_path) -> pathlib.Path:
    return make_tiny_run(tmp_path, spec=_spec("hardswish"))


def test_summary_lists_it_and_verifies_its_shape(hardswish):
    from cnnlab.summarize import format_summary, summarize

    summary = summarize(parse_layers(_spec("hardswish")), (1, SIZE, SIZE), 3)  # checked against PyTorch
    assert [info.spec.type for info in summary.layers].count("hardswish") == 2
    assert "hardswish" in format_summary(summary)


def test_gradcam_chooses_its_output_as_it_would_relu(hardswish):
    from cnnlab.explain import gradcam_layer

    def choice(activation: str) -> int:
        return gradcam_layer(trace(parse_layers(_spec(activation)), (1, SIZE, SIZE), 3))

    # the second conv (5), then past batchnorm and the activation: the rectified maps of layer 6
    assert choice("hardswish") == choice("relu") == 6


def test_feature_maps_show_it_in_pictures_and_on_the_page(hardswish_run):
    from cnnlab.runs import open_run
    from cnnlab.serve.featuremaps import feature_maps
    from cnnlab.visualize.figures import feature_maps_figure

    run = open_run(hardswish_run)
    image = torch.randint(0, 256, (1, SIZE, SIZE), dtype=torch.uint8)
    shown, skipped = feature_maps(run.model, run.preprocessing.normalize(image.unsqueeze(0)), run.infos())
    assert [entry["layer"] for entry in shown] == [1, 2, 3, 4, 6, 7]  # both hardswish layers (2 and 6)
    assert [entry["layer"] for entry in skipped] == [5]               # the batchnorm, with its type's reason
    assert "rescales and shifts" in skipped[0]["reason"]
    figure = feature_maps_figure(run, image, "a test image")
    titles = [ax.get_title(loc="left") for ax in figure.axes]
    assert sum("hardswish" in title for title in titles) == 2


def test_init_and_freeze_from_a_run_that_uses_it(hardswish_run, tmp_path):
    from cnnlab.config import config_from_dict
    from cnnlab.finetune import apply_init
    from cnnlab.layers import build_model

    layers = parse_layers(_spec("hardswish"))
    model = build_model(layers, (1, SIZE, SIZE), 2)
    config = config_from_dict({"model": _spec("hardswish"), "train": {"init": str(hardswish_run), "freeze": "2"}})
    data = types.SimpleNamespace(input_shape=(1, SIZE, SIZE), classes=["a", "b"])  # other classes: a new head
    lines: list[str] = []
    start = apply_init(model, config, data, tmp_path, resume=False, log=lines.append)
    assert start.replaced == [9]  # the classifier (linear), sized by the classes
    assert "replaced layer 9" in lines[0] and "frozen: layers 1-2" in lines[1]
    assert not any(p.requires_grad for p in model.features[0].parameters())
    assert all(p.requires_grad for p in model.features[3].parameters())


@pytest.mark.slow  # the ONNX exporter takes seconds
def test_export_keeps_parity(hardswish_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from cnnlab.export import export_model

    report = export_model(hardswish_run / "model.safetensors", "onnx", tmp_path / "m.onnx", check_real=False)
    assert report["max_abs_diff"]["random"] <= 1e-4 and report["batchnorm_folded"] == 1


def test_classifier_is_found_by_its_flag_with_aliases_and_raw_layers():
    assert classifier_index(["flatten", {"type": "fc", "out_features": 5}, "relu", {"type": "dense"}]) == 3
    assert classifier_index(["conv", "global_avg_pool"]) is None
    assert layer_kind({"type": "Linear"}).classes_key == "out_features"
    assert layer_kind("no-such-type") is None


def test_every_builtin_type_answers_the_questions_as_before():
    kinds = LAYER_TYPES
    assert {n for n, k in kinds.items() if k.extracts_features} == {"conv", "residual", "timm"}
    assert {"batchnorm", "dropout", "scale", "relu", "gelu", "sigmoid"} <= {n for n, k in kinds.items() if k.keeps_layout}
    assert not any(kinds[n].keeps_layout for n in ("conv", "maxpool", "flatten", "linear", "residual"))
    assert [n for n, k in kinds.items() if k.has_shortcut] == ["residual"]
    assert [n for n, k in kinds.items() if k.classes_key] == ["linear"]
    assert not kinds["relu"].has_pretrained({}) and kinds["timm"].has_pretrained({"pretrained": True})
    assert kinds["conv"].spec_from_module(torch.nn.Conv2d(1, 2, 3))["out_channels"] == 2
    assert kinds["maxpool"].spec_from_module(torch.nn.Conv2d(1, 2, 3)) is None



# ---------------------------------------------------------------------------------------------
# Bounds before allocation (issue 31)
# ---------------------------------------------------------------------------------------------

def test_a_layer_too_large_for_memory_is_refused_by_name_before_building():
    from cnnlab.errors import CnnlabError
    from cnnlab.layers import build_model

    spec = parse_layers([{"type": "conv", "out_channels": 1_000_000_000, "kernel_size": 3}, "flatten",
                         {"type": "linear"}])
    with pytest.raises(CnnlabError, match=r"layer \d \((conv|linear).*weights take .* TB .* of memory free"):
        build_model(spec, (1, 8, 8), 10)


def test_check_memory_counts_weights_and_training_at_the_batch_size():
    from cnnlab.errors import CnnlabError
    from cnnlab.layers.registry import check_memory

    infos = trace(parse_layers([{"type": "conv", "out_channels": 64, "kernel_size": 3, "padding": 1}, "flatten",
                                {"type": "linear"}]), (1, 32, 32), 10)
    weights = sum(info.params for info in infos) * 4
    check_memory(infos, None, available=weights)  # the weights alone fit exactly
    with pytest.raises(CnnlabError, match=r"layer 3 \(linear"):
        check_memory(infos, None, available=weights - 1)
    with pytest.raises(CnnlabError, match=r"at batch size 512 .*the largest: layer 1 \(conv.*lower train.batch_size"):
        check_memory(infos, 512, available=100 * weights)
    check_memory(infos, 1, available=100 * weights)


def test_too_many_layers_and_too_deep_nesting_are_refused_before_tracing():
    from cnnlab.errors import CnnlabError
    from cnnlab.layers.registry import MAX_LAYERS, MAX_NESTING

    block = {"type": "residual", "layers": [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
                                            "batchnorm", "relu"]}
    with pytest.raises(CnnlabError, match=rf"2,000 layers counting the blocks' inner layers, more than the limit of {MAX_LAYERS}"):
        parse_layers([block] * 500)
    nested: dict = {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}
    for _ in range(MAX_NESTING + 2):
        nested = {"type": "residual", "layers": [nested]}
    with pytest.raises(CnnlabError, match=f"nested more than {MAX_NESTING} deep"):
        parse_layers([nested, "flatten", "linear"])
