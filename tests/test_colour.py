"""Colour mode (`cnnlab.data.colour`): any PIL mode as 8-bit grey or RGB."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cnnlab.data.colour import has_alpha, to_mode


def test_sixteen_bit_using_twelve_bits_is_scaled_by_its_bit_depth():
    array = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 4096).astype(np.uint16)  # 12-bit camera data
    grey = to_mode(Image.fromarray(array), 1)
    assert np.asarray(grey).max() == 255


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert has_alpha(image) and not has_alpha(image.convert("RGB"))
    assert np.asarray(to_mode(image, 3)).min() == 255
