"""A CNN as data: a validated list of layer specs.

Every command reads the same spec: `summary` prints it, `train` builds it, `export` and `serve`
rebuild it from a checkpoint. A spec is a list whose items are either a bare layer name
(`"relu"`) or a mapping with a `type` key and that layer's settings, named as in PyTorch:

    - {type: conv, out_channels: 16, kernel_size: 5, padding: 2}
    - relu
    - {type: maxpool, kernel_size: 2}
    - flatten
    - {type: linear}            # the last linear layer defaults to one output per class

Input channels and the first linear layer's input size are never written by hand: `trace`
walks the spec from the input shape and works them out, with the output-size formula
⌊(n + 2p − d(k−1) − 1)/s⌋ + 1 for every conv and pool layer. A spec that cannot work
(feature maps shrinking below 1x1, reflect padding wider than its input, a stated channel
count that disagrees with the data) is rejected here, before any training, with a message
that names the layer and shows the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CnnlabError

# type -> {key: default}; `REQUIRED` marks keys without a default.
REQUIRED = object()

LAYER_KEYS: dict[str, dict[str, Any]] = {
    "conv": {
        "out_channels": REQUIRED, "kernel_size": REQUIRED, "stride": 1, "padding": 0,
        "padding_mode": "zeros", "dilation": 1, "groups": 1, "bias": True, "in_channels": None,
        "whiten": False, "init": "default",
    },
    "maxpool": {"kernel_size": REQUIRED, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False},
    "avgpool": {"kernel_size": REQUIRED, "stride": None, "padding": 0, "ceil_mode": False,
                "count_include_pad": True},
    "global_avg_pool": {},
    "global_max_pool": {},
    "batchnorm": {"eps": 1e-5, "momentum": 0.1, "scale": True},
    "scale": {"factor": REQUIRED},
    "dropout": {"p": 0.5},
    "flatten": {},
    "linear": {"out_features": None, "bias": True, "in_features": None},
    "relu": {},
    "leaky_relu": {"negative_slope": 0.01},
    "gelu": {},
    "silu": {},
    "elu": {"alpha": 1.0},
    "tanh": {},
    "sigmoid": {},
}

ALIASES = {
    "conv2d": "conv", "convolution": "conv",
    "max_pool": "maxpool", "maxpool2d": "maxpool", "max_pool2d": "maxpool",
    "avg_pool": "avgpool", "avgpool2d": "avgpool", "avg_pool2d": "avgpool", "average_pool": "avgpool",
    "global_avgpool": "global_avg_pool", "global_maxpool": "global_max_pool",
    "adaptive_avg_pool": "global_avg_pool", "adaptive_max_pool": "global_max_pool",
    "batch_norm": "batchnorm", "bn": "batchnorm", "batchnorm2d": "batchnorm",
    "fc": "linear", "dense": "linear", "leakyrelu": "leaky_relu", "swish": "silu",
}

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "elu", "tanh", "sigmoid")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# dirac: the first in_channels filters start as the identity (an implicit residual, as in airbench)
CONV_INITS = ("default", "dirac")
# The layer types that end the spatial part of a network: the head starts at them.
HEAD_STARTERS = ("flatten", "global_avg_pool", "global_max_pool")


@dataclass(frozen=True)
class LayerSpec:
    """One validated layer: its type and every setting filled in (defaults included)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The spec as it would be written in a config file, defaults left out."""
        out: dict[str, Any] = {"type": self.type}
        for key, value in self.params.items():
            if isinstance(value, tuple):
                value = value[0] if value[0] == value[1] else list(value)
            if key == "stride" and self.type in ("maxpool", "avgpool") and value == self.params["kernel_size"][0]:
                continue  # a pool's stride defaults to its kernel size
            if value != LAYER_KEYS[self.type][key]:
                out[key] = value
        return out if len(out) > 1 else self.type  # type: ignore[return-value]

    def describe(self) -> str:
        """Short human description, e.g. `conv 5x5, stride 1, padding 2`."""
        p = self.params
        if self.type == "conv":
            text = f"conv {_pair_text(p['kernel_size'])}, stride {_pair_text(p['stride'], ',')}, padding {_padding_text(p['padding'])}"
            if p["dilation"] != 1 and p["dilation"] != (1, 1):
                text += f", dilation {_pair_text(p['dilation'], ',')}"
            if p["padding_mode"] != "zeros":
                text += f", {p['padding_mode']}"
            if p["groups"] != 1:
                text += f", groups {p['groups']}"
            if p["whiten"]:
                text += ", whitening (fixed)"
            if p["init"] != "default":
                text += f", {p['init']} init"
            return text
        if self.type in ("maxpool", "avgpool"):
            text = f"{self.type} {_pair_text(p['kernel_size'])}, stride {_pair_text(p['stride'], ',')}, padding {_padding_text(p['padding'])}"
            return text + (", ceil_mode" if p["ceil_mode"] else "")
        if self.type == "linear":
            return f"linear → {p['out_features']}"
        if self.type == "dropout":
            return f"dropout p={p['p']}"
        if self.type == "scale":
            return f"scale ×{p['factor']:g}"
        if self.type == "batchnorm" and not p["scale"]:
            return "batchnorm, scale fixed at 1"
        return self.type.replace("_", " ")


def _pair_text(value, sep: str = "x") -> str:
    if isinstance(value, (tuple, list)):
        if value[0] == value[1] and sep != "x":
            return str(value[0])
        return f"{value[0]}{sep}{value[1]}"
    return f"{value}{sep}{value}" if sep == "x" else str(value)


def _padding_text(value) -> str:
    return value if isinstance(value, str) else _pair_text(value, ",")


def _layer_error(index: int, spec: LayerSpec | None, message: str) -> CnnlabError:
    name = f"layer {index}" + (f" ({spec.describe()})" if spec is not None else "")
    return CnnlabError(f"{name}: {message}")


# ---------------------------------------------------------------------------------------------
# Parsing: raw config values -> LayerSpec
# ---------------------------------------------------------------------------------------------

def _as_pair(index: int, key: str, value, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool):
        raise CnnlabError(f"layer {index}: {key} must be a whole number or a pair, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise CnnlabError(f"layer {index}: {key} must be a whole number or a pair of them, got {value!r}")
    if min(value) < minimum:
        raise CnnlabError(f"layer {index}: {key} must be >= {minimum}, got {value!r}")
    return (int(value[0]), int(value[1]))


def parse_layer(index: int, raw: Any) -> LayerSpec:
    """Validate one raw layer (a name or a mapping) on its own; `index` is 1-based for messages."""
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise CnnlabError(f"layer {index}: expected a layer name or a mapping with 'type', got {raw!r}")
    if "type" not in raw:
        raise CnnlabError(f"layer {index}: missing 'type' (one of {', '.join(LAYER_KEYS)})")
    kind = str(raw["type"]).lower()
    kind = ALIASES.get(kind, kind)
    if kind not in LAYER_KEYS:
        raise CnnlabError(f"layer {index}: unknown layer type {raw['type']!r} (known: {', '.join(LAYER_KEYS)})")
    allowed = LAYER_KEYS[kind]
    unknown = [k for k in raw if k != "type" and k not in allowed]
    if unknown:
        raise CnnlabError(f"layer {index} ({kind}): unknown key {unknown[0]!r} (allowed: {', '.join(allowed) or 'none'})")
    params = {}
    for key, default in allowed.items():
        if key in raw:
            params[key] = raw[key]
        elif default is REQUIRED:
            raise CnnlabError(f"layer {index} ({kind}): missing required key {key!r}")
        else:
            params[key] = default

    if kind == "conv":
        params["kernel_size"] = _as_pair(index, "kernel_size", params["kernel_size"], 1)
        params["stride"] = _as_pair(index, "stride", params["stride"], 1)
        params["dilation"] = _as_pair(index, "dilation", params["dilation"], 1)
        pad = params["padding"]
        if isinstance(pad, str):
            if pad not in ("same", "valid"):
                raise CnnlabError(f"layer {index} (conv): padding must be a number, a pair, 'same' or 'valid', got {pad!r}")
            if pad == "same" and params["stride"] != (1, 1):
                raise CnnlabError(
                    f"layer {index} (conv): padding 'same' needs stride 1 in PyTorch (got stride "
                    f"{_pair_text(params['stride'], ',')}); use padding {params['kernel_size'][0] // 2} instead")
        else:
            params["padding"] = _as_pair(index, "padding", pad, 0)
        if params["padding_mode"] not in PADDING_MODES:
            raise CnnlabError(f"layer {index} (conv): padding_mode must be one of {', '.join(PADDING_MODES)}, got {params['padding_mode']!r}")
        for key in ("out_channels", "groups"):
            if not _positive_int(params[key]):
                raise CnnlabError(f"layer {index} (conv): {key} must be a positive whole number, got {params[key]!r}")
        if params["in_channels"] is not None and not _positive_int(params["in_channels"]):
            raise CnnlabError(f"layer {index} (conv): in_channels must be a positive whole number, got {params['in_channels']!r}")
        if params["out_channels"] % params["groups"]:
            raise CnnlabError(f"layer {index} (conv): out_channels {params['out_channels']} is not divisible by groups {params['groups']}")
        if not isinstance(params["bias"], bool):
            raise CnnlabError(f"layer {index} (conv): bias must be true or false, got {params['bias']!r}")
        if not isinstance(params["whiten"], bool):
            raise CnnlabError(f"layer {index} (conv): whiten must be true or false, got {params['whiten']!r}")
        if params["whiten"] and (params["groups"] != 1 or params["dilation"] != (1, 1)):
            raise CnnlabError(f"layer {index} (conv): a whitening conv needs groups 1 and dilation 1")
        if params["init"] not in CONV_INITS:
            raise CnnlabError(f"layer {index} (conv): init must be {' or '.join(CONV_INITS)}, got {params['init']!r}")
        if params["init"] == "dirac" and (params["whiten"] or params["groups"] != 1):
            raise CnnlabError(f"layer {index} (conv): init dirac needs groups 1 and no whiten")
    elif kind in ("maxpool", "avgpool"):
        params["kernel_size"] = _as_pair(index, "kernel_size", params["kernel_size"], 1)
        stride = params["stride"] if params["stride"] is not None else params["kernel_size"]
        params["stride"] = _as_pair(index, "stride", stride, 1)
        params["padding"] = _as_pair(index, "padding", params["padding"], 0)
        if kind == "maxpool":
            params["dilation"] = _as_pair(index, "dilation", params["dilation"], 1)
        for key in ("ceil_mode", "count_include_pad"):
            if key in params and not isinstance(params[key], bool):
                raise CnnlabError(f"layer {index} ({kind}): {key} must be true or false, got {params[key]!r}")
        for axis in (0, 1):
            # PyTorch limits pooling padding by the kernel size itself, dilation not counted.
            if params["padding"][axis] * 2 > params["kernel_size"][axis]:
                raise CnnlabError(
                    f"layer {index} ({kind}): padding {params['padding'][axis]} must be at most half the "
                    f"kernel size {params['kernel_size'][axis]}")
    elif kind == "linear":
        for key in ("out_features", "in_features"):
            if params[key] is not None and not _positive_int(params[key]):
                raise CnnlabError(f"layer {index} (linear): {key} must be a positive whole number, got {params[key]!r}")
        if not isinstance(params["bias"], bool):
            raise CnnlabError(f"layer {index} (linear): bias must be true or false, got {params['bias']!r}")
    elif kind == "dropout":
        p = params["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise CnnlabError(f"layer {index} (dropout): p must be a number in [0, 1), got {p!r}")
    elif kind == "scale":
        factor = params["factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor == 0:
            raise CnnlabError(f"layer {index} (scale): factor must be a non-zero number, got {factor!r}")
    elif kind in ("leaky_relu", "elu", "batchnorm"):
        if kind == "batchnorm" and not isinstance(params["scale"], bool):
            raise CnnlabError(f"layer {index} (batchnorm): scale must be true or false, got {params['scale']!r}")
        for key, value in params.items():
            if key == "scale":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CnnlabError(f"layer {index} ({kind}): {key} must be a number, got {value!r}")
        if kind == "batchnorm" and not (params["eps"] > 0 and 0 <= params["momentum"] <= 1):
            raise CnnlabError(f"layer {index} (batchnorm): eps must be > 0 and momentum in [0, 1], "
                              f"got eps {params['eps']!r}, momentum {params['momentum']!r}")
    return LayerSpec(kind, params)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_layers(raw_layers: Any) -> list[LayerSpec]:
    """Validate a whole raw spec (list of layers) without looking at shapes yet."""
    if isinstance(raw_layers, dict) and "layers" in raw_layers:
        raw_layers = raw_layers["layers"]
    if not isinstance(raw_layers, (list, tuple)) or not raw_layers:
        raise CnnlabError("model: expected a non-empty list of layers")
    return [layer if isinstance(layer, LayerSpec) else parse_layer(i, layer)
            for i, layer in enumerate(raw_layers, start=1)]


# ---------------------------------------------------------------------------------------------
# Tracing shapes: the output-size formula, parameters, MACs, receptive field
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerInfo:
    """What one layer does to one image: shapes, formula, cost and receptive field."""

    index: int
    spec: LayerSpec
    in_shape: tuple[int, ...]      # (C, H, W) or (F,)
    out_shape: tuple[int, ...]
    formula: str = ""              # the output-size formula with numbers filled in
    params: int = 0
    macs: int = 0
    receptive_field: tuple[int, int] = (1, 1)
    jump: tuple[int, int] = (1, 1)  # effective stride: input pixels between neighbouring outputs
    warnings: list[str] = field(default_factory=list)


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


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    # PyTorch pads d(k-1) in total, the odd pixel going to the bottom/right; this is the top/left part.
    return tuple(dilation[a] * (kernel[a] - 1) // 2 for a in (0, 1))  # type: ignore[return-value]


def trace(layers: list[LayerSpec], input_shape: tuple[int, int, int], num_classes: int | None = None) -> list[LayerInfo]:
    """Follow an image of `input_shape` (C, H, W) through the spec, validating every layer.

    Returns one `LayerInfo` per layer with the inferred sizes filled into the spec (a linear
    layer's `in_features`, the last linear's `out_features` = `num_classes`).
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise CnnlabError(f"input shape must be C x H x W with positive sizes, got {input_shape}")
    shape: tuple[int, ...] = tuple(int(v) for v in input_shape)
    rf, jump = (1, 1), (1, 1)
    infos: list[LayerInfo] = []
    last_linear = max((i for i, l in enumerate(layers) if l.type == "linear"), default=None)
    for i, spec in enumerate(layers, start=1):
        p = dict(spec.params)
        info = LayerInfo(i, spec, shape, shape)
        spatial = len(shape) == 3

        if spec.type in ("conv", "maxpool", "avgpool", "global_avg_pool", "global_max_pool") and not spatial:
            raise _layer_error(i, spec, f"needs feature maps (C x H x W) but gets a flat vector of {shape[0]}; "
                                        "move it before flatten")
        if spec.type == "conv":
            c, h, w = shape
            if p["in_channels"] is not None and p["in_channels"] != c:
                raise _layer_error(i, spec, f"in_channels is {p['in_channels']} but its input has {c} channels")
            if c % p["groups"]:
                raise _layer_error(i, spec, f"input channels {c} are not divisible by groups {p['groups']}")
            k, s, d = p["kernel_size"], p["stride"], p["dilation"]
            if p["whiten"]:
                if i != 1:
                    raise _layer_error(i, spec, "whiten is computed from the input images: only layer 1 can whiten")
                patch = c * k[0] * k[1]
                if p["out_channels"] % 2 or p["out_channels"] > 2 * patch:
                    raise _layer_error(i, spec, f"a whitening conv gives ± each of its input patch's {c}·{k[0]}·{k[1]} = "
                                                f"{patch} directions: out_channels must be even and at most {2 * patch}, "
                                                f"got {p['out_channels']}")
            pad_mode = p["padding"]
            if pad_mode == "same":
                pad = _same_padding(k, d)
            elif pad_mode == "valid":
                pad = (0, 0)
            else:
                pad = pad_mode
            sizes, formulas = [], []
            for axis, n in enumerate((h, w)):
                if pad_mode == "same":
                    out = n
                    formulas.append(f"'same' keeps {n}")
                else:
                    out = conv_output_size(n, k[axis], s[axis], pad[axis], d[axis])
                    formulas.append(_formula_text(n, k[axis], s[axis], pad[axis], d[axis], False, out))
                if out < 1:
                    raise _layer_error(i, spec, f"input {h}x{w} gives {_plain_formula(n, k[axis], s[axis], pad[axis], d[axis])} = {out}; "
                                                "the feature map would be smaller than 1x1")
                # 'same' with an even d(k−1) pads one more on the bottom/right: that side is the limit.
                widest = d[axis] * (k[axis] - 1) - pad[axis] if pad_mode == "same" else pad[axis]
                if p["padding_mode"] == "reflect" and widest >= n:
                    raise _layer_error(i, spec, f"reflect padding {widest} must be smaller than its input size {n}")
                if p["padding_mode"] == "circular" and widest > n:
                    raise _layer_error(i, spec, f"circular padding {widest} must be at most its input size {n}")
                if pad_mode not in ("same", "valid") and (n + 2 * pad[axis] - d[axis] * (k[axis] - 1) - 1) % s[axis]:
                    dropped = (n + 2 * pad[axis] - d[axis] * (k[axis] - 1) - 1) % s[axis]
                    info.warnings.append(f"floor division drops the last {dropped} row(s)/column(s) of the padded input")
                sizes.append(out)
            info.formula = formulas[0] if formulas[0] == formulas[1] or h == w and k[0] == k[1] and s[0] == s[1] and pad[0] == pad[1] and d[0] == d[1] else " | ".join(formulas)
            out_c = p["out_channels"]
            info.out_shape = (out_c, sizes[0], sizes[1])
            info.params = out_c * (c // p["groups"]) * k[0] * k[1] + (out_c if p["bias"] else 0)
            info.macs = sizes[0] * sizes[1] * out_c * (c // p["groups"]) * k[0] * k[1]
            rf = tuple(rf[a] + d[a] * (k[a] - 1) * jump[a] for a in (0, 1))
            jump = tuple(jump[a] * s[a] for a in (0, 1))
            p["in_channels"] = c
        elif spec.type in ("maxpool", "avgpool"):
            c, h, w = shape
            k, s, pad = p["kernel_size"], p["stride"], p["padding"]
            d = p.get("dilation", (1, 1))
            sizes, formulas = [], []
            for axis, n in enumerate((h, w)):
                out = conv_output_size(n, k[axis], s[axis], pad[axis], d[axis], p["ceil_mode"])
                if out < 1:
                    raise _layer_error(i, spec, f"input {h}x{w} gives {_plain_formula(n, k[axis], s[axis], pad[axis], d[axis])} = {out}; "
                                                "the output would be smaller than 1x1")
                formulas.append(_formula_text(n, k[axis], s[axis], pad[axis], d[axis], p["ceil_mode"], out))
                remainder = (n + 2 * pad[axis] - d[axis] * (k[axis] - 1) - 1) % s[axis]
                if remainder and not p["ceil_mode"]:
                    info.warnings.append(f"floor division drops the last {remainder} row(s)/column(s) of the input")
                if remainder and p["ceil_mode"]:
                    info.warnings.append("ceil_mode adds a partial window at the border")
                sizes.append(out)
            info.formula = formulas[0] if formulas[0] == formulas[1] or (h == w and k[0] == k[1] and s[0] == s[1] and pad[0] == pad[1]) else " | ".join(formulas)
            info.out_shape = (c, sizes[0], sizes[1])
            rf = tuple(rf[a] + d[a] * (k[a] - 1) * jump[a] for a in (0, 1))
            jump = tuple(jump[a] * s[a] for a in (0, 1))
        elif spec.type in ("global_avg_pool", "global_max_pool"):
            c, h, w = shape
            info.out_shape = (c,)
            info.formula = f"{h}x{w} → 1x1, flattened to {c}"
            rf = tuple(rf[a] + ((h, w)[a] - 1) * jump[a] for a in (0, 1))
        elif spec.type == "flatten":
            info.out_shape = (math.prod(shape),)
            if len(shape) == 3:
                info.formula = f"{shape[0]}·{shape[1]}·{shape[2]} = {info.out_shape[0]}"
        elif spec.type == "linear":
            if spatial:
                raise _layer_error(i, spec, f"gets feature maps {shape[0]}x{shape[1]}x{shape[2]}; "
                                            "put a flatten or global pool layer before it")
            if p["in_features"] is not None and p["in_features"] != shape[0]:
                raise _layer_error(i, spec, f"in_features is {p['in_features']} but its input has {shape[0]} features")
            out = p["out_features"]
            if out is None:
                if i - 1 != last_linear:
                    raise _layer_error(i, spec, "out_features is required (only the last linear layer defaults to the number of classes)")
                if num_classes is None:
                    raise _layer_error(i, spec, "out_features is not set and the number of classes is unknown")
                out = num_classes
            elif i - 1 == last_linear and num_classes is not None and out != num_classes:
                raise _layer_error(i, spec, f"the last linear layer gives {out} outputs but the data has {num_classes} classes")
            p["in_features"], p["out_features"] = shape[0], out
            info.out_shape = (out,)
            info.params = shape[0] * out + (out if p["bias"] else 0)
            info.macs = shape[0] * out
            if shape[0] * out > 4_000_000:
                info.warnings.append(f"{shape[0]:,} inputs × {out:,} outputs = {shape[0] * out:,} weights: "
                                     "the flattened feature maps make this layer huge; pool more first")
        elif spec.type == "batchnorm":
            info.params = 2 * shape[0]
        info.receptive_field, info.jump = rf, jump  # type: ignore[assignment]
        info.spec = LayerSpec(spec.type, p)
        infos.append(info)
        shape = info.out_shape

    if len(shape) != 1:
        raise CnnlabError(f"model: the last layer gives feature maps {'x'.join(map(str, shape))}; "
                          "a classifier must end with flatten/global pool and a linear layer")
    if num_classes is not None and shape[0] != num_classes:
        raise CnnlabError(f"model: the network gives {shape[0]} outputs but the data has {num_classes} classes; "
                          "end with a linear layer")
    return infos


def _plain_formula(n: int, k: int, s: int, p: int, d: int) -> str:
    kernel = f"{d}*({k} - 1) - 1" if d != 1 else f"{k}"
    return f"({n} + 2*{p} - {kernel})/{s} + 1"


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


def _module(info: LayerInfo) -> nn.Module:
    spec, p = info.spec, info.spec.params
    if spec.type == "conv":
        conv = nn.Conv2d(p["in_channels"], p["out_channels"], p["kernel_size"], stride=p["stride"],
                         padding=p["padding"], dilation=p["dilation"], groups=p["groups"], bias=p["bias"],
                         padding_mode=p["padding_mode"])
        conv.weight.requires_grad_(not p["whiten"])  # set from the data by `init_whitening`, then fixed
        if p["init"] == "dirac":
            with torch.no_grad():
                nn.init.dirac_(conv.weight[:p["in_channels"]])
        return conv
    if spec.type == "maxpool":
        return nn.MaxPool2d(p["kernel_size"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil_mode"])
    if spec.type == "avgpool":
        return nn.AvgPool2d(p["kernel_size"], p["stride"], p["padding"], ceil_mode=p["ceil_mode"],
                            count_include_pad=p["count_include_pad"])
    if spec.type == "global_avg_pool":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if spec.type == "global_max_pool":
        return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
    if spec.type == "batchnorm":
        bn = nn.BatchNorm2d if len(info.in_shape) == 3 else nn.BatchNorm1d
        norm = bn(info.in_shape[0], eps=p["eps"], momentum=p["momentum"])
        norm.weight.requires_grad_(p["scale"])  # scale false: gamma stays 1, only the shift (beta) trains
        return norm
    if spec.type == "dropout":
        return nn.Dropout(p["p"])
    if spec.type == "scale":
        return Scale(p["factor"])
    if spec.type == "flatten":
        return nn.Flatten()
    if spec.type == "linear":
        return nn.Linear(p["in_features"], p["out_features"], bias=p["bias"])
    if spec.type == "relu":
        return nn.ReLU()
    if spec.type == "leaky_relu":
        return nn.LeakyReLU(p["negative_slope"])
    if spec.type == "elu":
        return nn.ELU(p["alpha"])
    return {"gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[spec.type]()


class Scale(nn.Module):
    """Multiply by a constant: e.g. airbench's logits × 1/9, a temperature trained with the model."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def head_start(infos: list[LayerInfo]) -> int:
    """Index (0-based) of the first head layer: a flatten/global pool, or the first flat input."""
    for n, info in enumerate(infos):
        if info.spec.type in HEAD_STARTERS or len(info.in_shape) == 1:
            return n
    return len(infos)


def build_model(layers: list[LayerSpec], input_shape: tuple[int, int, int], num_classes: int | None = None) -> CNN:
    """Build the `CNN` module for a spec; raises `CnnlabError` naming the layer if it cannot work."""
    infos = trace(layers, input_shape, num_classes)
    split = head_start(infos)
    features = nn.Sequential(*[_module(info) for info in infos[:split]])
    head = nn.Sequential(*[_module(info) for info in infos[split:]])
    return CNN(features, head)


@torch.no_grad()
def whitening_conv(model: nn.Module) -> nn.Conv2d | None:
    """The model's whitening first conv (its weights are the only fixed ones), or None."""
    conv = model.features[0] if len(getattr(model, "features", ())) else None
    return conv if isinstance(conv, nn.Conv2d) and not conv.weight.requires_grad else None


def init_whitening(model: CNN, images: torch.Tensor, eps: float = 5e-4) -> bool:
    """Set a whitening first conv from normalised sample `images` (N, C, H, W); False if there is none.

    The filters are the eigenvectors of the covariance of the input's k×k patches, each scaled by
    1/sqrt(eigenvalue): its outputs are decorrelated with unit variance, so the next layers need not
    learn that themselves. Each direction comes twice, + and −, so a following ReLU/GELU keeps both
    signs. The largest-variance directions come first when out_channels keeps only some.
    """
    conv = whitening_conv(model)
    if conv is None:
        return False
    out, c, kh, kw = conv.weight.shape
    total, outer, count = torch.zeros(c * kh * kw, dtype=torch.float64), 0, 0
    for start in range(0, images.shape[0], 256):  # in chunks: all patches at once would need gigabytes
        patches = images[start:start + 256].double().unfold(2, kh, 1).unfold(3, kw, 1)  # (N, C, H', W', kh, kw)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)  # a row per patch, laid out as a filter
        total += patches.sum(0)
        outer = outer + patches.T @ patches
        count += patches.shape[0]
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)              # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest variance first
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).view(-1, c, kh, kw)
    filters = filters[:out // 2].to(conv.weight.dtype)
    conv.weight.copy_(torch.cat([filters, -filters]))
    return True


def spec_to_list(layers: list[LayerSpec]) -> list[Any]:
    """The spec as plain JSON-able data (for configs and checkpoints)."""
    return [layer.to_dict() for layer in layers]
