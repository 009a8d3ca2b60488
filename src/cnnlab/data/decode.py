"""The decoded-size budget: how much memory an image will take once decoded, read from its header.

A pixel limit alone is not enough: a 77 KB 16-bit PNG of 6300 x 6300 is under 40 Mpixel, yet it
decodes to 79 MB and its conversion to 8 bits took more than a gigabyte. So every image cnnlab
decodes (the server, `predict`, `explain`, folder datasets) goes through `check_decoded_size`
after PIL has read the header and before a single row is decompressed:

    width x height x bytes per pixel as PIL holds them (channels x bytes per sample)

The limit is `data.max_decoded_mb` for datasets and `--max-decoded-mb` for predict, explain and
serve (default 64 MB: a 36-Mpixel 8-bit grey scan, a 16-Mpixel RGBA screenshot, a 4000 x 4000 16-bit
grey image). JPEGs count at the reduced scale `draft` gives them, since that is all that is decoded.
Only the first frame of an animation or a multi-page TIFF is ever decoded, so only one frame counts.
"""

from __future__ import annotations

from PIL import Image

from ..config import DataConfig
from ..errors import CnnlabError

DEFAULT_MAX_DECODED_MB: float = DataConfig.max_decoded_mb
MB = 1_000_000

# Bytes per pixel in PIL's memory, which is what decoding allocates: 1-bit, grey and palette images
# take one byte a pixel, 16-bit greys two, and every multi-band mode four (RGB is padded to 4 bytes).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;15": 2, "BGR;16": 2,
                    "BGR;24": 3, "I": 4, "F": 4, "LA": 4, "La": 4, "PA": 4, "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4,
                    "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4}
_DESCRIBED = {"1": "1-bit", "L": "8-bit grey", "P": "palette", "I;16": "16-bit grey", "I;16B": "16-bit grey",
              "I;16L": "16-bit grey", "I;16N": "16-bit grey", "I": "32-bit integer grey", "F": "32-bit float grey",
              "LA": "grey + alpha", "PA": "palette + alpha", "RGB": "RGB", "RGBA": "RGBA", "CMYK": "CMYK"}


class ImageTooLarge(CnnlabError):
    """An image whose decoded size is over the budget (HTTP 413)."""

    status = 413

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


def decoded_bytes(image: Image.Image) -> int:
    """Bytes the first frame of `image` (opened, not yet loaded) takes once decoded, from its header."""
    width, height = image.size
    return width * height * _BYTES_PER_PIXEL.get(image.mode, 8)  # an unknown mode: assume the widest


def limit_bytes(max_decoded_mb: float | None) -> int:
    """The budget in bytes for a limit in MB (None: the default)."""
    return int((DEFAULT_MAX_DECODED_MB if max_decoded_mb is None else max_decoded_mb) * MB)


def check_decoded_size(image: Image.Image, max_bytes: int, setting: str = "--max-decoded-mb") -> None:
    """Raise `ImageTooLarge` if decoding `image` would take more than `max_bytes`; `setting` is the
    option that raises the limit, named in the message."""
    needed = decoded_bytes(image)
    if needed > max_bytes:
        width, height = image.size
        kind = _DESCRIBED.get(image.mode, f"mode {image.mode}")
        raise ImageTooLarge(f"image is {width}x{height} {kind}: {_mb(needed)} once decoded, more than the "
                            f"limit of {_mb(max_bytes)} ({setting})")


def _mb(size: int) -> str:
    return f"{size / MB:,.0f} MB" if size >= 100 * MB else f"{size / MB:.3g} MB"


def check_limit(max_decoded_mb: float, setting: str = "--max-decoded-mb") -> None:
    """A limit must be a positive, finite number of MB."""
    if not (isinstance(max_decoded_mb, (int, float)) and 0 < max_decoded_mb < 1e6):
        raise CnnlabError(f"{setting} must be a number of MB above 0 and below 1,000,000, got {max_decoded_mb}")
