"""The built-in layer types: conv, pools, global pools, batchnorm, scale, dropout, flatten, linear,
activations and the residual block, each one `LayerType` registered with `@register`, plus the
modules they build and the whitening first layer."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CnnlabError
from .registry import (CNN, CONV_INITS, LAYER_TYPES, LayerInfo, LayerType, PADDING_MODES, REQUIRED,
                       TraceState, _ALIASES, _as_pair, _check_bool, _formula_text, _layer_error, _number,
                       _padding_text, _pair_text, _plain_formula, _positive_int, _same_padding, _spatial,
                       _trace_sequence, _window_formula, conv_output_size, parse_layer, register)

@register
class Conv(LayerType):
    name = "conv"
    aliases = ("conv2d", "convolution")
    keys = {"out_channels": REQUIRED, "kernel_size": REQUIRED, "stride": 1, "padding": 0, "padding_mode": "zeros",
            "dilation": 1, "groups": 1, "bias": True, "in_channels": None, "whiten": False, "init": "default"}
    help = ("2-D convolution: out_channels, kernel_size, stride, padding (number, pair, same, valid), padding_mode, "
            "dilation, groups, bias; `whiten: true` (layer 1) fixes its filters to the data's patch whitening, "
            "`init: dirac` starts them as the identity")
    needs_maps = shows_maps = has_filters = extracts_features = True

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
            if (p["padding_mode"] == "reflect" and pad_mode not in ("same", "valid") and 0 < widest == n - 1
                    and not any("reflect padding" in text for text in info.warnings)):
                info.warnings.append(f"reflect padding {widest} is at its limit for input size {n} "
                                     "(it must stay below the input size)")
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

    def settings_text(self, p: dict[str, Any]) -> str:
        return self.describe(p).replace("conv ", f"conv {p['out_channels']} × ", 1)

    def summary_formula(self, info: LayerInfo) -> str:
        p = info.spec.params
        if p["padding"] != "same":
            return info.formula
        # Show what 'same' means in numbers: PyTorch pads d·(k−1) in total, the odd pixel bottom/right.
        parts = []
        for axis, n in enumerate(info.in_shape[1:]):
            total = p["dilation"][axis] * (p["kernel_size"][axis] - 1)
            parts.append(f"'same' pads {total // 2}+{total - total // 2}: ({n} + {total} − {total + 1})/1 + 1 = {n}")
        return parts[0] if parts[0] == parts[1] else " | ".join(parts)

    def spec_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        if not isinstance(module, nn.Conv2d):
            return None
        m = module
        return {"type": self.name, "out_channels": m.out_channels, "kernel_size": _listed(m.kernel_size),
                "stride": _listed(m.stride), "padding": _listed(m.padding), "dilation": _listed(m.dilation),
                "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode}

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


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


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

    def settings_text(self, p: dict[str, Any]) -> str:
        text = self.describe(p)
        if p["dilation"] != (1, 1):
            text += f", dilation {p['dilation'][0] if p['dilation'][0] == p['dilation'][1] else p['dilation']}"
        return text

    def spec_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        if not isinstance(module, nn.MaxPool2d):
            return None
        m = module
        return {"type": self.name, "kernel_size": _listed(m.kernel_size), "stride": _listed(m.stride),
                "padding": _listed(m.padding), "dilation": _listed(m.dilation), "ceil_mode": m.ceil_mode}

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        return nn.MaxPool2d(p["kernel_size"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil_mode"])


@register
class AvgPool(_Pool):
    name = "avgpool"
    aliases = ("avg_pool", "avgpool2d", "avg_pool2d", "average_pool")
    keys = {"kernel_size": REQUIRED, "stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True}
    help = "average pooling: kernel_size, stride (default: the kernel size), padding, ceil_mode, count_include_pad"

    def spec_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        if not isinstance(module, nn.AvgPool2d):
            return None
        m = module
        return {"type": self.name, "kernel_size": _listed(m.kernel_size), "stride": _listed(m.stride),
                "padding": _listed(m.padding), "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad}

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
    keeps_layout = True
    not_shown = ("not shown: it only rescales and shifts each channel of layer {previous} by constants learnt "
                 "in training")

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
    keeps_layout = True
    not_shown = "not shown: it only rescales layer {previous}'s maps"

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
    keeps_layout = True
    not_shown = "not shown: dropout does nothing at inference (its output is layer {previous}'s)"

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
    classes_key = "out_features"

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

    def summary_formula(self, info: LayerInfo) -> str:
        # flat layers have no size formula; show how the vector changes instead
        return info.formula or f"{info.in_shape[0]} → {info.out_shape[0]}"

    def describe(self, p: dict[str, Any]) -> str:
        return f"linear → {p['out_features']}"


class _Activation(LayerType):
    shows_maps = keeps_layout = True
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
    needs_maps = shows_maps = extracts_features = has_shortcut = True

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
        # an inner block has already checked its own body
        if len(child.in_shape) == 3 and len(child.out_shape) == 3 and not child.spec.kind.has_shortcut:
            own = child.spec.params.get("stride", (1, 1))
            expected = tuple(conv_output_size(n, 1, own[a]) for a, n in enumerate(child.in_shape[1:]))
            if child.out_shape[1:] != expected:
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



class Scale(nn.Module):
    """Multiply by a constant: e.g. airbench's logits × 1/9, a temperature trained with the model."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


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

