"""`cnnlab show ...`: pictures of what a CNN does, as PNG files.

- `samples`: a labelled grid of dataset images;
- `convolve`: one filter applied to one image, step by step (input, kernel, feature map, ReLU,
  pooling; for colour input the three per-channel products and their sum);
- `filters`: a trained model's learned kernels; `feature-maps`: every conv/activation/pool
  output for one image;
- `curves`, `confusion`, `mistakes`: how training went and where the model is wrong.

Every picture is built by a function returning a matplotlib `Figure` (no pyplot global state),
so `cnnlab report` embeds the very same pictures. Sizes are fixed by `figsize` × `dpi` (no
tight bounding box), which keeps the PNG size predictable.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from .errors import CnnlabError

DESCRIPTION = ("Pictures of what a CNN does, written as PNG files: samples, convolve, filters, feature-maps, "
               "curves, confusion, mistakes. Example: cnnlab show convolve --filter sobel-x")

DPI = 100

# Named 3x3 kernels from image processing; PyTorch's conv2d is a cross-correlation, so
# sobel-x is positive where the image gets brighter to the right: it lights up vertical edges.
FILTERS: dict[str, list[list[float]]] = {
    "edge": [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
    "laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    "sobel-x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "sobel-y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    "prewitt-x": [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]],
    "prewitt-y": [[-1, -1, -1], [0, 0, 0], [1, 1, 1]],
    "horizontal-lines": [[-1, -1, -1], [2, 2, 2], [-1, -1, -1]],
    "vertical-lines": [[-1, 2, -1], [-1, 2, -1], [-1, 2, -1]],
    "blur": [[1 / 9] * 3] * 3,
    "gaussian": [[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16], [1 / 16, 2 / 16, 1 / 16]],
    "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
    "emboss": [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]],
    "identity": [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
}
FILTERS["outline"] = FILTERS["edge"]


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    except OSError as exc:
        raise CnnlabError(f"--out {path}: cannot write ({exc.strerror or exc})") from None
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
# Runs: model, metadata, data and test logits, loaded once
# ---------------------------------------------------------------------------------------------

@dataclass
class RunContext:
    """A trained run opened for pictures and reports; the test data and logits load on first use."""

    path: Path
    bundle: Any                    # checkpoint.ModelBundle
    dataset: str | None = None
    data_root: str | None = None
    _data: Any = None
    _logits: torch.Tensor | None = None
    _history: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    @property
    def meta(self) -> dict[str, Any]:
        return self.bundle.meta

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def name(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def run_dir(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def preprocessing(self):
        return self.bundle.preprocessing

    def data(self):
        """The run's dataset (test split used), as `evaluate` loads it."""
        if self._data is None:
            self._data = self.bundle.load_test_data(self.dataset, self.data_root)
        return self._data

    def test_logits(self) -> torch.Tensor:
        """Logits (N, classes) of the whole test split, with the model's own evaluation settings."""
        if self._logits is None:
            self._logits = self.bundle.test_logits(self.data().test.images)
        return self._logits

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics from metrics.jsonl (empty if the run has none)."""
        if self._history is None:
            self._history = read_history(self.run_dir)
        return self._history


def open_run(path: str | Path, dataset: str | None = None, data_root: str | None = None, data=None) -> RunContext:
    """Load a run folder (or a model file) for pictures; `data` may be given directly (tests, report)."""
    from .checkpoint import load_model

    return RunContext(Path(path).expanduser(), load_model(path), dataset, data_root, _data=data)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl as a list of per-epoch dicts; damaged lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    history = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line must not hide the rest of the history
        if isinstance(item, dict) and "epoch" in item:
            history.append(item)
    return history


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


def _seeded_indices(n: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:count]


# ---------------------------------------------------------------------------------------------
# convolve
# ---------------------------------------------------------------------------------------------

def parse_kernel(text: str) -> tuple[str, np.ndarray]:
    """A named filter (`sobel-x`) or numbers (`1,0,-1; 2,0,-2; 1,0,-1` or `[[1,0,-1],[2,0,-2],[1,0,-1]]`)
    -> (display name, 2-D float array)."""
    name = text.strip().lower()
    if name in FILTERS:
        return name, np.array(FILTERS[name], dtype=np.float32)
    if not any(ch.isdigit() for ch in name):
        raise CnnlabError(f"--filter {text!r}: unknown filter name (known: {', '.join(sorted(FILTERS))}) "
                          "and not a list of numbers like '1,0,-1; 2,0,-2; 1,0,-1'")
    try:
        if name.startswith("["):
            rows = json.loads(name)
            if rows and not isinstance(rows[0], list):
                rows = [rows]
        else:
            rows = [[float(v) for v in row.replace(",", " ").split()] for row in name.replace("/", ";").split(";") if row.strip()]
        if not isinstance(rows, list) or len({len(row) if isinstance(row, list) else -1 for row in rows}) > 1:
            raise CnnlabError(f"--filter {text!r}: every row needs the same number of values")
        array = np.array(rows, dtype=np.float32)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise CnnlabError(f"--filter {text!r}: expected numbers, rows separated by ';' (e.g. '1,0,-1; 2,0,-2; 1,0,-1')") from None
    if array.ndim != 2 or array.size == 0:
        raise CnnlabError(f"--filter {text!r}: every row needs the same number of values")
    if max(array.shape) > 31:
        raise CnnlabError(f"--filter {text!r}: a kernel of {array.shape[0]}x{array.shape[1]} is too large (at most 31x31)")
    if not np.isfinite(array).all():
        raise CnnlabError(f"--filter {text!r}: the numbers must be finite")
    return "custom", array


@dataclass
class Convolution:
    """Every stage of one convolution demo, as arrays, with the formulas that size them."""

    image: np.ndarray                 # (C, H, W) in 0..1
    kernels: list[np.ndarray]         # one (kh, kw) kernel per input channel
    products: np.ndarray              # (C, H', W'): channel c convolved with kernel c
    feature_map: np.ndarray           # (H', W'): their sum
    relu: np.ndarray
    pooled: np.ndarray | None
    conv_formula: str
    pool_formula: str
    description: str
    warnings: list[str] = field(default_factory=list)


def convolve(image: np.ndarray, kernels: list[np.ndarray], stride: int = 1, padding: int | str = 0,
             padding_mode: str = "zeros", dilation: int = 1, pool: str = "max", pool_size: int = 2) -> Convolution:
    """Run the demo through PyTorch's own Conv2d/pooling so the picture shows exactly what a layer does.

    The sizes are traced by `layers.trace` first, so impossible settings fail with the same
    one-line messages a model spec would get.
    """
    from .layers import parse_layers, trace

    channels, height, width = image.shape
    if len(kernels) == 1:
        kernels = kernels * channels
    if len(kernels) != channels:
        raise CnnlabError(f"--filter given {len(kernels)} times for an image with {channels} channel(s): "
                          f"give one filter, or one per channel")
    shapes = {k.shape for k in kernels}
    if len(shapes) != 1:
        raise CnnlabError(f"--filter: the per-channel kernels differ in size ({', '.join(f'{a}x{b}' for a, b in sorted(shapes))})")
    kh, kw = kernels[0].shape
    conv_raw = {"type": "conv", "out_channels": 1, "kernel_size": [kh, kw], "stride": stride, "padding": padding,
                "padding_mode": padding_mode, "dilation": dilation, "bias": False}
    raw = [conv_raw, "relu"]
    if pool != "none":
        raw.append({"type": f"{pool}pool", "kernel_size": pool_size})
    spec = parse_layers(raw + ["flatten", {"type": "linear", "out_features": 1}])
    infos = trace(spec, (channels, height, width))

    conv = torch.nn.Conv2d(1, 1, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                           padding_mode=padding_mode, bias=False)
    x = torch.from_numpy(image.astype(np.float32))
    products = []
    with torch.no_grad():
        for c in range(channels):
            conv.weight.copy_(torch.from_numpy(kernels[c]).view(1, 1, kh, kw))
            products.append(conv(x[c].view(1, 1, height, width))[0, 0])
        feature = torch.stack(products).sum(0)  # the multi-channel conv: per-channel products summed
        relu = F.relu(feature)
        pooled = None
        if pool != "none":
            module = torch.nn.MaxPool2d(pool_size) if pool == "max" else torch.nn.AvgPool2d(pool_size)
            pooled = module(relu[None, None])[0, 0].numpy()
    if tuple(feature.shape) != infos[0].out_shape[1:]:  # the trace and PyTorch must agree
        raise RuntimeError(f"traced {infos[0].out_shape[1:]} but Conv2d gave {tuple(feature.shape)}")
    return Convolution(image, kernels, torch.stack(products).numpy(), feature.numpy(), relu.numpy(), pooled,
                       infos[0].formula, infos[2].formula if pool != "none" else "",
                       infos[0].spec.describe().replace("conv ", "", 1),
                       # trace warns once per axis; a square image would say everything twice
                       list(dict.fromkeys(f"{'convolution' if n == 0 else 'pooling'}: {text}"
                                          for n, info in enumerate(infos) for text in info.warnings)))


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


def mnist_test_digit(index: int, root: str | None = None) -> tuple[np.ndarray, int]:
    """One MNIST test digit (1, 28, 28) in 0..1 and its label, read straight from the IDX files
    (no need to decode all 70,000 images for one picture)."""
    from .data.mnist import data_root

    raw = data_root(root) / "MNIST" / "raw"

    def read(name: str) -> bytes:
        for path, opener in ((raw / name, open), (raw / f"{name}.gz", gzip.open)):
            if path.exists():
                with opener(path, "rb") as f:
                    return f.read()
        raise CnnlabError(f"MNIST not found in {raw} (no {name}); pass --data-root, set CNNLAB_DATA, or use --image FILE")

    images, labels = read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte")
    count = struct.unpack(">I", images[4:8])[0]
    if not 0 <= index < count:
        raise CnnlabError(f"--digit {index}: the MNIST test set has digits 0 to {count - 1}")
    start = 16 + index * 784
    digit = np.frombuffer(images[start:start + 784], dtype=np.uint8).reshape(1, 28, 28)
    return digit.astype(np.float32) / 255.0, int(labels[8 + index])


def load_image_file(path: str | Path, grey: bool = False, max_side: int = 128) -> np.ndarray:
    """An image file -> (C, H, W) in 0..1: one channel if it is grey (or `grey`), else RGB; large
    images are shrunk so that each pixel stays visible in the picture."""
    from PIL import Image, UnidentifiedImageError

    from .data.preprocess import to_mode

    path = Path(path).expanduser()
    if not path.is_file():
        raise CnnlabError(f"--image {path}: no such file")
    try:
        with Image.open(path) as opened:
            rgb = to_mode(opened, 3)
    except (UnidentifiedImageError, OSError) as exc:
        raise CnnlabError(f"--image {path}: not a readable image ({str(exc)[:100]})") from None
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.LANCZOS)
    array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
    if grey or (np.array_equal(array[0], array[1]) and np.array_equal(array[1], array[2])):
        array = (array * np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)).sum(0, keepdims=True)
    return array


# ---------------------------------------------------------------------------------------------
# filters and feature maps of a trained model
# ---------------------------------------------------------------------------------------------

def _spec_modules(model) -> list[torch.nn.Module]:
    # build_model makes one module per spec layer, features first then head: index n is layer n + 1.
    return list(model.features) + list(model.head)


def conv_layers(model) -> list[tuple[int, torch.nn.Conv2d]]:
    """(spec layer number, Conv2d) for every conv layer of a model."""
    return [(n + 1, m) for n, m in enumerate(_spec_modules(model)) if isinstance(m, torch.nn.Conv2d)]


def filters_figure(model, meta: dict[str, Any], layer: int | None = None, max_filters: int = 16, title: str = "") -> Figure:
    """The learned kernels of one conv layer: the first layer's filters as images (RGB for colour
    input); a deeper layer as a grid of output channel (rows) × input channel (columns)."""
    from .layers import parse_layers

    convs = conv_layers(model)
    if not convs:
        raise CnnlabError("this model has no conv layers to show")
    if layer is None:
        number, conv = convs[0]
    else:
        found = dict(convs).get(layer)
        if found is None:
            raise CnnlabError(f"--layer {layer}: not a conv layer (conv layers: {', '.join(str(n) for n, _ in convs)})")
        number, conv = layer, found
    spec = parse_layers(meta["layers"])[number - 1]
    weight = conv.weight.detach().cpu().float().numpy()  # (out, in/groups, kh, kw)
    out_channels, in_channels, kh, kw = weight.shape
    kind = "whitening filters computed from the training images" if spec.params.get("whiten") else "learned filters"
    heading = title or f"layer {number}: {spec.describe()} — {out_channels} {kind} of {in_channels}x{kh}x{kw}"
    if number == convs[0][0] and in_channels in (1, 3):
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


def feature_maps_figure(model, meta: dict[str, Any], image: torch.Tensor, caption: str, max_maps: int = 8) -> Figure:
    """One row per conv/activation/pool layer: its first `max_maps` feature maps for one uint8
    image (C, H, W), each row on its own colour scale with a colour bar."""
    from .data.preprocess import Preprocessing
    from .layers import parse_layers

    prep = Preprocessing.from_dict(meta["preprocessing"])
    x = prep.normalize(image.unsqueeze(0))
    outputs = layer_outputs(model, x)
    probabilities = outputs[-1].softmax(1)[0]
    spec = parse_layers(meta["layers"])
    rows = [(n, layer, outputs[n][0].cpu().numpy()) for n, layer in enumerate(spec)
            if layer.kind.shows_maps and outputs[n].dim() == 4]
    columns = max_maps
    fig = new_figure(1.35 * columns + 2.6, 1.55 * (len(rows) + 1) + 0.8)
    top = int(probabilities.argmax())
    fig.suptitle(f"Feature maps of {caption}: predicted {meta['classes'][top]!s} "
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
        diverging = layer.type == "conv" or float(maps.min()) < 0
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
                ax.set_title(f"layer {n + 1}: {layer.describe()}  →  {'x'.join(map(str, maps.shape))}",
                             fontsize=9, loc="left")
        if shown is not None:
            fig.colorbar(shown, cax=fig.add_subplot(grid[r, columns]))
    return fig


# ---------------------------------------------------------------------------------------------
# curves, confusion, mistakes
# ---------------------------------------------------------------------------------------------

def curves_figure(history: list[dict[str, Any]], title: str) -> Figure:
    """Loss and accuracy per epoch (train and, where evaluated, test)."""
    if not history:
        raise CnnlabError("this run has no training history (metrics.jsonl is missing or empty)")
    fig = new_figure(11, 4.2)
    fig.suptitle(title, fontsize=12)
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    for key, label, style in (("train", "train (mean over the epoch)", "o-"), ("test", "test (end of epoch)", "s--")):
        points = [(m["epoch"], m[f"{key}_loss"]) for m in history if f"{key}_loss" in m]
        if points:
            loss_ax.plot(*zip(*points), style, label=label)
        points = [(m["epoch"], 100 * m[f"{key}_accuracy"]) for m in history if f"{key}_accuracy" in m]
        if points:
            accuracy_ax.plot(*zip(*points), style, label=label)
            last = points[-1]
            accuracy_ax.annotate(f"{last[1]:.2f}%", last, textcoords="offset points", xytext=(5, 5), fontsize=8)
    epochs = [m["epoch"] for m in history]
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


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

PICTURES = {
    "samples": "a labelled grid of dataset images",
    "convolve": "apply a filter to an image: input, kernel, feature map, ReLU, pooling (RGB: per-channel products)",
    "filters": "a trained model's learned conv filters",
    "feature-maps": "every conv/activation/pool layer's maps for one image through a trained model",
    "curves": "loss and accuracy per epoch of a run",
    "confusion": "the confusion matrix of a run on its test split, as a heatmap",
    "mistakes": "the test images a run's model gets most confidently wrong",
}


def _padding(text: str) -> int | str:
    if text in ("same", "valid"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, 'same' or 'valid', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="picture", metavar="PICTURE", required=True)
    parsers = {name: sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
               for name, text in PICTURES.items()}
    for name, p in parsers.items():
        p.add_argument("--out", metavar="FILE.png", default=f"{name}.png", help=f"output PNG (default: {name}.png)")
        p.add_argument("--dpi", type=_positive, default=DPI, help=f"pixels per inch (default {DPI})")
        p.add_argument("--data-root", help="folder holding MNIST/raw (default: $CNNLAB_DATA, else ~/.cache/cnnlab)")
        if name not in ("samples", "convolve"):
            p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or model .safetensors file)")
        if name in ("confusion", "mistakes", "feature-maps"):
            p.add_argument("--dataset", help="evaluate on this dataset instead of the run's own (same classes)")

    p = parsers["samples"]
    p.add_argument("--dataset", default="mnist", help="mnist, or folder:PATH (one sub-folder of images per class)")
    p.add_argument("--image-size", type=_positive, help="folder datasets: side length (default 32)")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--count", type=_positive, default=32, help="how many images (default 32)")
    p.add_argument("--columns", type=_positive, default=8)
    p.add_argument("--seed", type=int, default=0, help="which random images (default 0)")

    p = parsers["convolve"]
    source = p.add_mutually_exclusive_group()
    source.add_argument("--image", metavar="FILE", help="any image file (default: an MNIST test digit)")
    source.add_argument("--digit", type=int, default=4, metavar="INDEX", help="MNIST test image number (default 4, a four)")
    p.add_argument("--filter", action="append", metavar="NAME|NUMBERS",
                   help=f"a named filter ({', '.join(sorted(FILTERS))}) or numbers like '1,0,-1; 2,0,-2; 1,0,-1'; "
                        "for colour images give it once, or three times (red, green, blue). Numbers that start with a minus "
                        "need an equals sign: --filter='-1,0,1; -2,0,2; -1,0,1'. Default: sobel-x")
    p.add_argument("--stride", type=_positive, default=1)
    p.add_argument("--padding", type=_padding, default=1, help="a whole number, 'same' or 'valid' (default 1)")
    p.add_argument("--padding-mode", choices=["zeros", "reflect", "replicate", "circular"], default="zeros")
    p.add_argument("--dilation", type=_positive, default=1)
    p.add_argument("--pool", choices=["max", "avg", "none"], default="max", help="pooling after ReLU (default max)")
    p.add_argument("--pool-size", type=_positive, default=2)
    p.add_argument("--grey", action="store_true", help="convert a colour --image to grey first")

    parsers["filters"].add_argument("--layer", type=int, metavar="N",
                                    help="the conv layer's number in `cnnlab summary` (default: the first conv)")
    p = parsers["feature-maps"]
    p.add_argument("--image", metavar="FILE", help="an image file, preprocessed like `predict` does (default: a test image)")
    p.add_argument("--index", type=int, default=0, help="test image number when no --image is given (default 0)")
    p.add_argument("--maps", type=_positive, default=8, help="feature maps shown per layer (default 8)")
    parsers["confusion"].add_argument("--normalize", action="store_true", help="show each row as percentages")
    parsers["mistakes"].add_argument("--count", type=_positive, default=24, help="how many mistakes (default 24)")


def run(args: argparse.Namespace) -> int:
    fig = build_picture(args)
    width, height = save_figure(fig, args.out, args.dpi)
    print(f"wrote {args.out} ({width}x{height} pixels)")
    return 0


def build_picture(args: argparse.Namespace) -> Figure:
    """The Figure that `cnnlab show PICTURE ...` writes."""
    if args.picture == "samples":
        return _samples_from_args(args)
    if args.picture == "convolve":
        return _convolve_from_args(args)
    context = open_run(args.run_dir, getattr(args, "dataset", None), args.data_root)
    if args.picture == "filters":
        return filters_figure(context.model, context.meta, args.layer)
    if args.picture == "feature-maps":
        return _feature_maps_from_args(context, args)
    if args.picture == "curves":
        return curves_figure(context.history(), f"Training curves of {context.name}")
    if args.picture == "confusion":
        from .evaluate import compute_metrics

        metrics = compute_metrics(context.test_logits(), context.data().test.labels, context.classes)
        return confusion_figure(metrics["confusion"], context.classes, _confusion_title(context.name, metrics),
                                args.normalize)
    data = context.data()
    return mistakes_figure(data.test.images, data.test.labels, context.test_logits(), context.classes,
                           f"Most confident mistakes of {context.name}", args.count)


def _confusion_title(name: str, metrics: dict[str, Any]) -> str:
    return (f"Confusion matrix of {name}\n{metrics['count']:,} test images, accuracy {100 * metrics['accuracy']:.2f}% "
            "(diagonal: correct)")


def _samples_from_args(args: argparse.Namespace) -> Figure:
    from .config import DataConfig
    from .data import load_dataset

    config = DataConfig(dataset=args.dataset, root=args.data_root, image_size=args.image_size)
    data = load_dataset(config, progress=False)
    split = data.train if args.split == "train" else data.test
    if len(split) == 0:
        raise CnnlabError(f"{args.dataset}: the {args.split} split has no images")
    index = _seeded_indices(len(split), min(args.count, len(split)), args.seed)
    return samples_figure(split.images[index], split.labels[index], data.classes,
                          f"{data.name}: {len(index)} random {args.split} images of {len(split):,} "
                          f"({', '.join(data.classes[:10])}{'...' if len(data.classes) > 10 else ''})", args.columns)


def _convolve_from_args(args: argparse.Namespace) -> Figure:
    if args.image:
        image = load_image_file(args.image, args.grey)
        source = Path(args.image).name
    else:
        image, label = mnist_test_digit(args.digit, args.data_root)
        source = f"MNIST test digit #{args.digit} (a {label})"
    parsed = [parse_kernel(text) for text in (args.filter or ["sobel-x"])]
    names = [name if name != "custom" else "custom kernel" for name, _ in parsed]
    result = convolve(image, [kernel for _, kernel in parsed], args.stride, args.padding, args.padding_mode,
                      args.dilation, args.pool, args.pool_size)
    return convolve_figure(result, source, names, args.pool, args.pool_size)


def pick_test_image(context: RunContext, index: int = 0) -> tuple[torch.Tensor, str]:
    """Test image number `index` (uint8 C, H, W) and a caption naming it and its true class."""
    data = context.data()
    if not 0 <= index < len(data.test):
        raise CnnlabError(f"--index {index}: the test split has images 0 to {len(data.test) - 1}")
    return data.test.images[index], f"test image #{index} (true class {context.classes[int(data.test.labels[index])]})"


def _feature_maps_from_args(context: RunContext, args: argparse.Namespace) -> Figure:
    if args.image:
        from PIL import Image, UnidentifiedImageError

        path = Path(args.image).expanduser()
        if not path.is_file():
            raise CnnlabError(f"--image {path}: no such file")
        try:
            with Image.open(path) as opened:
                image = context.preprocessing().image_to_uint8(opened)
        except (UnidentifiedImageError, OSError) as exc:
            raise CnnlabError(f"--image {path}: not a readable image ({str(exc)[:100]})") from None
        caption = path.name
    else:
        image, caption = pick_test_image(context, args.index)
    return feature_maps_figure(context.model, context.meta, image, caption, args.maps)
