"""The pictures themselves: functions that take arrays, tensors or a model and return a matplotlib
`Figure` (no pyplot global state, no files read), so `cnnlab show` and `cnnlab report` draw the
very same pictures. Sizes are fixed by `figsize` × `dpi` (no tight bounding box), which keeps the
PNG size predictable.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import CnnlabError

if TYPE_CHECKING:
    from ..runs import Run
    from ..layers import LayerInfo
    from .convolution import Convolution

DPI = 100


# ---------------------------------------------------------------------------------------------
# Small helpers shared by every picture
# ---------------------------------------------------------------------------------------------

def new_figure(width: float, height: float) -> Figure:
    """A figure of a fixed size in inches with constrained layout (titles and colour bars never overlap)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> tuple[int, int]:
    """Write `fig` as a PNG; returns its (width, height) in pixels."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise CnnlabError(f"--out {path}: pictures are written as PNG; use a .png file name")
    from ..files import atomic_write_bytes, write_error

    data = figure_png(fig, dpi)  # drawn in memory: a full disk must not leave a 0-byte PNG behind
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise write_error(path, exc, "--out") from None
    return round(fig.get_figwidth() * dpi), round(fig.get_figheight() * dpi)


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (for the HTML report)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    return buffer.getvalue()


def _show_image(ax, image: np.ndarray, title: str = "", **kwargs) -> Any:
    """Show a (C, H, W) image in 0..1 (grey or RGB) without ticks."""
    if image.shape[0] == 1:
        shown = ax.imshow(image[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest", **kwargs)
    else:
        shown = ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1), interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return shown


def _plain_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _symmetric_limit(values: np.ndarray) -> float:
    limit = float(np.abs(values).max()) if values.size else 1.0
    return limit if limit > 0 else 1.0


def _uint8_to_unit(images: torch.Tensor) -> np.ndarray:
    return images.detach().cpu().float().numpy() / 255.0


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------

def samples_figure(images: torch.Tensor, labels: torch.Tensor, classes: list[str], title: str,
                   columns: int = 8) -> Figure:
    """A grid of uint8 images (N, C, H, W), each titled with its class name."""
    n = images.shape[0]
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    fig = new_figure(1.3 * columns + 0.4, 1.45 * rows + 0.6)
    fig.suptitle(title, fontsize=12)
    axes = fig.subplots(rows, columns, squeeze=False)
    pictures = _uint8_to_unit(images)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show_image(ax, pictures[i], classes[int(labels[i])])
        else:
            ax.axis("off")
    return fig


# ---------------------------------------------------------------------------------------------
# convolve: the stages of one convolution
# ---------------------------------------------------------------------------------------------

def _kernel_axes(fig, ax, kernel: np.ndarray, title: str) -> None:
    limit = _symmetric_limit(kernel)
    shown = ax.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    _plain_axes(ax)
    ax.set_title(title, fontsize=9)
    if kernel.size <= 49:  # numbers stay legible up to 7x7
        for (r, c), value in np.ndenumerate(kernel):
            text = f"{value:.2g}" if value != int(value) else f"{int(value)}"
            ax.text(c, r, text, ha="center", va="center", fontsize=9,
                    color="white" if abs(value) > 0.6 * limit else "black")
    fig.colorbar(shown, ax=ax, shrink=0.8)


def _map_axes(fig, ax, values: np.ndarray, title: str, diverging: bool) -> None:
    if diverging:
        limit = _symmetric_limit(values)
        shown = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    else:
        shown = ax.imshow(values, cmap="magma", vmin=0, vmax=max(float(values.max()), 1e-6), interpolation="nearest")
    _plain_axes(ax)
    ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, shrink=0.8)


def convolve_figure(result: Convolution, source: str, filter_names: list[str], pool: str = "max",
                    pool_size: int = 2) -> Figure:
    """Input, kernel, feature map, after ReLU, after pooling; for RGB also each channel's product."""
    channels, height, width = result.image.shape
    oh, ow = result.feature_map.shape
    filters = " + ".join(dict.fromkeys(filter_names)) if len(set(filter_names)) > 1 else filter_names[0]
    title = f"{source} convolved with {filters} ({result.description})"
    feature_title = f"feature map {oh}x{ow}\n{result.conv_formula}"
    pool_title = (f"after {pool} pooling {pool_size}x{pool_size}\n{result.pool_formula}" if result.pooled is not None else "")
    footer = "; ".join(result.warnings)
    if channels == 1:
        columns = 5 if result.pooled is not None else 4
        fig = new_figure(3.3 * columns, 3.9)
        fig.suptitle(title, fontsize=12)
        axes = fig.subplots(1, columns)
        _show_image(axes[0], result.image, f"input {height}x{width}")
        _kernel_axes(fig, axes[1], result.kernels[0], f"kernel {result.kernels[0].shape[0]}x{result.kernels[0].shape[1]}")
        _map_axes(fig, axes[2], result.feature_map, feature_title, diverging=True)
        _map_axes(fig, axes[3], result.relu, "after ReLU: max(0, x)", diverging=False)
        if result.pooled is not None:
            _map_axes(fig, axes[4], result.pooled, pool_title, diverging=False)
        if footer:  # e.g. stride 2 on 28 pixels: the last column never gets a window
            fig.supxlabel(f"note: {footer}", fontsize=9, color="#9a6700")
        return fig

    # Colour: the tutorial's multi-channel diagram. One row per channel (channel, its kernel,
    # their product), then the sum of the three products, ReLU and pooling.
    fig = new_figure(14.5, 13.5)
    fig.suptitle(title, fontsize=12)
    grid = fig.add_gridspec(4, 4)
    limit = _symmetric_limit(result.products)
    names = ("red", "green", "blue")
    maps = ("Reds", "Greens", "Blues")
    for c in range(3):
        ax = fig.add_subplot(grid[c, 0])
        shown = ax.imshow(result.image[c], cmap=maps[c], vmin=0, vmax=1, interpolation="nearest")
        _plain_axes(ax)
        ax.set_title(f"{names[c]} channel {height}x{width}", fontsize=9)
        fig.colorbar(shown, ax=ax, shrink=0.8)
        _kernel_axes(fig, fig.add_subplot(grid[c, 1]), result.kernels[c], f"kernel for {names[c]} ({filter_names[min(c, len(filter_names) - 1)]})")
        ax = fig.add_subplot(grid[c, 2])
        shown = ax.imshow(result.products[c], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        _plain_axes(ax)
        ax.set_title(f"{names[c]} ∗ kernel ({oh}x{ow})", fontsize=9)
        fig.colorbar(shown, ax=ax, shrink=0.8)
    note = fig.add_subplot(grid[0:3, 3])
    note.axis("off")
    note.text(0.02, 0.5, "A conv filter over a colour image\nhas one kernel slice per channel.\n\n"
              "Each channel is convolved with\nits own slice (rows on the left);\nthe feature map is the sum of\n"
              "the three products (+ bias),\nthen ReLU and pooling (below).\n\n"
              f"output size per axis:\n{result.conv_formula}", fontsize=10, va="center", ha="left", wrap=True)
    _show_image(fig.add_subplot(grid[3, 0]), result.image, f"input (RGB) {height}x{width}")
    _map_axes(fig, fig.add_subplot(grid[3, 1]), result.feature_map, f"sum of the 3 products {oh}x{ow}", diverging=True)
    _map_axes(fig, fig.add_subplot(grid[3, 2]), result.relu, "after ReLU: max(0, x)", diverging=False)
    if result.pooled is not None:
        _map_axes(fig, fig.add_subplot(grid[3, 3]), result.pooled, pool_title, diverging=False)
    if footer:
        fig.supxlabel(f"note: {footer}", fontsize=9, color="#9a6700")
    return fig


# ---------------------------------------------------------------------------------------------
# filters and feature maps of a trained model
# ---------------------------------------------------------------------------------------------

def _spec_modules(model) -> list[torch.nn.Module]:
    # build_model makes one module per top-level spec layer, features first then head: index n is layer n + 1.
    return list(model.features) + list(model.head)


def conv_layers(bundle: "Run") -> list[tuple[str, torch.nn.Conv2d, "LayerInfo"]]:
    """(layer path, Conv2d, traced layer) for every layer with filters, blocks' inner convs included
    (`4.1`); a block's 1x1 shortcut projections are left out."""
    from ..layers import layer_modules

    return [(info.path, module, info) for info, module in layer_modules(bundle.model, bundle.infos())
            if info.spec.kind.has_filters and ".shortcut." not in info.path]


def filters_figure(bundle: "Run", layer: str | int | None = None, max_filters: int = 16,
                   title: str = "") -> Figure:
    """The learned kernels of one conv layer (`layer`: its number, or `4.1` inside a block): the first
    layer's filters as images (RGB for colour input); a deeper layer as a grid of output channel (rows)
    × input channel (columns)."""
    convs = conv_layers(bundle)
    if not convs:
        raise CnnlabError("this model has no conv layers to show")
    if layer is None:
        number, conv, info = convs[0]
    else:
        found = {path: (conv, info) for path, conv, info in convs}.get(str(layer))
        if found is None:
            raise CnnlabError(f"--layer {layer}: not a conv layer (conv layers: {', '.join(p for p, _, _ in convs)})")
        number, (conv, info) = str(layer), found
    spec = info.spec
    weight = conv.weight.detach().cpu().float().numpy()  # (out, in/groups, kh, kw)
    out_channels, in_channels, kh, kw = weight.shape
    kind = "whitening filters computed from the training images" if spec.params.get("whiten") else "learned filters"
    heading = title or f"layer {number}: {spec.describe()} — {out_channels} {kind} of {in_channels}x{kh}x{kw}"
    if number == "1" and in_channels in (1, 3):
        count = min(out_channels, 64)
        columns = min(8, count)
        rows = math.ceil(count / columns)
        fig = new_figure(1.45 * columns + (1.4 if in_channels == 1 else 0.4), 1.55 * rows + 0.9)
        fig.suptitle(heading + ("\n(blue: negative weights, red: positive; one shared scale)" if in_channels == 1 else
                                "\n(each filter's weights stretched to 0..1 and shown as colour)"), fontsize=11)
        axes = fig.subplots(rows, columns, squeeze=False)
        limit = _symmetric_limit(weight[:count])
        shown = None
        for i, ax in enumerate(axes.flat):
            if i >= count:
                ax.axis("off")
                continue
            if in_channels == 1:
                shown = ax.imshow(weight[i, 0], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            else:
                w = weight[i].transpose(1, 2, 0)
                w = (w - w.min()) / max(float(w.max() - w.min()), 1e-8)
                ax.imshow(w, interpolation="nearest")
            _plain_axes(ax)
            ax.set_title(f"filter {i}", fontsize=8)
        if shown is not None:
            fig.colorbar(shown, ax=axes, shrink=0.8, label="weight")
        return fig

    rows, columns = min(out_channels, max_filters), min(in_channels, max_filters)
    fig = new_figure(0.8 * columns + 2.0, 0.8 * rows + 1.2)
    shown_part = f" (first {rows} of {out_channels} × first {columns} of {in_channels})" if (rows, columns) != (out_channels, in_channels) else ""
    fig.suptitle(f"{heading}\nrow: output channel, column: input channel{shown_part}; blue negative, red positive", fontsize=10)
    axes = fig.subplots(rows, columns, squeeze=False)
    limit = _symmetric_limit(weight[:rows, :columns])
    shown = None
    for r in range(rows):
        for c in range(columns):
            ax = axes[r, c]
            shown = ax.imshow(weight[r, c], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            _plain_axes(ax)
            if c == 0:
                ax.set_ylabel(str(r), fontsize=7, rotation=0, labelpad=8)
            if r == 0:
                ax.set_title(str(c), fontsize=7)
    fig.colorbar(shown, ax=axes, shrink=0.6, label="weight")
    return fig


@torch.no_grad()
def layer_outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every spec layer's output for the batch `x` (hooks on each layer's module)."""
    outputs: list[torch.Tensor] = []
    modules = _spec_modules(model)
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.append(o.detach())) for m in modules]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return outputs


def feature_maps_figure(bundle: "Run", image: torch.Tensor, caption: str, max_maps: int = 8) -> Figure:
    """One row per layer whose type shows maps (conv, activation, pool, residual block): its first
    `max_maps` feature maps for one uint8 image (C, H, W), each row on its own colour scale."""
    x = bundle.preprocessing.normalize(image.unsqueeze(0))
    outputs = layer_outputs(bundle.model, x)
    probabilities = outputs[-1].softmax(1)[0]
    rows = [(n, info.spec, outputs[n][0].cpu().numpy()) for n, info in enumerate(bundle.infos())
            if info.spec.kind.shows_maps and outputs[n].dim() == 4]
    columns = max_maps
    fig = new_figure(1.35 * columns + 2.6, 1.55 * (len(rows) + 1) + 0.8)
    top = int(probabilities.argmax())
    fig.suptitle(f"Feature maps of {caption}: predicted {bundle.classes[top]!s} "
                 f"({100 * float(probabilities[top]):.1f}%)", fontsize=12)
    # A manual grid: constrained layout widens the first column to fit each row's long label.
    fig.set_layout_engine("none")
    height = fig.get_figheight()
    grid = fig.add_gridspec(len(rows) + 1, columns + 1, width_ratios=[1.0] * columns + [0.12], left=0.02, right=0.95,
                            bottom=0.02, top=1 - 0.75 / height, hspace=0.38, wspace=0.08)
    ax = fig.add_subplot(grid[0, 0])
    _show_image(ax, _uint8_to_unit(image), "input")
    ax = fig.add_subplot(grid[0, 1:columns])
    ax.axis("off")
    ax.text(0.0, 0.5, "Each row: one layer's output channels (feature maps) for this image, left to right.\n"
            "conv rows: blue negative, red positive. After ReLU/pooling: dark = 0, bright = strong response.\n"
            "Pooling halves the size; deeper layers respond to larger, more abstract shapes.",
            fontsize=9, va="center")
    for r, (n, layer, maps) in enumerate(rows, start=1):
        diverging = layer.kind.has_filters or float(maps.min()) < 0  # conv outputs are signed
        shown_count = min(columns, maps.shape[0])
        limit = _symmetric_limit(maps[:shown_count])
        low = -limit if diverging else 0.0
        high = limit if diverging else max(float(maps[:shown_count].max()), 1e-6)
        shown = None
        for c in range(columns):
            ax = fig.add_subplot(grid[r, c])
            _plain_axes(ax)
            if c >= shown_count:
                ax.axis("off")
                continue
            shown = ax.imshow(maps[c], cmap="RdBu_r" if diverging else "magma", vmin=low, vmax=high,
                              interpolation="nearest")
            if c == 0:
                which = (f"all {maps.shape[0]} maps" if shown_count == maps.shape[0]
                         else f"{shown_count} of {maps.shape[0]} maps")
                ax.set_title(f"layer {n + 1}: {layer.describe()}  →  {'x'.join(map(str, maps.shape))}  ({which})",
                             fontsize=9, loc="left")
        if shown is not None:
            fig.colorbar(shown, cax=fig.add_subplot(grid[r, columns]))
    return fig


# ---------------------------------------------------------------------------------------------
# curves, confusion, mistakes
# ---------------------------------------------------------------------------------------------

def curves_figure(history: list[dict[str, Any]], title: str) -> Figure:
    """Loss and accuracy per epoch (train, validation where there is a validation split, and test where
    evaluated: with a validation split that is the kept epoch's model, once, at the end), the kept epoch marked."""
    if not history:
        raise CnnlabError("this run has no training history (metrics.jsonl is missing or empty)")
    fig = new_figure(11, 4.2)
    fig.suptitle(title, fontsize=12)
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    best = history[-1].get("best_epoch")
    test_label = f"test (the model of epoch {best}, at the end)" if best else "test (end of epoch)"
    for key, label, style in (("train", "train (mean over the epoch)", "o-"), ("val", "validation (end of epoch)", "^-"),
                              ("test", test_label, "s--")):
        points = [(m["epoch"], m[f"{key}_loss"]) for m in history if f"{key}_loss" in m]
        if points:
            loss_ax.plot(*zip(*points), style, label=label)
        points = [(m["epoch"], 100 * m[f"{key}_accuracy"]) for m in history if f"{key}_accuracy" in m]
        if points:
            accuracy_ax.plot(*zip(*points), style, label=label)
            last = points[-1]
            accuracy_ax.annotate(f"{last[1]:.2f}%", last, textcoords="offset points", xytext=(5, 5), fontsize=8)
    epochs = [m["epoch"] for m in history]
    if best:
        for ax in (loss_ax, accuracy_ax):
            ax.axvline(best, color="grey", linestyle=":", linewidth=1, label=f"kept: epoch {best} (best validation)")
    for ax, ylabel in ((loss_ax, "cross-entropy loss"), (accuracy_ax, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        if len(epochs) <= 20:
            ax.set_xticks(sorted(set(epochs)))
        if len(set(epochs)) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    loss_ax.set_title("loss per epoch (lower is better)", fontsize=10)
    accuracy_ax.set_title("accuracy per epoch (higher is better)", fontsize=10)
    return fig


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str, normalize: bool = False) -> Figure:
    """The confusion matrix as a heatmap: rows are true classes, columns predicted ones."""
    matrix = np.array(confusion, dtype=np.float64)
    n = len(classes)
    shown_values = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) * 100 if normalize else matrix
    side = min(max(5.0, 0.55 * n + 2.5), 16.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(shown_values, cmap="Blues", interpolation="nearest")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ticks = np.arange(n)
    if n <= 40:
        ax.set_xticks(ticks, [c[:14] for c in classes], rotation=45 if max(len(c) for c in classes) > 2 else 0,
                      ha="right" if max(len(c) for c in classes) > 2 else "center", fontsize=9)
        ax.set_yticks(ticks, [c[:14] for c in classes], fontsize=9)
    if n <= 25:
        high = shown_values.max() if shown_values.size else 1
        for (r, c), value in np.ndenumerate(shown_values):
            if matrix[r, c] == 0:
                continue
            ax.text(c, r, f"{value:.0f}" if not normalize else f"{value:.1f}", ha="center", va="center",
                    fontsize=8 if n > 12 else 9, color="white" if value > 0.5 * high else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the true class" if normalize else "test images")
    return fig


def confusion_title(name: str, metrics: dict[str, Any]) -> str:
    """The confusion matrix's title: the run, the number of test images and the accuracy."""
    return (f"Confusion matrix of {name}\n{metrics['count']:,} test images, accuracy {100 * metrics['accuracy']:.2f}% "
            "(diagonal: correct)")


def mistakes_figure(images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: list[str],
                    title: str, count: int = 16, columns: int = 8) -> Figure:
    """The test images the model gets most confidently wrong, with true and predicted labels."""
    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:count]
    n = len(order)
    if n == 0:
        fig = new_figure(6, 2)
        fig.suptitle(title, fontsize=12)
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"no mistakes on these {labels.shape[0]:,} test images", ha="center", va="center", fontsize=12)
        return fig
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = new_figure(1.55 * columns + 0.4, 1.8 * rows + 0.8)
    fig.suptitle(f"{title}\n{len(wrong):,} of {labels.shape[0]:,} test images misclassified; "
                 f"the {n} most confident mistakes", fontsize=11)
    axes = fig.subplots(rows, columns, squeeze=False)
    pictures = _uint8_to_unit(images[order])
    for slot, ax in enumerate(axes.flat):
        if slot >= n:
            ax.axis("off")
            continue
        i = int(order[slot])
        _show_image(ax, pictures[slot])
        ax.set_title(f"true {classes[int(labels[i])][:10]}\npred {classes[int(predicted[i])][:10]} "
                     f"{100 * float(confidence[i]):.0f}%", fontsize=8, color="firebrick")
    return fig


def pick_test_image(context: "Run", index: int = 0) -> tuple[torch.Tensor, str]:
    """Test image number `index` (uint8 C, H, W) and a caption naming it and its true class."""
    data = context.data()
    if not 0 <= index < len(data.test):
        raise CnnlabError(f"--index {index}: the test split has images 0 to {len(data.test) - 1}")
    return data.test.images[index], f"test image #{index} (true class {context.classes[int(data.test.labels[index])]})"

