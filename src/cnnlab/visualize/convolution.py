"""The convolution demo of `cnnlab show convolve`: named kernels, kernel parsing, one convolution
run through PyTorch's own layers stage by stage, and the demo's input (an image file or an MNIST
test digit) as a (C, H, W) array in 0..1."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CnnlabError


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
    from ..layers import parse_layers, trace

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



def mnist_test_digit(index: int, root: str | None = None) -> tuple[np.ndarray, int]:
    """One MNIST test digit (1, 28, 28) in 0..1 and its label, from the test split's IDX files
    (no need to load the 60,000 training images for one picture)."""
    from ..data.mnist import data_root, read_idx

    raw = data_root(root) / "MNIST" / "raw"
    names = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    missing = [name for name in names if not (raw / name).exists() and not (raw / f"{name}.gz").exists()]
    if missing:
        raise CnnlabError(f"MNIST not found in {raw} (no {missing[0]}); pass --data-root, set CNNLAB_DATA, or use --image FILE")
    images, labels = read_idx(raw / names[0], ndim=3), read_idx(raw / names[1], ndim=1)
    if not 0 <= index < images.shape[0]:
        raise CnnlabError(f"--digit {index}: the MNIST test set has digits 0 to {images.shape[0] - 1}")
    return images[index].unsqueeze(0).float().numpy() / 255.0, int(labels[index])


def demo_image(image, grey: bool = False, max_side: int = 128) -> np.ndarray:
    """A decoded PIL image -> (C, H, W) in 0..1: one channel if it is grey (or `grey`), else RGB;
    large images are shrunk so that each pixel stays visible in the picture."""
    from PIL import Image

    from ..data.colour import to_mode

    rgb = to_mode(image, 3)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.LANCZOS)
    array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
    if grey or (np.array_equal(array[0], array[1]) and np.array_equal(array[1], array[2])):
        array = (array * np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)).sum(0, keepdims=True)
    return array
