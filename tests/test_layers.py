"""Layer specs: parsing, the output-size formula, shape inference and the built module."""

import re

import pytest
import torch

from cnnlab.errors import CnnlabError
from cnnlab.layers import build_model, conv_output_size, init_whitening, parse_layers, spec_to_list, trace
from cnnlab.presets import get_preset

TUTORIAL = get_preset("tutorial")["model"]


def test_tutorial_shapes_and_parameters():
    infos = trace(parse_layers(TUTORIAL), (1, 28, 28), 10)
    spatial = [info.out_shape[1] for info in infos if len(info.out_shape) == 3]
    assert spatial == [28, 28, 14, 14, 14, 7]
    assert [info.params for info in infos if info.params] == [416, 12_832, 15_690]
    model = build_model(parse_layers(TUTORIAL), (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 28_938
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert "⌊(28 + 2·2 − 5)/1⌋ + 1 = 28" in infos[0].formula


def test_features_and_head_split():
    model = build_model(parse_layers(TUTORIAL), (1, 28, 28), 10)
    assert model.forward_features(torch.zeros(2, 1, 28, 28)).shape == (2, 32, 7, 7)
    assert isinstance(model.head[0], torch.nn.Flatten)


def test_input_channels_and_linear_size_are_inferred_for_rgb():
    model = build_model(parse_layers(TUTORIAL), (3, 32, 32), 5)
    assert model.features[0].in_channels == 3
    assert model.head[1].in_features == 32 * 8 * 8
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("n,k,s,p,d,ceil", [(28, 5, 1, 2, 1, False), (7, 3, 2, 0, 1, False), (7, 2, 2, 0, 1, True),
                                             (10, 3, 1, 0, 2, False), (5, 3, 2, 1, 1, True)])
def test_output_size_matches_pytorch(n, k, s, p, d, ceil):
    expected = torch.nn.functional.max_pool2d(torch.zeros(1, 1, n, n), k, s, p, d, ceil_mode=ceil).shape[-1]
    assert conv_output_size(n, k, s, p, d, ceil) == expected


def test_same_and_valid_padding():
    layers = parse_layers([{"type": "conv", "out_channels": 4, "kernel_size": 4, "padding": "same"},
                           {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": "valid"},
                           "flatten", {"type": "linear"}])
    infos = trace(layers, (1, 9, 9), 2)
    assert infos[0].out_shape == (4, 9, 9) and infos[1].out_shape == (4, 7, 7)
    assert build_model(layers, (1, 9, 9), 2)(torch.zeros(1, 1, 9, 9)).shape == (1, 2)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes_build_and_run(mode):
    layers = parse_layers([{"type": "conv", "out_channels": 2, "kernel_size": 3, "padding": 1, "padding_mode": mode},
                           "global_avg_pool", {"type": "linear"}])
    assert build_model(layers, (1, 5, 5), 3)(torch.rand(2, 1, 5, 5)).shape == (2, 3)


def test_impossible_layer_names_layer_and_formula():
    layers = parse_layers([{"type": "conv", "out_channels": 4, "kernel_size": 3},
                           {"type": "maxpool", "kernel_size": 2},
                           {"type": "conv", "out_channels": 4, "kernel_size": 3},
                           {"type": "conv", "out_channels": 4, "kernel_size": 5},
                           "flatten", {"type": "linear"}])
    with pytest.raises(CnnlabError) as err:
        trace(layers, (1, 12, 12), 10)
    assert str(err.value).startswith("layer 4 (conv 5x5, stride 1, padding 0): input 3x3 gives (3 + 2*0 - 5)/1 + 1 = -1")


@pytest.mark.parametrize("raw,fragment", [
    ([{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 3, "padding_mode": "reflect"}, "flatten", {"type": "linear"}],
     "layer 1 (conv 3x3, stride 1, padding 3, reflect): reflect padding 3 must be smaller than its input size 3"),
    ([{"type": "conv", "out_channels": 4, "kernel_size": 3, "in_channels": 3}, "flatten", {"type": "linear"}],
     "in_channels is 3 but its input has 1 channels"),
    ([{"type": "wobble"}], "layer 1: unknown layer type 'wobble'"),
    ([{"type": "conv", "out_channels": 4, "kernel_size": 3, "strid": 2}], "layer 1 (conv): unknown key 'strid'"),
    ([{"type": "conv", "kernel_size": 3}], "missing required key 'out_channels'"),
    (["flatten", {"type": "linear", "out_features": 7}], "gives 7 outputs but the data has 10 classes"),
    ([{"type": "linear"}], "put a flatten or global pool layer before it"),
    ([{"type": "conv", "out_channels": 4, "kernel_size": 3}], "a classifier must end with"),
    ([{"type": "conv", "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": "same"}], "padding 'same' needs stride 1"),
])
def test_invalid_specs_are_rejected_with_the_layer_named(raw, fragment):
    with pytest.raises(CnnlabError) as err:
        trace(parse_layers(raw), (1, 3, 3), 10)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_receptive_field_of_tutorial():
    infos = trace(parse_layers(TUTORIAL), (1, 28, 28), 10)
    # conv5 -> 5; pool2 -> 6 (jump 2); conv5 -> 6 + 4*2 = 14; pool2 -> 14 + 2 = 16 (jump 4)
    assert [info.receptive_field[0] for info in infos[:6]] == [5, 5, 6, 14, 14, 16]
    assert infos[5].jump == (4, 4)


def test_spec_round_trip():
    layers = parse_layers(TUTORIAL)
    again = parse_layers(spec_to_list(layers))
    assert again == layers


WHITEN = {"type": "conv", "out_channels": 12, "kernel_size": 2, "whiten": True}


def test_whitening_conv_decorrelates_its_input_and_is_fixed():
    model = build_model(parse_layers([WHITEN, "gelu", "global_avg_pool", "linear"]), (3, 16, 16), 10)
    assert not model.features[0].weight.requires_grad and model.features[0].bias.requires_grad
    # correlated, unequally scaled channels: the second is mostly the first
    base = torch.randn(2000, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    images = torch.cat([base, 0.9 * base + 0.1 * torch.randn_like(base), 5 * torch.randn_like(base)], 1)
    assert init_whitening(model, images)
    with torch.no_grad():
        out = model.features[0](images[:500]) - model.features[0].bias.view(1, -1, 1, 1)
    first_half = out[:, :6].permute(0, 2, 3, 1).reshape(-1, 6)
    covariance = torch.cov(first_half.T)
    assert torch.allclose(covariance, torch.eye(6), atol=0.05), covariance
    assert torch.allclose(out[:, 6:], -out[:, :6], atol=1e-5)  # each direction twice, with both signs


def test_init_whitening_skips_ordinary_first_layers():
    model = build_model(parse_layers(TUTORIAL), (1, 28, 28), 10)
    before = model.features[0].weight.clone()
    assert not init_whitening(model, torch.randn(10, 1, 28, 28))
    assert torch.equal(model.features[0].weight, before)


@pytest.mark.parametrize("spec,fragment", [
    (["relu", WHITEN, "flatten", "linear"], "only layer 1 can whiten"),
    ([{**WHITEN, "out_channels": 7}, "flatten", "linear"], "must be even and at most 24"),
    ([{**WHITEN, "out_channels": 26}, "flatten", "linear"], "must be even and at most 24"),
])
def test_impossible_whitening_is_rejected(spec, fragment):
    with pytest.raises(CnnlabError, match=fragment):
        trace(parse_layers(spec), (3, 16, 16), 10)


def test_whiten_must_be_a_boolean_on_a_plain_conv():
    with pytest.raises(CnnlabError, match="whiten must be true or false"):
        parse_layers([{**WHITEN, "whiten": "yes"}])
    with pytest.raises(CnnlabError, match="groups 1 and dilation 1"):
        parse_layers([{**WHITEN, "dilation": 2}])


def test_dirac_init_frozen_norm_scale_and_scale_layer():
    """airbench's pieces: identity-initialised convs, BatchNorm without a learned scale, logits × 1/9."""
    layers = parse_layers([{"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1, "init": "dirac"},
                           {"type": "batchnorm", "scale": False}, "relu", "global_max_pool",
                           {"type": "linear", "bias": False}, {"type": "scale", "factor": 1 / 9}])
    model = build_model(layers, (4, 8, 8), 10)
    x = torch.randn(2, 4, 8, 8)
    conv = model.features[0]
    assert torch.allclose(conv(x)[:, :4] - conv.bias[:4, None, None], x, atol=1e-6)  # the first 4 filters pass their channel
    assert not model.features[1].weight.requires_grad and model.features[1].bias.requires_grad
    head = model.head[:-1]
    assert torch.allclose(model(x), head(model.features(x)) / 9)
    assert [l.describe() for l in layers][0].endswith("dirac init") and layers[-1].describe() == "scale ×0.111111"
    assert parse_layers([l.to_dict() for l in layers]) == layers


@pytest.mark.parametrize("raw,fragment", [
    ({"type": "conv", "out_channels": 4, "kernel_size": 3, "init": "xavier"}, "layer 1 (conv): init must be default or dirac"),
    ({"type": "conv", "out_channels": 4, "kernel_size": 2, "whiten": True, "init": "dirac"}, "init dirac needs groups 1 and no whiten"),
    ({"type": "batchnorm", "scale": "no"}, "layer 1 (batchnorm): scale must be true or false"),
    ({"type": "scale", "factor": 0}, "layer 1 (scale): factor must be a non-zero number"),
    ({"type": "scale"}, "missing required key 'factor'"),
])
def test_bad_airbench_keys_are_named(raw, fragment):
    with pytest.raises(CnnlabError, match=re.escape(fragment)):
        parse_layers([raw])


# ---------------------------------------------------------------------------------------------
# Residual blocks
# ---------------------------------------------------------------------------------------------

def _block(width: int, stride: int = 1, **extra) -> dict:
    return {"type": "residual", "layers": [{"type": "conv", "out_channels": width, "kernel_size": 3, "stride": stride,
                                            "padding": 1, "bias": False}, "batchnorm", "relu",
                                           {"type": "conv", "out_channels": width, "kernel_size": 3, "padding": 1,
                                            "bias": False}, "batchnorm"], **extra}


STEM_AND_TWO_BLOCKS = [{"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1}, "relu",
                       _block(8), _block(16, stride=2), "global_avg_pool", {"type": "linear"}]


def test_residual_shortcut_follows_the_resnet_rule():
    infos = trace(parse_layers(STEM_AND_TWO_BLOCKS), (1, 28, 28), 10)
    same, down = infos[2], infos[3]
    assert same.spec.params["shortcut"] == "identity" and same.shortcut == []
    assert down.spec.params["shortcut"] == "conv" and down.out_shape == (16, 14, 14)
    # a strided 1x1 conv, then batchnorm because the body uses batchnorm
    assert [s.spec.type for s in down.shortcut] == ["conv", "batchnorm"]
    assert down.shortcut[0].spec.params["stride"] == (2, 2) and down.shortcut[0].spec.params["kernel_size"] == (1, 1)
    assert [c.path for c in down.children] == ["4.1", "4.2", "4.3", "4.4", "4.5"]
    assert down.params == sum(c.params for c in down.children + down.shortcut)
    model = build_model(parse_layers(STEM_AND_TWO_BLOCKS), (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == sum(info.params for info in infos)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_residual_forward_is_body_plus_shortcut_then_activation():
    spec = parse_layers([{"type": "residual", "layers": [{"type": "conv", "out_channels": 2, "kernel_size": 3,
                                                           "padding": 1}]}, "flatten", {"type": "linear"}])
    block = build_model(spec, (2, 5, 5), 3).features[0]
    x = torch.randn(4, 2, 5, 5)
    assert torch.allclose(block(x), torch.relu(block.body(x) + x))
    tanh = build_model(parse_layers([{"type": "residual", "activation": "tanh", "shortcut": "conv",
                                      "layers": ["relu"]}, "flatten", {"type": "linear"}]), (2, 5, 5), 3).features[0]
    assert torch.allclose(tanh(x), torch.tanh(torch.relu(x) + tanh.shortcut(x)))


def test_blocks_nest_and_round_trip_through_the_saved_spec():
    raw = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
           {"type": "residual", "layers": [_block(4), {"type": "conv", "out_channels": 4, "kernel_size": 1}]},
           "flatten", {"type": "linear"}]
    infos = trace(parse_layers(raw), (1, 8, 8), 2)
    assert infos[1].children[0].children[3].path == "2.1.4"
    again = parse_layers(spec_to_list(parse_layers(raw)))
    assert spec_to_list(again) == spec_to_list(parse_layers(raw))
    model = build_model(again, (1, 8, 8), 2)
    assert sum(p.numel() for p in model.parameters()) == sum(info.params for info in infos)


@pytest.mark.parametrize("block,message", [
    ({"type": "residual", "layers": [{"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1},
                                     {"type": "conv", "out_channels": 8, "kernel_size": 3}]},
     "layer 3.2 (conv 3x3, stride 1, padding 0): turns 8x14x14 into 8x12x12, which no 1x1 shortcut"),
    ({"type": "residual", "shortcut": "identity", "layers": [{"type": "conv", "out_channels": 16, "kernel_size": 1}]},
     "layer 3 (residual: 1 layer + identity, then relu): an identity shortcut needs the body to keep the shape"),
    ({"type": "residual", "layers": ["flatten"]}, "layer 3.1 (flatten): a residual block's body must keep feature maps"),
    ({"type": "residual", "layers": []}, "layer 3 (residual): layers must be a non-empty list"),
    ({"type": "residual", "layers": ["relu"], "shortcut": "projection"}, "layer 3 (residual): shortcut must be identity or conv"),
    ({"type": "residual", "layers": [{"type": "conv", "kernel_size": 3}]}, "layer 3.1 (conv): missing required key 'out_channels'"),
])
def test_residual_mistakes_name_the_layer_path(block, message):
    raw = [{"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1}, {"type": "maxpool", "kernel_size": 2},
           block, "flatten", {"type": "linear"}]
    with pytest.raises(CnnlabError) as caught:
        trace(parse_layers(raw), (1, 28, 28), 10)
    assert str(caught.value).startswith(message), str(caught.value)


def test_receptive_field_runs_through_the_block():
    # two 3x3 convs in the body: each output sees 5x5 inputs, checked by the gradient's support
    raw = [{"type": "residual", "activation": "none", "layers": [
        {"type": "conv", "out_channels": 1, "kernel_size": 3, "padding": 1, "bias": False},
        {"type": "conv", "out_channels": 1, "kernel_size": 3, "padding": 1, "bias": False}]},
        "flatten", {"type": "linear"}]
    infos = trace(parse_layers(raw), (1, 9, 9), 2)
    assert infos[0].receptive_field == (5, 5)
    block = build_model(parse_layers(raw), (1, 9, 9), 2).features[0]
    for conv in block.body:
        torch.nn.init.constant_(conv.weight, 1.0)
    x = torch.ones(1, 1, 9, 9, requires_grad=True)
    grad, = torch.autograd.grad(block(x)[0, 0, 4, 4], x)
    rows = grad[0, 0].abs().sum(1).nonzero().flatten()
    assert int(rows.max() - rows.min() + 1) == 5


def test_every_layer_type_is_registered_once_with_help():
    from cnnlab.layers import LAYER_TYPES

    assert {"conv", "maxpool", "avgpool", "residual", "linear", "batchnorm", "relu"} <= set(LAYER_TYPES)
    for name, kind in LAYER_TYPES.items():
        assert kind.name == name and kind.help, name


def test_the_readme_example_adds_a_layer_type_in_one_place():
    import pathlib

    from cnnlab.layers import LAYER_TYPES
    from cnnlab.summarize import summarize

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("### Adding a layer type", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    try:
        exec(compile(example, "README.md", "exec"), {})
        layers = parse_layers([{"type": "conv", "out_channels": 4, "kernel_size": 3}, "hardswish", "flatten", "linear"])
        summary = summarize(layers, (1, 8, 8), 3)  # verified against PyTorch, as every spec is
        assert isinstance(build_model(layers, (1, 8, 8), 3).features[1], torch.nn.Hardswish)
        assert summary.layers[1].spec.describe() == "hardswish"
    finally:
        LAYER_TYPES.pop("hardswish", None)
