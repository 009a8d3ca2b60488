"""The layer registry and what every layer type shares: `LayerSpec` (one layer as data), `LayerInfo`
(one traced layer: shapes, formula, parameters, receptive field), `LayerType` and `register`, and the
functions that work on a whole spec: `parse_layers`, `trace`, `build_model`, `layer_modules`.

The layer types themselves live in `builtin.py` (conv, pools, activations, residual, ...) and
`backbones.py` (timm); `cnnlab.layers` imports them all, so a spec can use any of them.
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import CnnlabError, shorten

REQUIRED = object()  # marks keys without a default
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# dirac: the first in_channels filters start as the identity (an implicit residual, as in airbench)
CONV_INITS = ("default", "dirac")


@dataclass(frozen=True)
class LayerSpec:
    """One validated layer: its type and every setting filled in (defaults included).

    A residual block's inner layers are LayerSpecs too, in `params["layers"]`."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> "LayerType":
        return LAYER_TYPES[self.type]

    @property
    def children(self) -> list["LayerSpec"]:
        return list(self.params.get("layers", ()))

    def to_dict(self) -> dict[str, Any] | str:
        """The spec as it would be written in a config file, defaults left out."""
        out: dict[str, Any] = {"type": self.type}
        for key, value in self.params.items():
            if key == "layers":
                out[key] = [child.to_dict() for child in value]
            elif _plain(value) != _plain(self.kind.default(key, self.params)):
                out[key] = _plain(value)
        return out if len(out) > 1 else self.type

    def describe(self) -> str:
        """Short human description, e.g. `conv 5x5, stride 1, padding 2`."""
        return self.kind.describe(self.params)


@dataclass
class LayerInfo:
    """What one layer does to one image: shapes, formula, cost and receptive field."""

    index: int                     # 1-based position among its siblings
    spec: LayerSpec
    in_shape: tuple[int, ...]      # (C, H, W) or (F,)
    out_shape: tuple[int, ...]
    formula: str = ""              # the output-size formula with numbers filled in
    params: int = 0                # a block's include its inner layers'
    macs: int = 0
    receptive_field: tuple[int, int] = (1, 1)
    jump: tuple[int, int] = (1, 1)  # effective stride: input pixels between neighbouring outputs
    warnings: list[str] = field(default_factory=list)
    path: str = ""                 # "4" at the top level, "4.2" for a block's second inner layer
    children: list["LayerInfo"] = field(default_factory=list)   # a block's body
    shortcut: list["LayerInfo"] = field(default_factory=list)   # a block's projection (empty: identity)

    def walk(self) -> Iterator["LayerInfo"]:
        """This layer, then (depth first) its body and shortcut layers."""
        yield self
        for child in self.children + self.shortcut:
            yield from child.walk()


def walk(infos: list[LayerInfo]) -> Iterator[LayerInfo]:
    """Every layer of a traced spec, blocks' inner layers included, in order."""
    for info in infos:
        yield from info.walk()


def conv_output_size(n: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """⌊(n + 2p − d(k−1) − 1)/s⌋ + 1, the size of a conv or pool output along one axis.

    With `ceil_mode` (pooling only) the division rounds up, but a window may not start inside
    the right padding, exactly as PyTorch decides.
    """
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= n + padding:
            out -= 1
        return out
    return span // stride + 1


def _formula_text(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool, out: int) -> str:
    kernel = f"{d}·({k} − 1) − 1" if d != 1 else f"{k}"
    left, right = ("⌈", "⌉") if ceil_mode else ("⌊", "⌋")
    return f"{left}({n} + 2·{p} − {kernel})/{s}{right} + 1 = {out}"


def _plain_formula(n: int, k: int, s: int, p: int, d: int) -> str:
    kernel = f"{d}*({k} - 1) - 1" if d != 1 else f"{k}"
    return f"({n} + 2*{p} - {kernel})/{s} + 1"


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    # PyTorch pads d(k-1) in total, the odd pixel going to the bottom/right; this is the top/left part.
    return tuple(dilation[a] * (kernel[a] - 1) // 2 for a in (0, 1))  # type: ignore[return-value]


def _plain(value: Any) -> Any:
    """(2, 2) -> 2 and (2, 3) -> [2, 3]: a pair as a config file writes it."""
    if isinstance(value, tuple):
        return value[0] if value[0] == value[1] else list(value)
    return value


def _pair_text(value, sep: str = "x") -> str:
    if isinstance(value, (tuple, list)):
        if value[0] == value[1] and sep != "x":
            return str(value[0])
        return f"{value[0]}{sep}{value[1]}"
    return f"{value}{sep}{value}" if sep == "x" else str(value)


def _padding_text(value) -> str:
    return value if isinstance(value, str) else _pair_text(value, ",")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _as_pair(where: str, key: str, value, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool):
        raise CnnlabError(f"{where}: {key} must be a whole number or a pair, got {shorten(value)}")
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise CnnlabError(f"{where}: {key} must be a whole number or a pair of them, got {shorten(value)}")
    if min(value) < minimum:
        raise CnnlabError(f"{where}: {key} must be >= {minimum}, got {shorten(value)}")
    return (int(value[0]), int(value[1]))


def _check_bool(where: str, params: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if not isinstance(params[key], bool):
            raise CnnlabError(f"{where}: {key} must be true or false, got {shorten(params[key])}")


def _layer_error(info: LayerInfo, message: str) -> CnnlabError:
    return CnnlabError(f"layer {info.path} ({info.spec.describe()}): {message}")


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

@dataclass
class TraceState:
    """What `trace` carries from layer to layer: the receptive field and jump so far, and the
    facts a layer needs from the whole spec."""

    receptive_field: tuple[int, int] = (1, 1)
    jump: tuple[int, int] = (1, 1)
    num_classes: int | None = None
    is_last_linear: bool = False
    is_first_layer: bool = False

    def grow(self, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> None:
        """A window of `kernel` (dilated) moved by `stride`: the receptive field grows by d(k−1) jumps."""
        self.receptive_field = tuple(self.receptive_field[a] + dilation[a] * (kernel[a] - 1) * self.jump[a]
                                     for a in (0, 1))  # type: ignore[assignment]
        self.jump = tuple(self.jump[a] * stride[a] for a in (0, 1))  # type: ignore[assignment]


class LayerType:
    """One kind of layer. Subclasses set the class attributes and override what differs.

    - `keys`: setting -> default (`REQUIRED` for none); unknown keys are rejected by name.
    - `check(where, params)`: validate and normalise the settings on their own (pairs, ranges).
    - `trace(info, params, state)`: from `info.in_shape`, fill `info.out_shape` and the formula,
      parameters, MACs and warnings; record inferred settings in `params`; grow the receptive field.
    - `build(info)`: the `nn.Module` for the traced layer.
    - `describe(params)`: a short description for tables, errors and pictures;
      `settings_text(params)` the fuller one of the summary table, `summary_formula(info)` its formula.
    - `spec_from_module(module)`: the spec of this type a plain PyTorch module stands for, if any.
    - `has_pretrained(params)`, `load_pretrained(...)`, `pretrained_normalisation(...)`: weights a
      new run starts from (timm backbones).

    The class attributes below are the questions the rest of cnnlab asks about a layer (summary,
    Grad-CAM, feature maps, fine-tuning): none of them tests a type's name, so a registered type
    is treated exactly as its flags say.
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    keys: dict[str, Any] = {}
    help: str = ""                  # one line for the README and `--help`
    needs_maps: bool = False        # its input must be feature maps (C x H x W)
    starts_head: bool = False       # flatten / global pooling: the classifier head starts here
    shows_maps: bool = False        # its output is worth drawing as feature maps (`show feature-maps`, the page)
    has_filters: bool = False       # learned (or computed) 2-D kernels: `show filters`; its maps are signed
    extracts_features: bool = False
    """It computes new feature maps from neighbourhoods of its input (conv, residual block, a
    backbone): Grad-CAM's automatic layer is the last such layer with a map of at least 2x2."""
    keeps_layout: bool = False
    """It works value by value (or channel by channel) and keeps the shape, each output where its
    input was (activations, batchnorm, dropout, scale): Grad-CAM looks past it to the rectified
    maps the rest of the network reads, as the paper's "last conv layer" includes its ReLU."""
    has_shortcut: bool = False
    """A block whose output adds a shortcut to its body (residual): the summary shows the
    shortcut's rows, an identity shortcut included."""
    classes_key: str = ""
    """The setting that the number of classes fills in on the spec's last layer of this type
    (linear: `out_features`). That layer is the classifier: trace sizes it from the data, and
    fine-tuning on other classes (`train.init`) starts it fresh."""
    not_shown: str = "not shown: layer {previous}'s maps pass through it"
    """Why its feature maps are left out of the page (types without `shows_maps`); `{previous}`
    is the number of the layer before it."""

    def default(self, key: str, params: dict[str, Any]) -> Any:
        return self.keys[key]

    def check(self, where: str, params: dict[str, Any]) -> None:
        pass

    def trace(self, info: LayerInfo, params: dict[str, Any], state: TraceState) -> None:
        info.out_shape = info.in_shape

    def build(self, info: LayerInfo) -> nn.Module:
        raise NotImplementedError

    def describe(self, params: dict[str, Any]) -> str:
        return self.name.replace("_", " ")

    def settings_text(self, params: dict[str, Any]) -> str:
        """Type and every setting worth a column in `cnnlab summary` (default: `describe`)."""
        return self.describe(params)

    def summary_formula(self, info: LayerInfo) -> str:
        """The summary's "output size formula" cell (default: the formula `trace` wrote)."""
        return info.formula

    def spec_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        """The raw one-layer spec of this type that builds a module like `module` (for summaries of
        plain PyTorch models), or None when `module` is not one of this type's."""
        return None

    def has_pretrained(self, params: dict[str, Any]) -> bool:
        """Whether a new run fills this layer with pretrained weights (`load_pretrained`)."""
        return False

    def load_pretrained(self, module: nn.Module, spec: "LayerSpec", where: str) -> str:
        """Fill the built `module` with its pretrained weights; returns where they came from."""
        raise CnnlabError(f"{where}: layer type {self.name} has no pretrained weights")

    def pretrained_normalisation(self, params: dict[str, Any], channels: int) -> tuple[list[float], list[float]]:
        """The (mean, std) per channel that its pretrained weights expect of the input images."""
        raise CnnlabError(f"layer type {self.name} has no pretrained weights")


LAYER_TYPES: dict[str, LayerType] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[LayerType]) -> type[LayerType]:
    """Class decorator: add a layer type (and its aliases) to the registry."""
    kind = cls()
    LAYER_TYPES[kind.name] = kind
    for alias in kind.aliases:
        _ALIASES[alias] = kind.name
    return cls


def layer_kind(raw: Any) -> LayerType | None:
    """The registered type of one layer as a spec, a config file or a checkpoint writes it (a
    `LayerSpec`, a name or a mapping with `type`; aliases allowed), or None if it names none."""
    if isinstance(raw, LayerSpec):
        return raw.kind
    name = str(raw if isinstance(raw, str) else raw.get("type", "") if isinstance(raw, dict) else "").lower()
    return LAYER_TYPES.get(_ALIASES.get(name, name))


def classifier_index(layers: Any) -> int | None:
    """Index (0-based) of the classifier in a spec (raw or parsed): the last layer whose type has a
    `classes_key`, sized by the number of classes; None if there is none."""
    return max((i for i, layer in enumerate(layers) if (kind := layer_kind(layer)) is not None and kind.classes_key),
               default=None)


def _spatial(info: LayerInfo) -> tuple[int, int, int]:
    if len(info.in_shape) != 3:
        raise _layer_error(info, f"needs feature maps (C x H x W) but gets a flat vector of {info.in_shape[0]}; "
                                 "move it before flatten")
    return info.in_shape  # type: ignore[return-value]


def _window_formula(info: LayerInfo, sizes_and_texts: list[tuple[int, str]], same_axes: bool) -> str:
    texts = [text for _, text in sizes_and_texts]
    return texts[0] if texts[0] == texts[1] or same_axes else " | ".join(texts)


# ---------------------------------------------------------------------------------------------
# Parsing: raw config values -> LayerSpec
# ---------------------------------------------------------------------------------------------

def parse_layer(path: int | str, raw: Any) -> LayerSpec:
    """Validate one raw layer (a name or a mapping) on its own; `path` (1-based, `4.2` inside a
    block) names it in messages."""
    where = f"layer {path}"
    if isinstance(raw, LayerSpec):
        return raw
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise CnnlabError(f"{where}: expected a layer name or a mapping with 'type', got {shorten(raw)}")
    if "type" not in raw:
        raise CnnlabError(f"{where}: missing 'type' (one of {', '.join(LAYER_TYPES)})")
    name = str(raw["type"]).lower()
    name = _ALIASES.get(name, name)
    if name not in LAYER_TYPES:
        raise CnnlabError(f"{where}: unknown layer type {shorten(raw['type'])} (known: {', '.join(LAYER_TYPES)})")
    kind = LAYER_TYPES[name]
    unknown = [k for k in raw if k != "type" and k not in kind.keys]
    if unknown:
        raise CnnlabError(f"{where} ({name}): unknown key {shorten(unknown[0])} (allowed: {', '.join(kind.keys) or 'none'})")
    params = {}
    for key, default in kind.keys.items():
        if key in raw:
            params[key] = raw[key]
        elif default is REQUIRED:
            raise CnnlabError(f"{where} ({name}): missing required key {shorten(key)}")
        else:
            params[key] = default
    if "layers" in kind.keys:  # a block: its inner layers are specs of their own
        inner = params["layers"]
        if not isinstance(inner, (list, tuple)) or not inner:
            raise CnnlabError(f"{where} ({name}): layers must be a non-empty list of layers, got {shorten(inner)}")
        if str(path).count(".") + 1 >= MAX_NESTING:
            raise CnnlabError(f"{where} ({name}): blocks nested more than {MAX_NESTING} deep; a real network nests "
                              "two or three")
        if len(inner) > MAX_LAYERS:
            raise CnnlabError(f"{where} ({name}): {len(inner):,} inner layers, more than the limit of {MAX_LAYERS:,}")
        params["layers"] = [parse_layer(f"{path}.{i}", child) for i, child in enumerate(inner, start=1)]
    kind.check(f"{where} ({name})", params)
    return LayerSpec(name, params)


# Bounds on a spec's size, checked before anything is traced or built: a ResNet-152 has about 520
# layers counting every conv, norm and activation (the largest preset 29); 500 residual blocks in a
# row took 2.3 GB and 180 s for 5 steps. A spec beyond these is a mistake, not a network to train here.
MAX_LAYERS = 600     # layers in all, blocks' inner layers included
MAX_NESTING = 8      # blocks within blocks


def parse_layers(raw_layers: Any) -> list[LayerSpec]:
    """Validate a whole raw spec (list of layers) without looking at shapes yet."""
    if isinstance(raw_layers, dict) and "layers" in raw_layers:
        raw_layers = raw_layers["layers"]
    if not isinstance(raw_layers, (list, tuple)) or not raw_layers:
        raise CnnlabError("model: expected a non-empty list of layers")
    if len(raw_layers) > MAX_LAYERS:
        raise CnnlabError(f"model: {len(raw_layers):,} layers, more than the limit of {MAX_LAYERS:,}")
    specs = [parse_layer(i, layer) for i, layer in enumerate(raw_layers, start=1)]
    total = sum(_count_layers(spec) for spec in specs)
    if total > MAX_LAYERS:
        raise CnnlabError(f"model: {total:,} layers counting the blocks' inner layers, more than the limit of "
                          f"{MAX_LAYERS:,}")
    return specs


def _count_layers(spec: LayerSpec) -> int:
    return 1 + sum(_count_layers(child) for child in spec.children)


# ---------------------------------------------------------------------------------------------
# Tracing shapes: the output-size formula, parameters, MACs, receptive field
# ---------------------------------------------------------------------------------------------

def _trace_sequence(layers: list[LayerSpec], shape: tuple[int, ...], state: TraceState, prefix: str,
                    top_level: bool) -> list[LayerInfo]:
    last_linear = classifier_index(layers)
    infos = []
    for i, spec in enumerate(layers):
        params = dict(spec.params)
        info = LayerInfo(i + 1, spec, shape, shape, path=f"{prefix}{i + 1}")
        state.is_last_linear = top_level and i == last_linear
        state.is_first_layer = top_level and i == 0
        spec.kind.trace(info, params, state)
        info.receptive_field, info.jump = state.receptive_field, state.jump
        info.spec = LayerSpec(spec.type, params)
        infos.append(info)
        shape = info.out_shape
    return infos


def trace(layers: list[LayerSpec], input_shape: tuple[int, int, int], num_classes: int | None = None) -> list[LayerInfo]:
    """Follow an image of `input_shape` (C, H, W) through the spec, validating every layer.

    Returns one `LayerInfo` per top-level layer (a residual block's inner layers in its
    `children`), with the inferred sizes filled into the spec (a conv's `in_channels`, a linear
    layer's `in_features`, the last linear's `out_features` = `num_classes`).
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise CnnlabError(f"input shape must be C x H x W with positive sizes, got {input_shape}")
    shape = tuple(int(v) for v in input_shape)
    infos = _trace_sequence(layers, shape, TraceState(num_classes=num_classes), "", top_level=True)
    shape = infos[-1].out_shape
    if len(shape) != 1:
        raise CnnlabError(f"model: the last layer gives feature maps {'x'.join(map(str, shape))}; "
                          "a classifier must end with flatten/global pool and a linear layer")
    if num_classes is not None and shape[0] != num_classes:
        raise CnnlabError(f"model: the network gives {shape[0]} outputs but the data has {num_classes} classes; "
                          "end with a linear layer")
    return infos


# ---------------------------------------------------------------------------------------------
# Building: spec -> nn.Module
# ---------------------------------------------------------------------------------------------

class CNN(nn.Module):
    """A plain CNN: `features` (the spatial layers) then `head` (flatten/pool → linear)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential):
        super().__init__()
        self.features = features
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, H, W) -> (B, C', H', W')

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (B, C', H', W') -> (B, num_classes) logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def head_start(infos: list[LayerInfo]) -> int:
    """Index (0-based) of the first head layer: a flatten/global pool, or the first flat input."""
    for n, info in enumerate(infos):
        if info.spec.kind.starts_head or len(info.in_shape) == 1:
            return n
    return len(infos)


def build_model(layers: list[LayerSpec], input_shape: tuple[int, int, int], num_classes: int | None = None,
                batch_size: int | None = None) -> CNN:
    """Build the `CNN` module for a spec; raises `CnnlabError` naming the layer if it cannot work, or
    if it cannot fit in memory (`check_memory`; with `batch_size`, training it at that batch size)."""
    infos = trace(layers, input_shape, num_classes)
    check_memory(infos, batch_size)
    split = head_start(infos)
    features = nn.Sequential(*[info.spec.kind.build(info) for info in infos[:split]])
    head = nn.Sequential(*[info.spec.kind.build(info) for info in infos[split:]])
    return CNN(features, head)


FLOAT_BYTES = 4
# Training holds each weight four times (weight, gradient, two optimizer moments) and each activation
# about twice (the value kept for backward, its gradient).
TRAINING_WEIGHT_COPIES, TRAINING_ACTIVATION_COPIES = 4, 2


def check_memory(infos: list[LayerInfo], batch_size: int | None = None, available: int | None = None) -> None:
    """Refuse, before anything is allocated, a spec whose weights (and, with `batch_size`, whose training
    at that batch size) cannot fit in the memory this process may still use (`runtime.memory_available`),
    naming the layer that takes most and the bytes. A `{type: conv, out_channels: 1000000000}` is an
    error here, not a 36 GB allocation that the kernel kills."""
    from ..runtime import memory_available

    available = memory_available() if available is None else available
    if available is None:
        return
    layers = [info for top in infos for info in top.walk()]
    weights = sum(info.params for info in infos) * FLOAT_BYTES
    biggest = max(layers, key=lambda info: info.params if not info.children else 0)
    if weights > available:
        raise CnnlabError(f"{_name(biggest)}: {biggest.params:,} weights take {_bytes(biggest.params * FLOAT_BYTES)} "
                          f"(the whole model {_bytes(weights)}), more than the {_bytes(available)} of memory free; "
                          "make it smaller")
    if not batch_size:
        return
    activations = [(math.prod(info.out_shape) * batch_size * FLOAT_BYTES, info) for info in layers if not info.children]
    largest, where = max(activations, key=lambda pair: pair[0])
    needed = TRAINING_WEIGHT_COPIES * weights + TRAINING_ACTIVATION_COPIES * sum(size for size, _ in activations)
    if needed > available:
        raise CnnlabError(f"training this model at batch size {batch_size} needs about {_bytes(needed)} (weights, "
                          f"gradients, optimizer state and activations; the largest: {_name(where)}, "
                          f"{_bytes(largest)} of outputs), more than the {_bytes(available)} of memory free; "
                          "lower train.batch_size or make the layers smaller")


def _name(info: LayerInfo) -> str:
    return f"layer {info.path} ({info.spec.describe()})"


def _bytes(size: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"


def layer_modules(model: nn.Module, infos: list[LayerInfo]) -> list[tuple[LayerInfo, nn.Module]]:
    """(traced layer, its module) for every layer, blocks' inner and shortcut layers included, in
    `walk` order. Top-level layer n is `(features + head)[n - 1]`; inside a block, `body[i]` and
    `shortcut[i]`."""
    pairs: list[tuple[LayerInfo, nn.Module]] = []

    def visit(info: LayerInfo, module: nn.Module) -> None:
        pairs.append((info, module))
        for child, sub in zip(info.children, getattr(module, "body", ())):
            visit(child, sub)
        shortcut = getattr(module, "shortcut", None)
        if info.shortcut and isinstance(shortcut, nn.Sequential):
            for child, sub in zip(info.shortcut, shortcut):
                visit(child, sub)

    for info, module in zip(infos, list(model.features) + list(model.head)):
        visit(info, module)
    return pairs




def spec_to_list(layers: list[LayerSpec]) -> list[Any]:
    """The spec as plain JSON-able data (for configs and checkpoints)."""
    return [layer.to_dict() for layer in layers]
