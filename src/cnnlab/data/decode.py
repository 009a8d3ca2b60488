"""The image door: every image a user or a client hands cnnlab is opened here, and only here.

`open_image` is the one opener: `predict`, `explain`, the server's uploads, the explorer's
`--image`, the convolution demo and folder datasets (`folders.py`) all decode through it, so every
refusal reads the same and is checked in one place. Before a single row is decompressed it checks,
from the header:

1. the file: a regular file (a FIFO would block, /dev/zero never ends) of at most 64 MiB, not empty;
2. the format: PIL knows it (else 415), the header reads (else 422);
3. the pixels: at most `max_pixels` (a decompression bomb, 413) and at least `min_side` a side;
4. the decoded size: `width x height x bytes per pixel as PIL holds them` at most the budget (413).
   A pixel limit alone is not enough: a 77 KB 16-bit PNG of 6300 x 6300 is under 40 Mpixel, yet it
   decodes to 79 MB and its conversion to 8 bits took more than a gigabyte;
5. what the preprocessing will make of it (`check_prepared`): resizing scales the *shorter* side to
   the input size before the centre crop, so a 4,900,000 x 8 strip (39 MB decoded) would become a
   19,600,000 x 32 image of 2.5 GB on its way to 32 x 32. The resized image must fit the same
   budget (413), and an aspect ratio beyond `MAX_ASPECT_RATIO` (the crop would keep under 1% of
   the picture) is refused as unusable (422).

Then it decodes the first frame; a decoder that fails, or runs out of memory, is one line
(`BadImage`), never a traceback. A `MemoryError` is reported as such (`OutOfMemory`), so that a
dataset does not remember the file as broken: it was the machine, not the file.

The budget is `data.max_decoded_mb` for datasets and `--max-decoded-mb` for predict, explain and
serve (default 64 MB: a 36-Mpixel 8-bit grey scan, a 16-Mpixel RGBA screenshot, a 4000 x 4000 16-bit
grey image). JPEGs count at the reduced scale `draft` gives them, since that is all that is decoded.
Only the first frame of an animation or a multi-page TIFF is ever decoded, so only one frame counts.
"""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path
from typing import Protocol

from PIL import Image, UnidentifiedImageError

from ..config import DataConfig
from ..errors import CnnlabError
from ..files import read_up_to


class Prepared(Protocol):
    """What the door needs of the preprocessing an image is for (`preprocess.Preprocessing`, which
    imports this module: so it is named by its fields here)."""

    kind: str                 # "digit" or "resize"
    channels: int
    size: tuple[int, int]     # (H, W)

DEFAULT_MAX_DECODED_MB: float = DataConfig.max_decoded_mb
MB = 1_000_000
# An image whose header claims more pixels than this is refused before decoding: a tiny PNG can
# unpack into gigabytes (a decompression bomb).
MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
MIN_SIDE = 8  # smaller pictures (1x1 tracking pixels, icons) cannot hold a recognisable image
# Beyond this the centre crop keeps under 1% of the picture: nothing of it would reach the model.
MAX_ASPECT_RATIO = 100
# PIL's own bomb check (a warning above it, an error at twice it) for datasets, which pass no limit of
# their own; predict and serve refuse far earlier (`MAX_PIXELS`).
Image.MAX_IMAGE_PIXELS = 64_000_000
HEADER_SIZE = "cnnlab_header_size"  # `open_image` keeps (width, height) before a JPEG's draft in `image.info` here

# Bytes per pixel in PIL's memory, which is what decoding allocates: 1-bit, grey and palette images
# take one byte a pixel, 16-bit greys two, and every multi-band mode four (RGB is padded to 4 bytes).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;15": 2, "BGR;16": 2,
                    "BGR;24": 3, "I": 4, "F": 4, "LA": 4, "La": 4, "PA": 4, "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4,
                    "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4}
_DESCRIBED = {"1": "1-bit", "L": "8-bit grey", "P": "palette", "I;16": "16-bit grey", "I;16B": "16-bit grey",
              "I;16L": "16-bit grey", "I;16N": "16-bit grey", "I": "32-bit integer grey", "F": "32-bit float grey",
              "LA": "grey + alpha", "PA": "palette + alpha", "RGB": "RGB", "RGBA": "RGBA", "CMYK": "CMYK"}


class BadImage(CnnlabError):
    """An input that is not a usable image; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message, exit_code=1)
        self.status = status


class ImageTooLarge(BadImage):
    """An image whose decoded size, or the size preprocessing would give it, is over the budget (HTTP 413)."""

    def __init__(self, message: str):
        super().__init__(message, 413)


class OutOfMemory(BadImage):
    """The machine ran out of memory decoding an image that was within the limits: a fault of the
    moment, not of the file (HTTP 503: try again later)."""

    def __init__(self, message: str = "not enough memory to decode this image now (MemoryError); try again, or lower "
                                      "the decoded-size limit so that fewer large images are decoded at once"):
        super().__init__(message, 503)


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


def check_prepared(width: int, height: int, prepared: Prepared | None, max_bytes: int,
                   setting: str = "--max-decoded-mb") -> None:
    """Refuse an image of `width` x `height` that `prepared` would blow up on its way to the model's
    input: a resized intermediate over `max_bytes` (`ImageTooLarge`), or an aspect ratio beyond
    `MAX_ASPECT_RATIO` (`BadImage`, 422). The digit pipeline first shrinks to at most 1024 px a side,
    so for it only the aspect ratio matters."""
    if prepared is None:
        return
    if prepared.kind == "resize":  # the memory first: it is the harder limit (413)
        new_width, new_height = resized_size(width, height, prepared.size)
        needed = new_width * new_height * (1 if prepared.channels == 1 else 4)  # RGB is padded to 4 bytes
        if needed > max_bytes:
            raise ImageTooLarge(f"image is {width}x{height}: resizing its shorter side to the model's "
                                f"{prepared.size[1]}x{prepared.size[0]} input makes it {new_width}x{new_height}, "
                                f"{_mb(needed)}, more than the limit of {_mb(max_bytes)} ({setting})")
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        raise BadImage(f"image is {width}x{height}, an aspect ratio of {ratio:,.0f}:1: more than {MAX_ASPECT_RATIO}:1, "
                       f"so the centre crop to the model's {prepared.size[1]}x{prepared.size[0]} input would keep under "
                       "1% of it", 422)


def resized_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) after `preprocess.resize_center_crop`'s resize, before its crop: the shorter side
    scaled to fit `size` (H, W). The one formula both the check and the resize use."""
    h, w = size
    scale = max(h / height, w / width)
    return max(w, round(width * scale)), max(h, round(height * scale))


def open_image(source: bytes | str | Path, max_pixels: int = MAX_PIXELS, draft_side: int | None = None,
               max_decoded_bytes: int | None = None, prepared: Prepared | None = None,
               min_side: int = MIN_SIDE, setting: str = "--max-decoded-mb") -> Image.Image:
    """Decode image bytes or a file fully into a PIL image (first frame), or raise `BadImage`.

    The checks of the module's docstring, in that order, all before decoding; `prepared` is the
    preprocessing the image is for (None: only the decoded size counts). `draft_side` lets JPEG decode
    large photos at a reduced scale (at least `draft_side` a side), which is much faster and lighter.
    `setting` names the option that raises the decoded-size limit in the messages.
    """
    data = _read_image_file(Path(source)) if isinstance(source, (str, Path)) else bytes(source)
    if not data:
        raise BadImage("empty file (0 bytes)", 422)
    max_bytes = limit_bytes(None) if max_decoded_bytes is None else max_decoded_bytes
    with warnings.catch_warnings():
        # Decoder warnings (corrupt EXIF, ...) are noise for one line per file; but PIL only warns
        # between MAX_IMAGE_PIXELS and twice that: treat that warning as the error it is.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            known = _format_by_signature(data)
            if known:  # the right magic bytes, but PIL could not even read the header
                raise BadImage(f"corrupt {known} file (its header cannot be read)", 422) from None
            raise BadImage("not an image (unknown format; expected PNG, JPEG, WebP, BMP, GIF or TIFF)", 415) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"image has more pixels than the limit of {max_pixels:,} (a decompression bomb?)") from None
        except Exception as exc:  # a recognised header that is itself broken: PIL raises many types
            raise BadImage(f"corrupt image header ({_reason(exc)})", 422) from None
        width, height = image.size
        image.info[HEADER_SIZE] = (width, height)
        if width * height > max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                                f"{max_pixels:,} (a decompression bomb?)")
        if draft_side and image.format == "JPEG":
            image.draft(image.mode, (draft_side, draft_side))  # only the reduced scale is decoded, and counted
        check_decoded_size(image, max_bytes, setting)
        if min(width, height) < min_side:
            raise BadImage(f"image is only {width}x{height} pixels; at least {min_side}x{min_side} is needed", 422)
        check_prepared(*image.size, prepared, max_bytes, setting)
        try:
            image.seek(0)  # GIF, WebP, TIFF: the first frame
            image.load()
        except MemoryError:
            raise OutOfMemory() from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"image has more pixels than the limit of {max_pixels:,} (a decompression bomb?)") from None
        except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError, ...
            raise BadImage(f"corrupt or truncated image data ({_reason(exc)})", 422) from None
    return image


def header_mode(path: str | Path) -> str | None:
    """An image file's mode (`L`, `RGB`, ...) read from its header alone, nothing decoded; None for what
    is not a regular image file. For a quick look over a folder (is it grey?), not for using the image."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return image.mode
    except Exception:  # not an image, or a header PIL refuses: the loader names it when it decodes
        return None


def _read_image_file(path: Path) -> bytes:
    """A file's bytes, refusing what is not a regular file before opening it (a FIFO would block the
    open itself, /dev/zero never ends) and files over `MAX_FILE_BYTES`."""
    try:
        info = path.stat()
    except FileNotFoundError:
        kind = "a dangling symbolic link (its target is missing)" if path.is_symlink() else "no such file"
        raise BadImage(kind, 422) from None
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or exc})", 422) from None
    if stat.S_ISDIR(info.st_mode):
        raise BadImage("is a folder, not an image file", 422)
    if not stat.S_ISREG(info.st_mode):
        raise BadImage("not a regular file (a device, pipe or socket), so not an image file", 422)
    if info.st_size > MAX_FILE_BYTES:
        raise ImageTooLarge(f"file is {info.st_size / 2**20:.0f} MiB, more than the limit of {MAX_FILE_BYTES // 2**20} MiB")
    try:
        with open(path, "rb") as f:
            data = read_up_to(f, info.st_size, MAX_FILE_BYTES)
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or exc})", 422) from None
    if len(data) > MAX_FILE_BYTES:  # it grew while we read it
        raise ImageTooLarge(f"file is more than the limit of {MAX_FILE_BYTES // 2**20} MiB")
    return data


SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


def _format_by_signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return text or type(exc).__name__
