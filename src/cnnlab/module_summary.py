"""`cnnlab.summary(module, input_shape)`: the table for an `nn.Module` written by hand, by forward hooks.

A cnnlab layer spec is traced arithmetically (`layers.trace`) and then checked by a forward pass.
A module someone wrote in PyTorch has no spec, so here the forward pass is the source: one zero
image goes through it and a hook on every leaf module (one without children) records its input
and output shapes, in the order they run. Parameters come from the modules; multiply-adds from
the shapes (a conv output value costs in_channels/groups·kh·kw of them, a linear output
in_features). Conv2d, MaxPool2d and AvgPool2d rows get the output-size formula from the same code
as `cnnlab summary`: their settings are written as a one-layer spec and traced, and the traced
size must equal the one PyTorch produced.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .formatting import html_lines, html_table, text_table
from .errors import CnnlabError


@dataclass
class ModuleRow:
    """One call of one leaf module."""

    name: str                   # its path in the model, e.g. "features.0"
    layer: str                  # its class and settings, e.g. "Conv2d(1, 16, kernel_size=(5, 5), ...)"
    in_shape: tuple[int, ...]   # one image's input, without the batch dimension
    out_shape: tuple[int, ...]
    formula: str = ""           # the output-size formula with the numbers (conv and pool layers)
    params: int = 0             # counted on a module's first call only
    macs: int = 0


@dataclass
class ModuleSummary:
    """A hand-written module, layer by layer, for one image of `input_shape`."""

    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    rows: list[ModuleRow]
    total_params: int           # every parameter of the module, counted once
    trainable_params: int
    total_macs: int
    notes: list[str] = field(default_factory=list)

    def table_rows(self) -> list[dict[str, str]]:
        """The table as strings, one dict per row, the input first."""
        rows = [{"#": "", "module": "input", "layer": "", "output size formula": "",
                 "output shape": _shape(self.input_shape), "params": "", "MACs": ""}]
        for n, row in enumerate(self.rows, start=1):
            rows.append({"#": str(n), "module": row.name, "layer": _short(row.layer), "output size formula": row.formula,
                         "output shape": _shape(row.out_shape), "params": f"{row.params:,}" if row.params else "",
                         "MACs": f"{row.macs:,}" if row.macs else ""})
        return rows

    def totals_lines(self) -> list[str]:
        """Output shape, parameter and multiply-add totals, as plain lines."""
        frozen = self.total_params - self.trainable_params
        return [f"output shape: {_shape(self.output_shape)}",
                f"parameters: {self.total_params:,}" + (f" ({frozen:,} not trainable)" if frozen else ""),
                f"multiply-adds per image: {self.total_macs:,} (conv and linear layers)",
                "shapes recorded by forward hooks on a zero image; formulas as in `cnnlab summary`",
                *self.notes]

    def heading(self) -> str:
        """The table's title line."""
        return f"{self.name}: input {_shape(self.input_shape)}"

    def __str__(self) -> str:
        return "\n".join([self.heading(), "", text_table(self.table_rows(), right=("params", "MACs")),
                          "", *self.totals_lines()])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return (f"<p><b>{html.escape(self.heading())}</b></p>" + html_table(self.table_rows(), right=("params", "MACs"))
                + html_lines(self.totals_lines()))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


def _short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


@torch.no_grad()
def summarize_module(module: nn.Module, input_shape: tuple[int, ...], name: str | None = None) -> ModuleSummary:
    """Run one zero image of `input_shape` (no batch dimension) through `module` in eval mode and
    tabulate every leaf module's call; raises `CnnlabError` naming the layer that fails."""
    shape = tuple(int(v) for v in input_shape)
    if not shape or min(shape) < 1:
        raise CnnlabError(f"input_shape: expected positive sizes like (1, 28, 28), got {input_shape!r}")
    names = {m: n for n, m in module.named_modules()}
    leaves = [m for m in module.modules() if not list(m.children())]
    calls: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    running: list[nn.Module] = []

    def before(m, inputs):
        running.append(m)

    def after(m, inputs, output):
        x, y = _first_tensor(inputs), _first_tensor(output)
        if x is not None and y is not None:
            calls.append((m, tuple(x.shape[1:]), tuple(y.shape[1:])))

    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    parameter = next(module.parameters(), None)
    x = torch.zeros((1, *shape), device=parameter.device if parameter is not None else "cpu",
                    dtype=parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32)
    was_training = module.training
    module.eval()  # BatchNorm refuses a batch of one image in training mode
    try:
        output = _first_tensor(module(x))
    except Exception as exc:  # the user's module and this input shape do not fit: say where
        where = f"layer {names.get(running[-1], '?')} ({_short(repr(running[-1]), 60)})" if running else "the module"
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CnnlabError(f"{where} fails on an input of {_shape(shape)}: {text}") from None
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)

    rows, counted = [], set()
    for m, in_shape, out_shape in calls:
        params = 0 if m in counted else sum(p.numel() for p in m.parameters())
        counted.add(m)
        rows.append(ModuleRow(names.get(m) or type(m).__name__, repr(m), in_shape, out_shape, _formula(m, in_shape, out_shape),
                              params, _macs(m, out_shape)))
    total = sum(p.numel() for p in module.parameters())
    notes = []
    outside = total - sum(r.params for r in rows)
    if outside:
        notes.append(f"{outside:,} parameters belong to modules that are not leaves or did not run")
    return ModuleSummary(name or type(module).__name__, shape, tuple(output.shape[1:]) if output is not None else (),
                         rows, total, sum(p.numel() for p in module.parameters() if p.requires_grad),
                         sum(r.macs for r in rows), notes)


def _macs(m: nn.Module, out_shape: tuple[int, ...]) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return math.prod(out_shape) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return math.prod(out_shape) * m.in_features
    return 0


def _as_spec(m: nn.Module) -> dict[str, Any] | None:
    """The one-layer spec cnnlab would build `m` from (a Conv2d, MaxPool2d, AvgPool2d: the registered
    types that know their module, `LayerType.spec_from_module`), or None."""
    from .layers import LAYER_TYPES

    return next((spec for kind in LAYER_TYPES.values() if (spec := kind.spec_from_module(m)) is not None), None)


def _formula(m: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    from .layers import parse_layers, trace
    from .summarize import ShapeMismatch

    spec = _as_spec(m)
    if spec is None or len(in_shape) != 3:
        return ""
    try:  # trace wants a whole classifier: end the one layer with flatten and a linear layer
        info = trace(parse_layers([spec, "flatten", {"type": "linear", "out_features": 1}]), in_shape)[0]  # type: ignore[arg-type]
    except CnnlabError:
        return ""  # a setting cnnlab's specs do not offer: the row keeps its hooked shape, without a formula
    if tuple(info.out_shape) != tuple(out_shape):
        raise ShapeMismatch(f"{_short(repr(m), 60)}: the formula gives {info.out_shape} but PyTorch gave {out_shape}")
    return info.formula
