"""What the model saw and computed for one image, as small PNGs for the drawing page.

`visualize.layer_outputs` uses forward hooks on the model; the server shares one model between
concurrent requests, where hooks would mix their outputs. Here each layer of `model.features`
is run by hand instead, which needs no shared state.
"""

from __future__ import annotations

import base64
import io
import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

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


@lru_cache(maxsize=1)
def _viridis() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)  # (256, 3)


def channel_grid(maps: torch.Tensor) -> tuple[np.ndarray, int]:
    """(C, H, W) feature maps -> (RGB grid image, columns): each channel on its own min..max scale,
    coloured with viridis, tiles separated by a 1-pixel dark line."""
    maps = maps[:MAX_CHANNELS].float().cpu()
    c, h, w = maps.shape
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    unit = ((maps - low) / (high - low).clamp_min(1e-8)).numpy()
    columns = max(1, math.ceil(math.sqrt(c * h / w)))  # a roughly square grid
    rows = math.ceil(c / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), -1, dtype=np.int16)
    for i in range(c):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = np.round(unit[i] * 255)
    colours = _viridis()[np.clip(grid, 0, 255)]
    colours[grid < 0] = (40, 40, 48)
    return colours, columns


@torch.inference_mode()
def feature_maps(model: torch.nn.Module, x: torch.Tensor, layers: list[LayerInfo]) -> list[dict]:
    """Every spatial layer's output for one normalised input `x` (1, C, H, W), as PNG grids.

    Layers whose type does not show maps (`LayerType.shows_maps`) are left out: dropout (a no-op at
    inference) and batchnorm (a per-channel rescale of the conv before it, which looks the same once
    each channel is min-max scaled). A residual block is one row: its output after the addition.
    """
    out = []
    h = x
    for index, module in enumerate(model.features):
        h = module(h)  # (1, C, H, W)
        spec = layers[index].spec
        if not spec.kind.shows_maps or h.dim() != 4:
            continue
        grid, columns = channel_grid(h[0])
        out.append({"layer": index + 1, "name": spec.describe(), "shape": list(h.shape[1:]), "columns": columns,
                    "png": png_data_url(grid)})
    return out
