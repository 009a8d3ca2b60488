"""What the model saw and computed for one image, as small PNGs for the drawing page, coloured as
the CLI's feature-map pictures are (signed conv outputs blue-white-red, ReLU/pooling outputs magma).

`visualize.layer_outputs` uses forward hooks on the model; the server shares one model between
concurrent requests, where hooks would mix their outputs. Here each layer of `model.features`
is run by hand instead, which needs no shared state.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
from PIL import Image

from ..formatting import colour_table
from ..layers import LayerInfo

MAX_CHANNELS = 96  # more tiles than this are too small to see on a page


def png_data_url(array: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) -> data:image/png;base64,..."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", optimize=False, compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def input_png(image: torch.Tensor) -> str:
    """The uint8 model input (C, H, W) as a PNG data URL (grey or RGB)."""
    array = image.cpu().numpy()
    return png_data_url(array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0)))


def channel_grid(maps: torch.Tensor, signed: bool) -> tuple[np.ndarray, int, float, float]:
    """(C, H, W) feature maps -> (RGB grid image, columns, scale low, scale high), as the CLI's
    feature-map pictures: one colour scale for the whole layer, so channels can be compared.
    `signed` (conv outputs, anything negative): diverging RdBu_r around zero, blue negative,
    white 0, red positive; else (after ReLU or pooling) magma from 0 (black) to the maximum.
    Tiles are separated by a 1-pixel dark line."""
    maps = maps[:MAX_CHANNELS].float().cpu()
    c, h, w = maps.shape
    if signed:
        high = float(maps.abs().max()) or 1.0
        low = -high
    else:
        low, high = 0.0, float(maps.max()) or 1.0
    unit = ((maps - low) / (high - low)).clamp(0, 1).numpy()
    columns = max(1, math.ceil(math.sqrt(c * h / w)))  # a roughly square grid
    rows = math.ceil(c / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), -1, dtype=np.int16)
    for i in range(c):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = np.round(unit[i] * 255)
    colours = colour_table("RdBu_r" if signed else "magma")[np.clip(grid, 0, 255)]
    colours[grid < 0] = (40, 40, 48)
    return colours, columns, low, high


@torch.inference_mode()
def feature_maps(model: torch.nn.Module, x: torch.Tensor, layers: list[LayerInfo]) -> tuple[list[dict], list[dict]]:
    """Every spatial layer's output for one normalised input `x` (1, C, H, W), as PNG grids, and
    the spatial layers whose type does not show maps (`LayerType.shows_maps`: batchnorm, dropout,
    scale) with the reason their type gives (`LayerType.not_shown`). A residual block is one grid: its output after the addition."""
    shown, skipped = [], []
    h = x
    for index, module in enumerate(model.features):
        h = module(h)  # (1, C, H, W)
        if h.dim() != 4:
            continue
        spec = layers[index].spec
        entry = {"layer": index + 1, "name": spec.describe(), "shape": list(h.shape[1:])}
        if not spec.kind.shows_maps:
            skipped.append({**entry, "reason": spec.kind.not_shown.format(previous=index)})
            continue
        signed = spec.kind.has_filters or float(h.min()) < 0  # conv outputs are signed, as in the CLI's pictures
        grid, columns, low, high = channel_grid(h[0], signed)
        shown.append({**entry, "columns": columns, "png": png_data_url(grid),
                      "colormap": "RdBu_r" if signed else "magma", "scale": [round(low, 4), round(high, 4)]})
    return shown, skipped
