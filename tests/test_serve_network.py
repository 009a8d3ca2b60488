"""The network view's numbers (`cnnlab.network_view`, GET /network/spec, POST /network) on tiny
random-weight models: one node per layer in running order with `summary`'s own row text, receptive
field and jump; a receptive-field box that is exactly where the input's gradient lives; and data
enough to redo a conv cell (kernel slice × patch, summed, + bias, batchnorm, ReLU) to PyTorch's value."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from cnnlab.layers import build_model, parse_layers, spec_to_list  # noqa: E402
from cnnlab.serve import create_app  # noqa: E402
from cnnlab.network_view import network_activations, network_spec, unpack  # noqa: E402
from cnnlab.runs import Run, open_run  # noqa: E402
from cnnlab.summarize import summarize, table_rows  # noqa: E402

from tests.support.user_digits import drawn_one, encode, save_tiny_model  # noqa: E402

RESIDUAL = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False}, "batchnorm", "relu",
            {"type": "residual", "layers": [{"type": "conv", "out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1},
                                            "batchnorm", "relu",
                                            {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": "same"}]},
            {"type": "residual", "layers": [{"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 2,
                                             "dilation": 2, "padding_mode": "reflect"}], "activation": "none"},
            {"type": "avgpool", "kernel_size": 2}, "global_avg_pool", {"type": "linear"}]


def make_bundle(spec, input_shape=(1, 16, 16), classes=3, seed=0):
    layers = parse_layers(spec)
    torch.manual_seed(seed)
    model = build_model(layers, input_shape, classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, so the panel's batchnorm step is real
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    c = input_shape[0]
    return Run.from_module(model, {
        "layers": spec_to_list(layers), "input_shape": list(input_shape), "classes": [f"c{i}" for i in range(classes)],
        "preprocessing": {"kind": "resize", "channels": c, "size": list(input_shape[1:]), "mean": [0.5] * c,
                          "std": [0.25] * c}})


def random_image(shape, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def test_nodes_follow_the_summary_rows_and_blocks():
    bundle = make_bundle(RESIDUAL)
    spec = network_spec(bundle, "residual")
    summary = summarize(bundle.layers, bundle.input_shape, 3, verify=False)
    rows = {row["#"]: row for row in table_rows(summary) if row["#"]}
    ids = [node["id"] for node in spec["nodes"]]
    # the order the model runs: a block's body, its shortcut projection, then the addition
    assert ids == ["input", "1", "2", "3", "4.1", "4.2", "4.3", "4.4", "4.shortcut.1", "4.shortcut.2", "4", "5.1", "5", "6"]
    roles = {node["id"]: node["role"] for node in spec["nodes"]}
    assert roles["4.1"] == "body" and roles["4.shortcut.1"] == "shortcut" and roles["4"] == roles["5"] == "add"
    assert spec["nodes"][ids.index("4")]["inputs"] == ["4.4", "4.shortcut.2"]
    assert spec["nodes"][ids.index("5")]["inputs"] == ["5.1", "4"]  # identity shortcut: the block's input
    for node in spec["nodes"][1:]:
        row = rows[node["path"]]
        assert node["row"]["layer"] == row["layer"].strip() and node["row"]["output size formula"] == row["output size formula"]
        assert "x".join(map(str, node["shape"])) == row["output shape"]
        assert f"{node['receptive_field'][0]}x{node['receptive_field'][1]}" == row["receptive field"]
        assert str(node["jump"][0]) == row["jump"]
    assert [layer["path"] for layer in spec["head"]] == ["7", "8"]
    assert spec["nodes"][ids.index("4.4")]["row"]["output size formula"].startswith("'same' pads 1+1")


def test_activations_are_the_models_own_outputs():
    bundle = make_bundle(RESIDUAL, input_shape=(3, 16, 16))
    spec = network_spec(bundle)
    image = random_image((3, 16, 16))
    answer = network_activations(bundle, image, spec)
    assert [entry["id"] for entry in answer["maps"]] == [node["id"] for node in spec["nodes"]]
    for entry, node in zip(answer["maps"], spec["nodes"]):
        assert list(unpack(entry["values"]).shape) == node["shape"] and entry["low"] < entry["high"]
    x = bundle.preprocessing.normalize(image.unsqueeze(0))
    with torch.no_grad():
        logits = bundle.model(x)[0]
        features = bundle.model.features(x)[0]
    np.testing.assert_allclose(unpack(answer["maps"][-1]["values"]), features.numpy(), rtol=1e-5, atol=1e-6)
    head = answer["head"]
    np.testing.assert_allclose(head["logits"], logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head["probabilities"], torch.softmax(logits, 0).numpy(), rtol=1e-5, atol=1e-7)
    assert head["predicted"] == int(logits.argmax()) and head["label"] == f"c{int(logits.argmax())}"
    assert head["flattened"] == 6 and len(head["layers"]) == 2


def input_box(node, row, col):
    """The receptive field of output cell (row, col) in input pixels, from the node's summary numbers."""
    top = node["start"][0] + row * node["jump"][0]
    left = node["start"][1] + col * node["jump"][1]
    return top, top + node["receptive_field"][0] - 1, left, left + node["receptive_field"][1] - 1


@pytest.mark.parametrize("spec", [RESIDUAL, [{"type": "conv", "out_channels": 2, "kernel_size": 5, "stride": 2, "padding": 2},
                                             {"type": "avgpool", "kernel_size": 3, "stride": 2, "padding": 1},
                                             {"type": "conv", "out_channels": 2, "kernel_size": 3, "dilation": 2},
                                             "flatten", {"type": "linear"}]])
def test_receptive_field_box_is_where_the_gradient_lives(spec):
    """With positive weights and no ReLU zeroing, an output cell depends on every input pixel of its
    receptive field: the box from summary's RF and jump (and the start offset) is exactly the support
    of the input gradient, clipped to the image."""
    linear_spec = [layer for layer in copy.deepcopy(spec) if layer not in ("relu",)]
    for layer in linear_spec:
        if isinstance(layer, dict) and layer["type"] == "residual":
            layer["layers"] = [child for child in layer["layers"] if child != "relu"]
    bundle = make_bundle(linear_spec, input_shape=(1, 23, 23))
    for module in bundle.model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data.fill_(1.0)
    spec_out = network_spec(bundle)
    for node in spec_out["nodes"][1:]:
        _, h, w = node["shape"]
        for row, col in {(0, 0), (h // 2, w // 2), (h - 1, w - 1)}:
            x = torch.zeros((1, 1, 23, 23), requires_grad=True)
            outputs, _ = run_nodes_with_grad(bundle, x)
            output = outputs[[n["id"] for n in spec_out["nodes"]].index(node["id"])]
            output[0, 0, row, col].backward()
            support = torch.nonzero(x.grad[0, 0].abs() > 0)
            top, bottom, left, right = input_box(node, row, col)
            expected = (max(0, top), min(22, bottom), max(0, left), min(22, right))
            found = (int(support[:, 0].min()), int(support[:, 0].max()), int(support[:, 1].min()), int(support[:, 1].max()))
            assert found == expected, (node["id"], row, col)


def run_nodes_with_grad(bundle, x):
    # run_nodes runs in inference mode; the same walk with autograd on, for the gradient test
    from cnnlab.layers import Residual

    outputs = [x]

    def sequence(modules, h):
        for module in modules:
            if isinstance(module, Residual):
                body = sequence(list(module.body), h)
                side = sequence(list(module.shortcut), h) if isinstance(module.shortcut, torch.nn.Sequential) else h
                h = module.activation(body + side)
            else:
                h = module(h)
            outputs.append(h)
        return h

    sequence(list(bundle.model.features), x)
    return outputs, None


def conv_cell(spec, answer, node_id, channel, row, col):
    """One conv output value redone from the JSON alone, as the page's panel does it."""
    nodes = {node["id"]: node for node in spec["nodes"]}
    maps = {entry["id"]: unpack(entry["values"]) for entry in answer["maps"]}
    node = nodes[node_id]
    x = maps[node["inputs"][0]]
    weight = unpack(node["arrays"]["weight"])
    bias = unpack(node["arrays"]["bias"])[channel] if node["arrays"]["bias"] else 0.0
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (node["window"][k] for k in ("kernel", "stride", "padding", "dilation"))
    total = 0.0
    for c in range(x.shape[0]):
        for u in range(kh):
            for v in range(kw):
                r, q = row * sh - ph + u * dh, col * sw - pw + v * dw
                if 0 <= r < x.shape[1] and 0 <= q < x.shape[2]:  # zero padding outside
                    total += float(weight[channel, c, u, v]) * float(x[c, r, q])
    return total + float(bias), float(maps[node_id][channel, row, col])


def test_conv_cell_then_batchnorm_then_relu_match_pytorch(tmp_path):
    bundle_path = save_tiny_model(tmp_path / "model.safetensors")  # conv (no bias), batchnorm, relu, pool, conv ...
    bundle = open_run(bundle_path)
    spec = network_spec(bundle)
    answer = network_activations(bundle, random_image((1, 28, 28)), spec)
    nodes = {node["id"]: node for node in spec["nodes"]}
    maps = {entry["id"]: unpack(entry["values"]) for entry in answer["maps"]}
    for node_id, cells in (("1", [(0, 0, 0), (3, 27, 13), (5, 14, 14)]), ("5", [(0, 0, 0), (7, 11, 5)])):
        for channel, row, col in cells:
            mine, model = conv_cell(spec, answer, node_id, channel, row, col)
            assert mine == pytest.approx(model, rel=1e-4, abs=1e-5)
    # layer 1 -> 2 (batchnorm) -> 3 (relu), from the spec's statistics
    weights = nodes["2"]["weights"]
    mean, var, gamma, beta = (unpack(nodes["2"]["arrays"][key]) for key in ("mean", "var", "gamma", "beta"))
    conv, _ = conv_cell(spec, answer, "1", 4, 10, 3)
    normed = (conv - mean[4]) / np.sqrt(var[4] + weights["eps"]) * gamma[4] + beta[4]
    assert normed == pytest.approx(float(maps["2"][4, 10, 3]), rel=1e-4, abs=1e-5)
    assert max(0.0, normed) == pytest.approx(float(maps["3"][4, 10, 3]), rel=1e-4, abs=1e-5)


def test_routes(tmp_path):
    client = TestClient(create_app(save_tiny_model(tmp_path / "model.safetensors")), raise_server_exceptions=False)
    spec = client.get("/network/spec").json()
    assert spec["name"] == "model.safetensors" and spec["nodes"][0]["id"] == "input"
    assert set(spec["colour_maps"]) == {"RdBu_r", "magma", "gray"} and len(spec["colour_maps"]["magma"]) == 256
    assert all("arrays" not in node for node in spec["nodes"])  # sent per layer, when a cell asks
    arrays = client.get("/network/weights", params={"node": "5"}).json()
    assert unpack(arrays["weight"]).shape == (8, 6, 3, 3) and arrays["bias"] is not None
    assert set(client.get("/network/weights", params={"node": "2"}).json()) == {"mean", "var", "gamma", "beta"}
    missing = client.get("/network/weights", params={"node": "99"})
    assert missing.status_code == 404 and "no layer '99'" in missing.json()["detail"]
    answer = client.post("/network", files={"file": ("one.png", encode(drawn_one()), "image/png")}).json()
    assert [entry["id"] for entry in answer["maps"]] == [node["id"] for node in spec["nodes"]]
    assert len(answer["head"]["probabilities"]) == 10 and answer["head"]["flattened"] == 288
    same = client.post("/predict", files={"file": ("one.png", encode(drawn_one()), "image/png")}).json()
    assert answer["head"]["label"] == same["label"]
    bad = client.post("/network", content=b"not an image", headers={"content-type": "image/png"})
    assert bad.status_code in (415, 422) and "detail" in bad.json()


def test_explorer_command_writes_one_self_contained_file(tmp_path, capsys):
    from cnnlab.cli import main

    model = save_tiny_model(tmp_path / "model.safetensors")
    picture = tmp_path / "one.png"
    picture.write_bytes(encode(drawn_one()))
    out = tmp_path / "explorer.html"
    assert main(["explorer", str(model), "--image", str(picture), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "window.CNNLAB_OFFLINE = " in page and "function convAxis" in page and "function computeCell" in page
    assert 'src="' not in page and "href=\"/" not in page  # nothing to fetch: scripts and styles are inline
    assert "wrote" in capsys.readouterr().out
    assert main(["explorer", str(model), "--image", str(tmp_path / "missing.png"), "--out", str(out)]) != 0
    assert main(["explorer", str(model), "--images", "0"]) != 0
    error = capsys.readouterr().err
    assert "--images must be at least 1" in error and "Traceback" not in error
