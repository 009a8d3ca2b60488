"""A CNN as data: a validated list of layer specs, on one registry of layer types.

Every command reads the same spec: `summary` prints it, `train` builds it, `export` and `serve`
rebuild it from a checkpoint. A spec is a list whose items are either a bare layer name
(`"relu"`) or a mapping with a `type` key and that layer's settings, named as in PyTorch:

    - {type: conv, out_channels: 16, kernel_size: 5, padding: 2}
    - relu
    - {type: maxpool, kernel_size: 2}
    - {type: residual, layers: [{type: conv, out_channels: 16, kernel_size: 3, padding: 1}, relu,
                                {type: conv, out_channels: 16, kernel_size: 3, padding: 1}]}
    - flatten
    - {type: linear}            # the last linear layer defaults to one output per class

Input channels and the first linear layer's input size are never written by hand: `trace`
walks the spec from the input shape and works them out, with the output-size formula
⌊(n + 2p − d(k−1) − 1)/s⌋ + 1 for every conv and pool layer. A spec that cannot work
(feature maps shrinking below 1x1, reflect padding wider than its input, a stated channel
count that disagrees with the data, a residual body no shortcut can match) is rejected here,
before any training, with a message that names the layer (`layer 4.2` inside a block) and
shows the numbers.

Each layer type is one `LayerType` in `LAYER_TYPES`: its keys and defaults, validation, output
shape and formula, parameters, multiply-adds, receptive field, the module it builds and its
description. Everything else (summary, pictures, the server's feature maps, export) asks the
registry; adding a type is one class with `@register` (see the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import CnnlabError

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
        raise CnnlabError(f"{where}: {key} must be a whole number or a pair, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise CnnlabError(f"{where}: {key} must be a whole number or a pair of them, got {value!r}")
    if min(value) < minimum:
        raise CnnlabError(f"{where}: {key} must be >= {minimum}, got {value!r}")
    return (int(value[0]), int(value[1]))


def _check_bool(where: str, params: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if not isinstance(params[key], bool):
            raise CnnlabError(f"{where}: {key} must be true or false, got {params[key]!r}")


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
    - `describe(params)`: a short description for tables, errors and pictures.
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    keys: dict[str, Any] = {}
    help: str = ""                  # one line for the README and `--help`
    needs_maps: bool = False        # its input must be feature maps (C x H x W)
    starts_head: bool = False       # flatten / global pooling: the classifier head starts here
    shows_maps: bool = False        # its output is worth drawing as feature maps
    has_filters: bool = False       # learned (or computed) 2-D kernels: `show filters`, Grad-CAM
    feature_block: bool = False     # computes new features from a neighbourhood (conv, residual block): a CAM layer
    pointwise: bool = False         # acts on each value alone, keeping channels and positions: a CAM looks past it

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


LAYER_TYPES: dict[str, LayerType] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[LayerType]) -> type[LayerType]:
    """Class decorator: add a layer type (and its aliases) to the registry."""
    kind = cls()
    LAYER_TYPES[kind.name] = kind
    for alias in kind.aliases:
        _ALIASES[alias] = kind.name
    return cls


def _spatial(info: LayerInfo) -> tuple[int, int, int]:
    if len(info.in_shape) != 3:
        raise _layer_error(info, f"needs feature maps (C x H x W) but gets a flat vector of {info.in_shape[0]}; "
                                 "move it before flatten")
    return info.in_shape  # type: ignore[return-value]


def _window_formula(info: LayerInfo, sizes_and_texts: list[tuple[int, str]], same_axes: bool) -> str:
    texts = [text for _, text in sizes_and_texts]
    return texts[0] if texts[0] == texts[1] or same_axes else " | ".join(texts)


@register
class Conv(LayerType):
    name = "conv"
    aliases = ("conv2d", "convolution")
    keys = {"out_channels": REQUIRED, "kernel_size": REQUIRED, "stride": 1, "padding": 0, "padding_mode": "zeros",
            "dilation": 1, "groups": 1, "bias": True, "in_channels": None, "whiten": False, "init": "default"}
    help = ("2-D convolution: out_channels, kernel_size, stride, padding (number, pair, same, valid), padding_mode, "
            "dilation, groups, bias; `whiten: true` (layer 1) fixes its filters to the data's patch whitening, "
            "`init: dirac` starts them as the identity")
    needs_maps = shows_maps = has_filters = feature_block = True

    def check(self, where: str, params: dict[str, Any]) -> None:
        for key in ("kernel_size", "stride", "dilation"):
            params[key] = _as_pair(where, key, params[key], 1)
        pad = params["padding"]
        if isinstance(pad, str):
            if pad not in ("same", "valid"):
                raise CnnlabError(f"{where}: padding must be a number, a pair, 'same' or 'valid', got {pad!r}")
            if pad == "same" and params["stride"] != (1, 1):
                raise CnnlabError(
                    f"{where}: padding 'same' needs stride 1 in PyTorch (got stride "
                    f"{_pair_text(params['stride'], ',')}); use padding {params['kernel_size'][0] // 2} instead")
        else:
            params["padding"] = _as_pair(where, "padding", pad, 0)
        if params["padding_mode"] not in PADDING_MODES:
            raise CnnlabError(f"{where}: padding_mode must be one of {', '.join(PADDING_MODES)}, got {params['padding_mode']!r}")
        for key in ("out_channels", "groups"):
            if not _positive_int(params[key]):
                raise CnnlabError(f"{where}: {key} must be a positive whole number, got {params[key]!r}")
        if params["in_channels"] is not None and not _positive_int(params["in_channels"]):
            raise CnnlabError(f"{where}: in_channels must be a positive whole number, got {params['in_channels']!r}")
        if params["out_channels"] % params["groups"]:
            raise CnnlabError(f"{where}: out_channels {params['out_channels']} is not divisible by groups {params['groups']}")
        _check_bool(where, params, "bias", "whiten")
        if params["whiten"] and (params["groups"] != 1 or params["dilation"] != (1, 1)):
            raise CnnlabError(f"{where}: a whitening conv needs groups 1 and dilation 1")
        if params["init"] not in CONV_INITS:
            raise CnnlabError(f"{where}: init must be {' or '.join(CONV_INITS)}, got {params['init']!r}")
        if params["init"] == "dirac" and (params["whiten"] or params["groups"] != 1):
            raise CnnlabError(f"{where}: init dirac needs groups 1 and no whiten")

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        c, h, w = _spatial(info)
        if p["in_channels"] is not None and p["in_channels"] != c:
            raise _layer_error(info, f"in_channels is {p['in_channels']} but its input has {c} channels")
        if c % p["groups"]:
            raise _layer_error(info, f"input channels {c} are not divisible by groups {p['groups']}")
        k, s, d = p["kernel_size"], p["stride"], p["dilation"]
        if p["whiten"]:
            if not state.is_first_layer:
                raise _layer_error(info, "whiten is computed from the input images: only layer 1 can whiten")
            patch = c * k[0] * k[1]
            if p["out_channels"] % 2 or p["out_channels"] > 2 * patch:
                raise _layer_error(info, f"a whitening conv gives ± each of its input patch's {c}·{k[0]}·{k[1]} = "
                                         f"{patch} directions: out_channels must be even and at most {2 * patch}, "
                                         f"got {p['out_channels']}")
        pad_mode = p["padding"]
        pad = _same_padding(k, d) if pad_mode == "same" else (0, 0) if pad_mode == "valid" else pad_mode
        results = []
        for axis, n in enumerate((h, w)):
            if pad_mode == "same":
                out, text = n, f"'same' keeps {n}"
            else:
                out = conv_output_size(n, k[axis], s[axis], pad[axis], d[axis])
                text = _formula_text(n, k[axis], s[axis], pad[axis], d[axis], False, out)
            if out < 1:
                raise _layer_error(info, f"input {h}x{w} gives {_plain_formula(n, k[axis], s[axis], pad[axis], d[axis])} "
                                         f"= {out}; the feature map would be smaller than 1x1")
            # 'same' with an even d(k−1) pads one more on the bottom/right: that side is the limit.
            widest = d[axis] * (k[axis] - 1) - pad[axis] if pad_mode == "same" else pad[axis]
            if p["padding_mode"] == "reflect" and widest >= n:
                raise _layer_error(info, f"reflect padding {widest} must be smaller than its input size {n}")
            if p["padding_mode"] == "circular" and widest > n:
                raise _layer_error(info, f"circular padding {widest} must be at most its input size {n}")
            if pad_mode not in ("same", "valid"):
                dropped = (n + 2 * pad[axis] - d[axis] * (k[axis] - 1) - 1) % s[axis]
                if dropped:
                    info.warnings.append(f"floor division drops the last {dropped} row(s)/column(s) of the padded input")
            results.append((out, text))
        info.formula = _window_formula(info, results, h == w and k[0] == k[1] and s[0] == s[1] and pad[0] == pad[1]
                                       and d[0] == d[1])
        out_c = p["out_channels"]
        info.out_shape = (out_c, results[0][0], results[1][0])
        per_output = (c // p["groups"]) * k[0] * k[1]
        info.params = out_c * per_output + (out_c if p["bias"] else 0)
        info.macs = results[0][0] * results[1][0] * out_c * per_output
        state.grow(k, s, d)
        p["in_channels"] = c

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        conv = nn.Conv2d(p["in_channels"], p["out_channels"], p["kernel_size"], stride=p["stride"],
                         padding=p["padding"], dilation=p["dilation"], groups=p["groups"], bias=p["bias"],
                         padding_mode=p["padding_mode"])
        conv.weight.requires_grad_(not p["whiten"])  # set from the data by `init_whitening`, then fixed
        if p["init"] == "dirac":
            with torch.no_grad():
                nn.init.dirac_(conv.weight[:p["in_channels"]])
        return conv

    def describe(self, p: dict[str, Any]) -> str:
        text = (f"conv {_pair_text(p['kernel_size'])}, stride {_pair_text(p['stride'], ',')}, "
                f"padding {_padding_text(p['padding'])}")
        if p["dilation"] not in (1, (1, 1)):
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


class _Pool(LayerType):
    needs_maps = shows_maps = True

    def default(self, key: str, params: dict[str, Any]) -> Any:
        return params["kernel_size"] if key == "stride" else self.keys[key]  # stride defaults to the kernel size

    def check(self, where: str, params: dict[str, Any]) -> None:
        params["kernel_size"] = _as_pair(where, "kernel_size", params["kernel_size"], 1)
        stride = params["stride"] if params["stride"] is not None else params["kernel_size"]
        params["stride"] = _as_pair(where, "stride", stride, 1)
        params["padding"] = _as_pair(where, "padding", params["padding"], 0)
        if "dilation" in params:
            params["dilation"] = _as_pair(where, "dilation", params["dilation"], 1)
        _check_bool(where, params, *[key for key in ("ceil_mode", "count_include_pad") if key in params])
        for axis in (0, 1):
            # PyTorch limits pooling padding by the kernel size itself, dilation not counted.
            if params["padding"][axis] * 2 > params["kernel_size"][axis]:
                raise CnnlabError(f"{where}: padding {params['padding'][axis]} must be at most half the "
                                  f"kernel size {params['kernel_size'][axis]}")

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        c, h, w = _spatial(info)
        k, s, pad = p["kernel_size"], p["stride"], p["padding"]
        d = p.get("dilation", (1, 1))
        results = []
        for axis, n in enumerate((h, w)):
            out = conv_output_size(n, k[axis], s[axis], pad[axis], d[axis], p["ceil_mode"])
            if out < 1:
                raise _layer_error(info, f"input {h}x{w} gives {_plain_formula(n, k[axis], s[axis], pad[axis], d[axis])} "
                                         f"= {out}; the output would be smaller than 1x1")
            remainder = (n + 2 * pad[axis] - d[axis] * (k[axis] - 1) - 1) % s[axis]
            if remainder and not p["ceil_mode"]:
                info.warnings.append(f"floor division drops the last {remainder} row(s)/column(s) of the input")
            if remainder and p["ceil_mode"]:
                info.warnings.append("ceil_mode adds a partial window at the border")
            results.append((out, _formula_text(n, k[axis], s[axis], pad[axis], d[axis], p["ceil_mode"], out)))
        info.formula = _window_formula(info, results, h == w and k[0] == k[1] and s[0] == s[1] and pad[0] == pad[1])
        info.out_shape = (c, results[0][0], results[1][0])
        state.grow(k, s, d)

    def describe(self, p: dict[str, Any]) -> str:
        text = (f"{self.name} {_pair_text(p['kernel_size'])}, stride {_pair_text(p['stride'], ',')}, "
                f"padding {_padding_text(p['padding'])}")
        return text + (", ceil_mode" if p["ceil_mode"] else "")


@register
class MaxPool(_Pool):
    name = "maxpool"
    aliases = ("max_pool", "maxpool2d", "max_pool2d")
    keys = {"kernel_size": REQUIRED, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    help = "max pooling: kernel_size, stride (default: the kernel size), padding, dilation, ceil_mode"

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        return nn.MaxPool2d(p["kernel_size"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil_mode"])


@register
class AvgPool(_Pool):
    name = "avgpool"
    aliases = ("avg_pool", "avgpool2d", "avg_pool2d", "average_pool")
    keys = {"kernel_size": REQUIRED, "stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True}
    help = "average pooling: kernel_size, stride (default: the kernel size), padding, ceil_mode, count_include_pad"

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        return nn.AvgPool2d(p["kernel_size"], p["stride"], p["padding"], ceil_mode=p["ceil_mode"],
                            count_include_pad=p["count_include_pad"])


class _GlobalPool(LayerType):
    needs_maps = starts_head = True
    pool: type[nn.Module] = nn.AdaptiveAvgPool2d

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        c, h, w = _spatial(info)
        info.out_shape = (c,)
        info.formula = f"{h}x{w} → 1x1, flattened to {c}"
        state.grow((h, w), (1, 1))

    def build(self, info: LayerInfo) -> nn.Module:
        return nn.Sequential(self.pool(1), nn.Flatten())


@register
class GlobalAvgPool(_GlobalPool):
    name = "global_avg_pool"
    aliases = ("global_avgpool", "adaptive_avg_pool")
    help = "the mean of each feature map: C x H x W -> C"


@register
class GlobalMaxPool(_GlobalPool):
    name = "global_max_pool"
    aliases = ("global_maxpool", "adaptive_max_pool")
    help = "the maximum of each feature map: C x H x W -> C"
    pool = nn.AdaptiveMaxPool2d


@register
class BatchNorm(LayerType):
    name = "batchnorm"
    aliases = ("batch_norm", "bn", "batchnorm2d")
    keys = {"eps": 1e-5, "momentum": 0.1, "scale": True}
    help = "batch normalisation (2-D on feature maps, 1-D on vectors): eps, momentum; `scale: false` keeps gamma at 1"
    pointwise = True

    def check(self, where: str, params: dict[str, Any]) -> None:
        _check_bool(where, params, "scale")
        for key in ("eps", "momentum"):
            if not _number(params[key]):
                raise CnnlabError(f"{where}: {key} must be a number, got {params[key]!r}")
        if not (params["eps"] > 0 and 0 <= params["momentum"] <= 1):
            raise CnnlabError(f"{where}: eps must be > 0 and momentum in [0, 1], "
                              f"got eps {params['eps']!r}, momentum {params['momentum']!r}")

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        info.out_shape = info.in_shape
        info.params = 2 * info.in_shape[0]

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        norm = (nn.BatchNorm2d if len(info.in_shape) == 3 else nn.BatchNorm1d)(info.in_shape[0], eps=p["eps"],
                                                                                momentum=p["momentum"])
        norm.weight.requires_grad_(p["scale"])  # scale false: gamma stays 1, only the shift (beta) trains
        return norm

    def describe(self, p: dict[str, Any]) -> str:
        return "batchnorm" if p["scale"] else "batchnorm, scale fixed at 1"


@register
class ScaleLayer(LayerType):
    name = "scale"
    keys = {"factor": REQUIRED}
    help = "multiply by a constant `factor` (e.g. logits × 1/9)"
    pointwise = True

    def check(self, where: str, params: dict[str, Any]) -> None:
        if not _number(params["factor"]) or params["factor"] == 0:
            raise CnnlabError(f"{where}: factor must be a non-zero number, got {params['factor']!r}")

    def build(self, info: LayerInfo) -> nn.Module:
        return Scale(info.spec.params["factor"])

    def describe(self, p: dict[str, Any]) -> str:
        return f"scale ×{p['factor']:g}"


@register
class Dropout(LayerType):
    name = "dropout"
    keys = {"p": 0.5}
    help = "zero a random fraction p of the values while training"
    pointwise = True

    def check(self, where: str, params: dict[str, Any]) -> None:
        if not _number(params["p"]) or not 0 <= params["p"] < 1:
            raise CnnlabError(f"{where}: p must be a number in [0, 1), got {params['p']!r}")

    def build(self, info: LayerInfo) -> nn.Module:
        return nn.Dropout(info.spec.params["p"])

    def describe(self, p: dict[str, Any]) -> str:
        return f"dropout p={p['p']}"


@register
class Flatten(LayerType):
    name = "flatten"
    help = "C x H x W -> one vector of C·H·W values"
    starts_head = True

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        info.out_shape = (math.prod(info.in_shape),)
        if len(info.in_shape) == 3:
            info.formula = f"{info.in_shape[0]}·{info.in_shape[1]}·{info.in_shape[2]} = {info.out_shape[0]}"

    def build(self, info: LayerInfo) -> nn.Module:
        return nn.Flatten()


@register
class Linear(LayerType):
    name = "linear"
    aliases = ("fc", "dense")
    keys = {"out_features": None, "bias": True, "in_features": None}
    help = "fully connected: out_features (the last linear layer defaults to the number of classes), bias"

    def check(self, where: str, params: dict[str, Any]) -> None:
        for key in ("out_features", "in_features"):
            if params[key] is not None and not _positive_int(params[key]):
                raise CnnlabError(f"{where}: {key} must be a positive whole number, got {params[key]!r}")
        _check_bool(where, params, "bias")

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        shape = info.in_shape
        if len(shape) == 3:
            raise _layer_error(info, f"gets feature maps {shape[0]}x{shape[1]}x{shape[2]}; "
                                     "put a flatten or global pool layer before it")
        if p["in_features"] is not None and p["in_features"] != shape[0]:
            raise _layer_error(info, f"in_features is {p['in_features']} but its input has {shape[0]} features")
        out = p["out_features"]
        if out is None:
            if not state.is_last_linear:
                raise _layer_error(info, "out_features is required (only the last linear layer defaults to the "
                                         "number of classes)")
            if state.num_classes is None:
                raise _layer_error(info, "out_features is not set and the number of classes is unknown")
            out = state.num_classes
        elif state.is_last_linear and state.num_classes is not None and out != state.num_classes:
            raise _layer_error(info, f"the last linear layer gives {out} outputs but the data has "
                                     f"{state.num_classes} classes")
        p["in_features"], p["out_features"] = shape[0], out
        info.out_shape = (out,)
        info.params = shape[0] * out + (out if p["bias"] else 0)
        info.macs = shape[0] * out
        if shape[0] * out > 4_000_000:
            info.warnings.append(f"{shape[0]:,} inputs × {out:,} outputs = {shape[0] * out:,} weights: "
                                 "the flattened feature maps make this layer huge; pool more first")

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        return nn.Linear(p["in_features"], p["out_features"], bias=p["bias"])

    def describe(self, p: dict[str, Any]) -> str:
        return f"linear → {p['out_features']}"


class _Activation(LayerType):
    shows_maps = pointwise = True
    make: Callable[..., nn.Module] = nn.ReLU

    def check(self, where: str, params: dict[str, Any]) -> None:
        for key, value in params.items():
            if not _number(value):
                raise CnnlabError(f"{where}: {key} must be a number, got {value!r}")

    def build(self, info: LayerInfo) -> nn.Module:
        return type(self).make(*info.spec.params.values())


def _activation(name: str, module: Callable[..., nn.Module], text: str, keys: dict[str, Any] | None = None,
                aliases: tuple[str, ...] = ()) -> None:
    register(type(name, (_Activation,), {"name": name, "make": module, "help": text, "keys": keys or {},
                                         "aliases": aliases}))


_activation("relu", nn.ReLU, "max(0, x)")
_activation("leaky_relu", nn.LeakyReLU, "x, or negative_slope·x below 0", {"negative_slope": 0.01}, ("leakyrelu",))
_activation("gelu", nn.GELU, "x·Φ(x), a smooth ReLU")
_activation("silu", nn.SiLU, "x·sigmoid(x) (swish)", aliases=("swish",))
_activation("elu", nn.ELU, "x, or alpha·(eˣ − 1) below 0", {"alpha": 1.0})
_activation("tanh", nn.Tanh, "tanh(x)")
_activation("sigmoid", nn.Sigmoid, "1 / (1 + e⁻ˣ)")


def activation_names() -> list[str]:
    """The activation layer types (what a residual block's `activation` may be)."""
    return [name for name, kind in LAYER_TYPES.items() if isinstance(kind, _Activation)]


@register
class ResidualBlock(LayerType):
    """body(x) + shortcut(x), then an activation: the ResNet block.

    With no `shortcut` given it is the identity when the body keeps the shape, else a 1x1 conv
    with the body's stride (followed by batchnorm when the body uses batchnorm): the ResNet rule.
    """

    name = "residual"
    aliases = ("res", "resblock", "residual_block")
    keys = {"layers": REQUIRED, "shortcut": None, "activation": "relu"}
    help = ("a residual block: output = activation(body(x) + shortcut(x)); `layers` is the body, `shortcut` "
            "identity or conv (default: identity when the body keeps the shape, else a 1x1 conv)")
    needs_maps = shows_maps = feature_block = True

    def default(self, key: str, params: dict[str, Any]) -> Any:
        return self.keys[key]

    def check(self, where: str, params: dict[str, Any]) -> None:
        if params["shortcut"] not in (None, "identity", "conv"):
            raise CnnlabError(f"{where}: shortcut must be identity or conv, got {params['shortcut']!r}")
        activation = params["activation"]
        if activation in (None, "none", False):
            params["activation"] = "none"
        else:
            activation = _ALIASES.get(str(activation).lower(), str(activation).lower())
            if activation not in activation_names():
                raise CnnlabError(f"{where}: activation must be none or one of {', '.join(activation_names())}, "
                                  f"got {params['activation']!r}")
            params["activation"] = activation

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        c, h, w = _spatial(info)
        start_rf, start_jump = state.receptive_field, state.jump
        body = _trace_sequence(p["layers"], info.in_shape, state, f"{info.path}.", top_level=False)
        info.children = body
        out = body[-1].out_shape
        if len(out) != 3:
            raise _layer_error(body[-1], "a residual block's body must keep feature maps (C x H x W); "
                                         "flatten and linear layers go after the block")
        stride = tuple(state.jump[a] // start_jump[a] for a in (0, 1))
        matched = tuple(conv_output_size(n, 1, stride[a]) for a, n in enumerate((h, w)))
        if matched != out[1:]:
            culprit = _first_mismatch(body, stride)
            raise _layer_error(culprit, f"turns {_size(culprit.in_shape)} into {_size(culprit.out_shape)}, which no "
                                        f"1x1 shortcut of the block (stride {_pair_text(stride, ',')}) can match: "
                                        f"the block's {h}x{w} input becomes {matched[0]}x{matched[1]} on the shortcut "
                                        f"but {out[1]}x{out[2]} through the body; pad the layer to keep the size")
        shortcut = p["shortcut"] or ("identity" if out == info.in_shape else "conv")
        if shortcut == "identity" and out != info.in_shape:
            raise _layer_error(info, f"an identity shortcut needs the body to keep the shape {_size(info.in_shape)}, "
                                     f"but it gives {_size(out)}; use shortcut: conv (or leave shortcut out)")
        p["shortcut"] = shortcut
        info.shortcut = []
        if shortcut == "conv":
            projection: list[Any] = [{"type": "conv", "out_channels": out[0], "kernel_size": 1, "stride": list(stride),
                                      "bias": False}]
            if any(child.spec.type == "batchnorm" for child in body):
                projection.append("batchnorm")
            specs = [parse_layer(f"{info.path}.shortcut.{i}", raw) for i, raw in enumerate(projection, start=1)]
            side = TraceState(start_rf, start_jump, state.num_classes)
            info.shortcut = _trace_sequence(specs, info.in_shape, side, f"{info.path}.shortcut.", top_level=False)
            for projection_info in info.shortcut:  # the body's own warnings already say what is dropped
                projection_info.warnings.clear()
        info.out_shape = out
        info.params = sum(child.params for child in body + info.shortcut)
        info.macs = sum(child.macs for child in body + info.shortcut)
        shortcut_text = ("identity shortcut" if shortcut == "identity" else
                         f"1x1 conv shortcut, stride {_pair_text(stride, ',')}")
        info.formula = f"{_size(info.in_shape)} → {_size(out)}: body + {shortcut_text}"
        p["layers"] = [child.spec for child in body]

    def build(self, info: LayerInfo) -> nn.Module:
        body = nn.Sequential(*[child.spec.kind.build(child) for child in info.children])
        shortcut = nn.Sequential(*[s.spec.kind.build(s) for s in info.shortcut]) if info.shortcut else nn.Identity()
        activation = info.spec.params["activation"]
        act = nn.Identity() if activation == "none" else LAYER_TYPES[activation].build(
            LayerInfo(0, parse_layer("", activation), info.out_shape, info.out_shape))
        return Residual(body, shortcut, act)

    def describe(self, p: dict[str, Any]) -> str:
        inner = len(p["layers"])
        shortcut = {None: "", "identity": " + identity", "conv": " + conv shortcut"}[p["shortcut"]]
        after = "" if p["activation"] == "none" else f", then {p['activation']}"
        return f"residual: {inner} layer{'s' if inner != 1 else ''}{shortcut}{after}"


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _first_mismatch(body: list[LayerInfo], stride: tuple[int, int]) -> LayerInfo:
    # The layer that shrinks its maps by more than its own stride explains (e.g. a 3x3 conv without padding).
    for child in body:
        if len(child.in_shape) == 3 and len(child.out_shape) == 3:
            own = child.spec.params.get("stride", (1, 1)) if child.spec.type != "residual" else (1, 1)
            expected = tuple(conv_output_size(n, 1, own[a]) for a, n in enumerate(child.in_shape[1:]))
            if child.out_shape[1:] != expected and child.spec.type != "residual":
                return child
    return body[-1]


class Residual(nn.Module):
    """activation(body(x) + shortcut(x))."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module, activation: nn.Module):
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.body(x) + self.shortcut(x))  # (B, C', H', W')


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
        raise CnnlabError(f"{where}: expected a layer name or a mapping with 'type', got {raw!r}")
    if "type" not in raw:
        raise CnnlabError(f"{where}: missing 'type' (one of {', '.join(LAYER_TYPES)})")
    name = str(raw["type"]).lower()
    name = _ALIASES.get(name, name)
    if name not in LAYER_TYPES:
        raise CnnlabError(f"{where}: unknown layer type {raw['type']!r} (known: {', '.join(LAYER_TYPES)})")
    kind = LAYER_TYPES[name]
    unknown = [k for k in raw if k != "type" and k not in kind.keys]
    if unknown:
        raise CnnlabError(f"{where} ({name}): unknown key {unknown[0]!r} (allowed: {', '.join(kind.keys) or 'none'})")
    params = {}
    for key, default in kind.keys.items():
        if key in raw:
            params[key] = raw[key]
        elif default is REQUIRED:
            raise CnnlabError(f"{where} ({name}): missing required key {key!r}")
        else:
            params[key] = default
    if "layers" in kind.keys:  # a block: its inner layers are specs of their own
        inner = params["layers"]
        if not isinstance(inner, (list, tuple)) or not inner:
            raise CnnlabError(f"{where} ({name}): layers must be a non-empty list of layers, got {inner!r:.80}")
        params["layers"] = [parse_layer(f"{path}.{i}", child) for i, child in enumerate(inner, start=1)]
    kind.check(f"{where} ({name})", params)
    return LayerSpec(name, params)


def parse_layers(raw_layers: Any) -> list[LayerSpec]:
    """Validate a whole raw spec (list of layers) without looking at shapes yet."""
    if isinstance(raw_layers, dict) and "layers" in raw_layers:
        raw_layers = raw_layers["layers"]
    if not isinstance(raw_layers, (list, tuple)) or not raw_layers:
        raise CnnlabError("model: expected a non-empty list of layers")
    return [parse_layer(i, layer) for i, layer in enumerate(raw_layers, start=1)]


# ---------------------------------------------------------------------------------------------
# Tracing shapes: the output-size formula, parameters, MACs, receptive field
# ---------------------------------------------------------------------------------------------

def _trace_sequence(layers: list[LayerSpec], shape: tuple[int, ...], state: TraceState, prefix: str,
                    top_level: bool) -> list[LayerInfo]:
    last_linear = max((i for i, layer in enumerate(layers) if layer.type == "linear"), default=None)
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
        if info.spec.kind.starts_head or len(info.in_shape) == 1:
            return n
    return len(infos)


def build_model(layers: list[LayerSpec], input_shape: tuple[int, int, int], num_classes: int | None = None) -> CNN:
    """Build the `CNN` module for a spec; raises `CnnlabError` naming the layer if it cannot work."""
    infos = trace(layers, input_shape, num_classes)
    split = head_start(infos)
    features = nn.Sequential(*[info.spec.kind.build(info) for info in infos[:split]])
    head = nn.Sequential(*[info.spec.kind.build(info) for info in infos[split:]])
    return CNN(features, head)


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


# Layer types defined in their own modules register themselves on import (timm's backbones: backbones.py).
from . import backbones  # noqa: E402,F401
