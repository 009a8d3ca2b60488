"""The network view's data: every layer of a model as numbers the page can draw and recompute.

Two halves, because one does not change while the user draws and the other does:

- `network_spec(bundle)`: the layers as nodes in the order they run (a residual block's body,
  then its shortcut, then the addition), each with its `summary` row (settings, the output-size
  formula filled in, shape, receptive field and jump), where the receptive field of output cell
  (0, 0) starts in the input (`start`), the window that maps an output region back to its input
  (`window`), and the numbers the page needs to redo one cell's computation: conv weights and
  bias, batchnorm statistics (`arrays`: the bulk, which the server sends per layer on request,
  `split_arrays`), the activation's settings (`weights`).
- `network_activations(bundle, image)`: for one uint8 input, every node's output (all channels)
  and the head: the flattened size, each head layer's vector, logits, softmax, the prediction.

Arrays travel as little-endian float32 in base64 (`{"shape", "b64"}`): exact, 4 bytes a value,
and one `Float32Array` on the page. The layers are run one by one (as `featuremaps` does): the
served model is shared by concurrent requests, so hooks are not an option.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch
from torch import nn

from .formatting import colour_table
from .layers import LayerInfo, Residual, head_start
from .summarize import summarize, table_rows

# Colour maps the page draws with, as 256-entry lookup tables (the CLI's and /inspect's choices).
COLOUR_MAPS = ("RdBu_r", "magma", "gray")


def pack(array: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """An array as `{"shape": [...], "b64": little-endian float32 bytes in base64}`."""
    values = array.detach().float().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    values = np.ascontiguousarray(values, dtype="<f4")
    return {"shape": list(values.shape), "b64": base64.b64encode(values.tobytes()).decode("ascii")}


def unpack(packed: dict[str, Any]) -> np.ndarray:
    """The inverse of `pack` (for tests and tools)."""
    return np.frombuffer(base64.b64decode(packed["b64"]), dtype="<f4").reshape(packed["shape"])


def _colour_tables() -> dict[str, list[list[int]]]:
    return {name: colour_table(name).tolist() for name in COLOUR_MAPS}  # the tables the other pictures use


def _pair(value: Any) -> list[int]:
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


def _window(info: LayerInfo) -> dict[str, list[int]] | None:
    """kernel, stride, top/left padding and dilation of a sliding-window layer; None for layers that
    keep each position where it is (activations, batchnorm, ...), whose window is 1x1."""
    p = info.spec.params
    if info.spec.type not in ("conv", "maxpool", "avgpool"):
        return None
    kernel, dilation = _pair(p["kernel_size"]), _pair(p.get("dilation", 1))
    if p["padding"] == "same":  # PyTorch pads d(k−1) in total, the odd pixel bottom/right
        padding = [dilation[a] * (kernel[a] - 1) // 2 for a in (0, 1)]
    elif p["padding"] == "valid":
        padding = [0, 0]
    else:
        padding = _pair(p["padding"])
    return {"kernel": kernel, "stride": _pair(p["stride"]), "padding": padding, "dilation": dilation,
            "padding_setting": p["padding"] if isinstance(p["padding"], str) else padding}


def _row_text(row: dict[str, str]) -> dict[str, str]:
    """A summary table row with the block indentation taken off (the page indents by itself)."""
    return {key: value.strip() if key == "layer" else value for key, value in row.items()}


def _weights(info: LayerInfo, module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the cell panel needs to redo this layer's arithmetic for one output value: the small
    settings, and the arrays (weights, statistics) that the server sends only when asked."""
    kind = info.spec.type
    p = info.spec.params
    if isinstance(module, nn.Conv2d):
        return ({"groups": module.groups, "padding_mode": module.padding_mode, "bias": module.bias is not None},
                {"weight": pack(module.weight), "bias": pack(module.bias) if module.bias is not None else None})
    if isinstance(module, nn.BatchNorm2d):
        return ({"eps": module.eps}, {"mean": pack(module.running_mean), "var": pack(module.running_var),
                                      "gamma": pack(module.weight), "beta": pack(module.bias)})
    if kind in ("maxpool", "avgpool"):
        return {"ceil_mode": p["ceil_mode"], "count_include_pad": p.get("count_include_pad", True)}, {}
    if kind == "scale":
        return {"factor": p["factor"]}, {}
    if kind in ("leaky_relu", "elu"):
        return dict(p), {}
    return {}, {}


class _Builder:
    """Walks `model.features` beside the traced layers and collects nodes (and their modules)."""

    def __init__(self, rows: dict[str, dict[str, str]]):
        self.rows = rows
        self.nodes: list[dict[str, Any]] = []
        self.modules: list[nn.Module | None] = []

    def add(self, info: LayerInfo, module: nn.Module | None, inputs: list[str], start: list[int], role: str,
            depth: int, kind: str | None = None, node_id: str | None = None) -> dict[str, Any]:
        window = _window(info) if kind is None else None
        if window:  # the receptive field of cell (0, 0) starts `padding` input steps before the input's
            start = [start[a] - window["padding"][a] * self._jump_before(inputs[0])[a] for a in (0, 1)]
        node = {"id": node_id or info.path, "path": info.path, "type": kind or info.spec.type, "role": role,
                "depth": depth, "row": _row_text(self.rows.get(info.path, {})),
                "shape": list(info.out_shape), "receptive_field": list(info.receptive_field),
                "jump": list(info.jump), "start": start, "window": window, "inputs": inputs,
                "has_filters": info.spec.kind.has_filters, "known": module is None or _known(module)}
        node["weights"], node["arrays"] = _weights(info, module) if module is not None and kind is None else ({}, {})
        self.nodes.append(node)
        self.modules.append(module)
        return node

    def _jump_before(self, node_id: str) -> list[int]:
        return next(node["jump"] for node in self.nodes if node["id"] == node_id)

    def sequence(self, infos: list[LayerInfo], modules: list[nn.Module], previous: dict[str, Any], role: str,
                 depth: int) -> dict[str, Any]:
        for info, module in zip(infos, modules):
            if isinstance(module, Residual):
                previous = self.block(info, module, previous, depth)
            else:
                previous = self.add(info, module, [previous["id"]], previous["start"], role, depth)
        return previous

    def block(self, info: LayerInfo, module: Residual, previous: dict[str, Any], depth: int) -> dict[str, Any]:
        body = self.sequence(info.children, list(module.body), previous, "body", depth + 1)
        shortcut = previous
        if info.shortcut and isinstance(module.shortcut, nn.Sequential):
            shortcut = self.sequence(info.shortcut, list(module.shortcut), previous, "shortcut", depth + 1)
        activation = info.spec.params["activation"]
        node = self.add(info, None, [body["id"], shortcut["id"]], body["start"], "add", depth, kind="add")
        node["activation"] = activation
        node["shortcut"] = "identity" if shortcut is previous else "conv"
        return node


def _known(module: nn.Module) -> bool:
    """Whether the page can redo this module's arithmetic for one cell."""
    return isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.ReLU, nn.LeakyReLU, nn.GELU,
                               nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)) or \
        type(module).__name__ == "Scale"


def network_spec(bundle, name: str | None = None) -> dict[str, Any]:
    """The model's layers as the page's nodes (see the module docstring), plus classes, the input
    shape and the colour tables. Independent of any image: the page asks for it once."""
    model = bundle.model
    summary = summarize(bundle.layers, bundle.input_shape, len(bundle.classes), verify=False)
    infos = summary.layers
    rows = {row["#"]: row for row in table_rows(summary) if row["#"]}
    split = head_start(infos)
    builder = _Builder(rows)
    c, h, w = bundle.input_shape
    input_node = {"id": "input", "path": "", "type": "input", "role": "", "depth": 0,
                  "row": {"layer": "input (normalised as in training)", "output shape": f"{c}x{h}x{w}",
                          "receptive field": "1x1", "jump": "1", "output size formula": ""},
                  "shape": [c, h, w], "receptive_field": [1, 1], "jump": [1, 1], "start": [0, 0], "window": None,
                  "inputs": [], "has_filters": False, "known": True, "weights": {}, "arrays": {}}
    builder.nodes.append(input_node)
    builder.modules.append(None)
    builder.sequence(infos[:split], list(model.features), input_node, "", 0)
    head = [{"path": info.path, "type": info.spec.type, "row": _row_text(rows.get(info.path, {})),
             "shape": list(info.out_shape)} for info in infos[split:]]
    return {"name": name or bundle.name, "classes": list(bundle.classes), "input_shape": [c, h, w],
            "preprocessing": bundle.preprocessing.kind, "nodes": builder.nodes, "head": head,
            "colour_maps": _colour_tables(), "softmax_note": "softmax(logits): e^logit / Σ e^logit"}


def split_arrays(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the spec without the arrays, node id -> its arrays): a colour model's weights are megabytes
    the page needs only for the layer whose cell is clicked."""
    light = {**spec, "nodes": [{key: value for key, value in node.items() if key != "arrays"} for node in spec["nodes"]]}
    return light, {node["id"]: node["arrays"] for node in spec["nodes"]}


@torch.inference_mode()
def run_nodes(bundle, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One normalised input (1, C, H, W) through the model layer by layer: every node's output (in
    `network_spec`'s node order, the input first) and every head layer's output."""
    outputs: list[torch.Tensor] = [x]

    def sequence(modules, h):
        for module in modules:
            if isinstance(module, Residual):
                body = sequence(list(module.body), h)
                side = sequence(list(module.shortcut), h) if isinstance(module.shortcut, nn.Sequential) else h
                h = module.activation(body + side)
                outputs.append(h)
            else:
                h = module(h)
                outputs.append(h)
        return h

    model = bundle.model
    h = sequence(list(model.features), x)
    head_outputs = []
    for module in model.head:
        h = module(h)
        head_outputs.append(h)
    return outputs, head_outputs


def _scale(values: torch.Tensor, signed: bool) -> tuple[float, float]:
    if signed:
        high = float(values.abs().max()) or 1.0
        return -high, high
    low = float(values.min())
    return (min(0.0, low), float(values.max()) or 1.0)


def network_activations(bundle, image: torch.Tensor, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every node's output for one uint8 input `image` (C, H, W), with one colour scale per node, and
    the head: flattened size, each head layer's vector, logits, softmax probabilities, prediction."""
    spec = spec or network_spec(bundle)
    device = next(bundle.model.parameters()).device
    x = bundle.preprocessing.normalize(image.unsqueeze(0).to(device)).float()
    outputs, head_outputs = run_nodes(bundle, x)
    maps = []
    for node, output in zip(spec["nodes"], outputs):
        values = output[0].float()  # (C, H, W)
        if node["type"] == "input":
            low, high, colour = float(values.min()), float(values.max()), "gray"
            high = high if high > low else low + 1.0
        else:
            signed = node["has_filters"] or float(values.min()) < 0
            (low, high), colour = _scale(values, signed), "RdBu_r" if signed else "magma"
        maps.append({"id": node["id"], "low": low, "high": high, "colour_map": colour, "values": pack(values)})
    logits = head_outputs[-1][0].float()
    probabilities = torch.softmax(logits, 0)
    flat = next((int(out[0].numel()) for out in head_outputs if out.dim() == 2), int(logits.numel()))
    head = [{"path": layer["path"], "values": pack(out[0]) if out[0].numel() <= 4096 else None,
             "size": int(out[0].numel())} for layer, out in zip(spec["head"], head_outputs)]
    predicted = int(probabilities.argmax())
    return {"maps": maps, "head": {"flattened": flat, "layers": head, "logits": [float(v) for v in logits],
                                   "probabilities": [float(v) for v in probabilities], "predicted": predicted,
                                   "label": spec["classes"][predicted]}}
