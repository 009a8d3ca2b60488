"""`cnnlab summary`: the network layer by layer, with the output-size formula filled in.

The table comes from `layers.trace` (the same code that validates a spec before training), and
every traced shape is then checked against a real forward pass of the module `build_model`
makes: a hook on each layer records what PyTorch actually produced. A disagreement is a bug in
cnnlab, not a user mistake, so it raises `ShapeMismatch` with a traceback.

    cnnlab summary --preset tutorial
    cnnlab summary --config my_net.yaml --input 3x64x64
    cnnlab summary runs/20260101-tutorial --json
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import folder_path
from .errors import CnnlabError, shorten
from .formatting import text_table
from .layers import LayerInfo, LayerSpec, build_model, layer_modules, parse_layers, trace, walk

BYTES_PER_VALUE = 4  # float32 activations
SOFTMAX_NOTE = ("The last layer gives logits (raw scores); softmax turns them into class probabilities at "
                "prediction time. Training's cross-entropy loss applies log-softmax itself, so it is not a layer.")


class ShapeMismatch(RuntimeError):
    """The traced shape and PyTorch's real output disagree: a bug in cnnlab's shape arithmetic."""


@dataclass
class Summary:
    """A traced, verified network: one `LayerInfo` per layer plus totals."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int | None
    layers: list[LayerInfo]
    total_params: int
    total_macs: int
    activation_values: int      # values in every layer's output for one image (input included)
    warnings: list[str] = field(default_factory=list)

    @property
    def activation_bytes(self) -> int:
        return self.activation_values * BYTES_PER_VALUE

    def spatial_sizes(self) -> list[int]:
        """Feature-map heights: the input's, then after every layer that changes it (28 → 28 → 14 → 14 → 7)."""
        sizes = [self.input_shape[1]]
        for info in self.layers:
            if info.spec.kind.needs_maps and len(info.out_shape) == 3:
                sizes.append(info.out_shape[1])
        return sizes

    def size_path(self) -> str:
        """`28 → 28 → 14 → 14 → 7`, or `29x29 → 6x14 → 3x7` once height and width differ."""
        shapes = [self.input_shape[1:]] + [info.out_shape[1:] for info in self.layers
                                           if info.spec.kind.needs_maps and len(info.out_shape) == 3]
        square = all(h == w for h, w in shapes)
        return " → ".join(str(h) if square else f"{h}x{w}" for h, w in shapes)

    def param_terms(self) -> list[int]:
        return [info.params for info in self.layers if info.params]


def summarize(layers: list[LayerSpec], input_shape: tuple[int, int, int], num_classes: int | None = None,
              name: str = "model", verify: bool = True) -> Summary:
    """Trace `layers` for one image of `input_shape` and (by default) check every shape with PyTorch."""
    infos = trace(layers, input_shape, num_classes)
    # trace warns once per axis: keep one copy when both axes say the same
    found = [f"layer {info.path} ({info.spec.describe()}): {text}" for info in walk(infos) for text in info.warnings]
    found += _extra_warnings(infos)
    warnings = list(dict.fromkeys(found))
    activation_values = math.prod(input_shape) + sum(math.prod(info.out_shape) for info in walk(infos))
    summary = Summary(name, tuple(input_shape), num_classes, infos, sum(i.params for i in infos),  # type: ignore[arg-type]
                      sum(i.macs for i in infos), activation_values, warnings)
    if verify:
        verify_against_pytorch(summary, layers)
    return summary


def _extra_warnings(infos: list[LayerInfo]) -> list[str]:
    """Warnings about the whole network that no single layer's trace can give."""
    out = []
    total = sum(i.params for i in infos)
    for info in infos:
        # a layer on the flattened vector (linear) that holds nearly every weight
        if len(info.in_shape) == 1 and total and info.params > 0.9 * total and total > 1_000_000:
            out.append(f"layer {info.path} ({info.spec.type}): holds {100 * info.params / total:.0f}% of all "
                       f"parameters ({info.in_shape[0]:,} flattened inputs); pool or global-pool before "
                       "flatten to shrink it")
    return out


@torch.no_grad()
def verify_against_pytorch(summary: Summary, layers: list[LayerSpec]) -> None:
    """Build the real module, run one image through it and compare every layer's output shape and
    parameter count (blocks' inner and shortcut layers included) with the trace; raises
    `ShapeMismatch` on any difference."""
    model = build_model(layers, summary.input_shape, summary.num_classes)
    model.eval()  # BatchNorm1d refuses a batch of one in training mode
    pairs = layer_modules(model, summary.layers)
    traced = list(walk(summary.layers))
    if len(pairs) != len(traced):
        raise ShapeMismatch(f"build_model made {len(pairs)} modules for {len(traced)} layers")
    seen: dict[int, tuple[int, ...]] = {}
    hooks = [module.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape[1:])))
             for n, (_, module) in enumerate(pairs)]
    try:
        model(torch.zeros((1, *summary.input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    for n, (info, module) in enumerate(pairs):
        if seen.get(n) != tuple(info.out_shape):
            raise ShapeMismatch(f"layer {info.path} ({info.spec.describe()}): traced output {info.out_shape} "
                                f"but PyTorch gives {seen.get(n)}")
        real_params = sum(p.numel() for p in module.parameters())
        if real_params != info.params:
            raise ShapeMismatch(f"layer {info.path}: traced {info.params} parameters but the module has {real_params}")
    real_total = sum(p.numel() for p in model.parameters())
    if real_total != summary.total_params:
        raise ShapeMismatch(f"traced {summary.total_params} parameters in total but the model has {real_total}")


# ---------------------------------------------------------------------------------------------
# Text and JSON
# ---------------------------------------------------------------------------------------------

def settings_text(spec: LayerSpec) -> str:
    """Type and settings, e.g. `conv 5x5, stride 1, padding 2` or `maxpool 2x2, stride 2, padding 0, ceil_mode`."""
    return spec.kind.settings_text(spec.params)


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


def _pair(value: tuple[int, int], sep: str = "x") -> str:
    return str(value[0]) if sep == "," and value[0] == value[1] else (
        f"{value[0]}{sep}{value[1]}")


def table_rows(summary: Summary) -> list[dict[str, str]]:
    """The table as strings, one dict per row (the input first; a block's inner layers and shortcut
    indented under it): used by the text table and the HTML report."""
    rows = [{"#": "", "layer": "input", "output size formula": "", "output shape": shape_text(summary.input_shape),
             "params": "", "MACs": "", "receptive field": "1x1", "jump": "1"}]

    def add(info: LayerInfo, depth: int, label: str = "") -> None:
        rows.append({
            "#": info.path,
            "layer": "  " * depth + label + settings_text(info.spec),
            "output size formula": _formula(info),
            "output shape": shape_text(info.out_shape),
            "params": f"{info.params:,}" if info.params else "",
            "MACs": f"{info.macs:,}" if info.macs else "",
            "receptive field": _pair(info.receptive_field),
            "jump": _pair(info.jump, ","),
        })
        for child in info.children:
            add(child, depth + 1)
        for child in info.shortcut:
            add(child, depth + 1, "shortcut: ")
        if info.spec.kind.has_shortcut and not info.shortcut:  # (a timm layer's children are its blocks)
            rows.append({"#": "", "layer": "  " * (depth + 1) + "shortcut: identity", "output size formula": "",
                         "output shape": shape_text(info.in_shape), "params": "", "MACs": "",
                         "receptive field": "", "jump": ""})

    for info in summary.layers:
        add(info, 0)
    return rows


def _formula(info: LayerInfo) -> str:
    return info.spec.kind.summary_formula(info)


def totals_lines(summary: Summary) -> list[str]:
    """Totals and the size path, as plain lines."""
    terms = summary.param_terms()
    params = f"{summary.total_params:,}"
    if len(terms) > 1:
        params += " = " + " + ".join(f"{t:,}" for t in terms)
    return [
        "feature-map size: " + summary.size_path(),
        f"parameters: {params}  (checked: sum(p.numel()) of the built PyTorch model)",
        f"multiply-adds per image: {summary.total_macs:,}  ({human_count(summary.total_macs)})",
        f"activation memory per image: {human_bytes(summary.activation_bytes)}  "
        f"({summary.activation_values:,} float32 values: the input and every layer's output)",
    ]


def human_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_summary(summary: Summary) -> str:
    """The whole summary as a text table with totals, warnings and the softmax note."""
    table = text_table(table_rows(summary), right=("params", "MACs"))
    rule = table.splitlines()[1]  # the dashes under the header close the table too
    c, h, w = summary.input_shape
    classes = f", {summary.num_classes} classes" if summary.num_classes else ""
    out = [f"{summary.name}: input {c}x{h}x{w} (channels x height x width){classes}",
           "output size per axis: ⌊(n + 2·padding − dilation·(kernel − 1) − 1)/stride⌋ + 1 "
           "(dilation 1: ⌊(n + 2p − k)/s⌋ + 1)",
           "", table, rule]
    out += totals_lines(summary)
    out.append("receptive field: input pixels one output value sees; jump: input pixels between neighbouring outputs")
    out.append("shapes verified against a real PyTorch forward pass of this network")
    if summary.warnings:
        out.append("")
        out += [f"warning: {text}" for text in summary.warnings]
    out += ["", SOFTMAX_NOTE]
    return "\n".join(out)


def layer_to_dict(info: LayerInfo) -> dict[str, Any]:
    """One traced layer as JSON-able data; a block nests its `children` and `shortcut` layers."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.spec.params.items() if k != "layers"}
    out = {
        "index": info.index, "path": info.path, "type": info.spec.type, "description": settings_text(info.spec),
        "settings": settings, "in_shape": list(info.in_shape), "out_shape": list(info.out_shape),
        "formula": info.formula, "params": info.params, "macs": info.macs,
        "receptive_field": list(info.receptive_field), "jump": list(info.jump), "warnings": list(info.warnings),
    }
    if info.children:
        out["children"] = [layer_to_dict(child) for child in info.children]
    if info.spec.kind.has_shortcut:
        out["shortcut"] = [layer_to_dict(child) for child in info.shortcut]  # empty: the identity
    return out


def summary_to_dict(summary: Summary) -> dict[str, Any]:
    """Everything in the table as JSON-able data."""
    return {
        "name": summary.name, "input_shape": list(summary.input_shape), "num_classes": summary.num_classes,
        "layers": [layer_to_dict(info) for info in summary.layers], "spatial_sizes": summary.spatial_sizes(),
        "total_params": summary.total_params, "total_macs": summary.total_macs,
        "activation_bytes_per_image": summary.activation_bytes, "warnings": summary.warnings,
        "verified": True, "note": SOFTMAX_NOTE,
    }


# ---------------------------------------------------------------------------------------------
# Where a spec comes from: a preset, a config file or a run folder
# ---------------------------------------------------------------------------------------------

def parse_input_shape(text: str) -> tuple[int, int, int]:
    """`1x28x28`, `3,32,32` or `3 32 32` -> (C, H, W)."""
    parts = [p for p in text.lower().replace(",", "x").replace("×", "x").replace(" ", "x").split("x") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise CnnlabError(f"--input {shorten(text)}: expected CxHxW with positive whole numbers, e.g. 1x28x28 or 3x32x32")
    return shape  # type: ignore[return-value]


def _folder_class_count(dataset: str) -> int | None:
    path = folder_path(dataset)
    if path is None or not path.is_dir():
        return None
    children = {p.name.lower(): p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    root = children.get("train", path)
    count = len([p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")])
    return count or None


def load_spec(preset: str | None = None, config_file: str | None = None, run_dir: str | None = None,
              input_shape: tuple[int, int, int] | None = None,
              num_classes: int | None = None) -> tuple[str, list[LayerSpec], tuple[int, int, int], int | None]:
    """(name, layers, input shape, classes) from exactly one of a preset, a config file or a run folder."""
    given = [x for x in (preset, config_file, run_dir) if x]
    if len(given) != 1:
        raise CnnlabError("summary: give exactly one of --preset NAME, --config FILE or a RUN_DIR")
    if run_dir:
        from .runs import open_run

        bundle = open_run(run_dir)
        return str(run_dir), bundle.layers, input_shape or bundle.input_shape, num_classes or len(bundle.classes)
    from .config import resolve_config
    from .data.catalog import NAMED_DATASETS
    from .presets import PRESETS

    overrides = {}
    if preset in PRESETS and PRESETS[preset].get("colour_folders"):
        # training asks for the folder; describing the network needs only its 3xHxW input
        overrides = {"data": {"dataset": "folder:CIFAR-style colour images"}}
    config = resolve_config(preset, config_file, overrides)
    layers = parse_layers(config.model)
    data = config.data
    # image_size only matters for image folders, so a preset that sets it (rgb32) describes colour photos.
    if data.dataset == "mnist" and data.image_size is None:
        default_shape, default_classes = (data.channels or 1, 28, 28), 10
    elif data.dataset == "mnist":
        default_shape, default_classes = (data.channels or 3, data.image_size, data.image_size), 10
    elif data.dataset in NAMED_DATASETS:
        named = NAMED_DATASETS[data.dataset]
        size = data.image_size or named.shape[1]
        default_shape, default_classes = (data.channels or named.shape[0], size, size), named.num_classes
    else:
        size = data.image_size or 32
        default_shape, default_classes = (data.channels or 3, size, size), _folder_class_count(data.dataset)
    name = f"preset {preset}" if preset else str(config_file)
    return name, layers, input_shape or default_shape, num_classes or default_classes or 10
