"""Colour mode: any PIL image (palette, 1-bit, 16/32-bit and float grey, CMYK, with or without
transparency, EXIF-rotated) as 8-bit grey or RGB. The lowest step of preprocessing, shared by the
preprocessing contract (`preprocess.py`) and the digit finder (`digits.py`)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from ..errors import CnnlabError


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L or RGB; transparent pixels are composited on white.

    Handles palette images (with or without transparency), 1-bit, 16-bit and 32-bit integer and
    float greys, CMYK and YCbCr, and applies the EXIF orientation of photos.
    """
    image = ImageOps.exif_transpose(image) or image
    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_grey_to_l(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    try:
        return image.convert("L" if channels == 1 else "RGB")
    except ValueError as exc:  # modes such as HSV or LAB have no conversion in PIL
        raise CnnlabError(f"cannot convert an image of mode {image.mode} ({exc})") from None


def has_alpha(image: Image.Image) -> bool:
    """Whether the image has transparency (an alpha channel or a transparent palette entry)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (image.mode == "P" and "transparency" in image.info)


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey -> 8-bit, keeping the full range the file uses."""
    array = np.asarray(image, dtype=np.float64)
    if array.size == 0:
        return Image.new("L", image.size)
    high = float(np.nanmax(array)) if np.isfinite(array).any() else 0.0
    if image.mode == "F" and high <= 1.0:
        scale = 255.0  # float images in 0..1
    elif image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit files often use 12 or 14 bits only: scale by the bit depth that holds the data.
        bits = 8 if high <= 255 else next((b for b in (10, 12, 14, 16, 24, 32) if high < 2 ** b), 32)
        scale = 255.0 / (2 ** bits - 1)
    else:
        scale = 255.0 / max(high, 1.0)
    array = np.nan_to_num(array * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "L")
