"""A corpus of broken and hostile image files, generated in a few seconds, for `predict` and the server.

    python -m tests.support.hostile_images /tmp/hostile     # writes the files and prints what each one is

`write_corpus(folder)` returns {file name: expectation}: "ok" (a usable picture, however odd:
it must be classified), "reject" (it must be refused with a clear error), "blank" (a readable
picture with nothing on it: a digit model refuses it with "no digit found", a colour model
classifies it; `expected_outcome`) or "any" (either is fine, as long as nothing crashes, hangs or
eats memory). Every file is small on disk; the bombs are built by streaming compressed zeros, so
writing them needs no memory either.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

MARKER_NAME = "PICKLE-WAS-EXECUTED"


class MarkerPayload:
    """Unpickling this creates a marker file: proof that something executed the file's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": MarkerPayload(marker)})


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, complete: bool = True) -> bytes:
    """A 1-bit PNG of `width` x `height` zeros: kilobytes on disk, width*height pixels decoded."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    parts = []
    for _ in range(height if complete else min(height, 16)):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts)) + \
        (_png_chunk(b"IEND", b"") if complete else b"")


def png16_bomb(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG of `width` x `height` zeros: 77 KB for 6300 x 6300, under 40 Mpixel, yet
    79 MB once decoded (and more than a gigabyte when converted to 8 bits as a whole)."""
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # bit depth 16, greyscale
    row = b"\x00" * (1 + 2 * width)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def digit_picture(size: int = 64, mode: str = "L") -> Image.Image:
    """A dark '7'-like stroke on light paper, the kind of picture `predict` gets from a phone."""
    canvas = np.full((size, size), 235, dtype=np.uint8)
    s = size // 8
    canvas[2 * s:3 * s, 2 * s:6 * s] = 20          # top bar
    for i in range(2 * s, 7 * s):                    # diagonal
        x = 6 * s - (i - 2 * s) * 3 // 5
        canvas[i, max(0, x - s // 2):x + s // 2] = 20
    return Image.fromarray(canvas).convert(mode)


def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view), and the upright picture."""
    upright = digit_picture(64, "RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes()), upright


def write_corpus(folder: str | Path) -> dict[str, str]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    picture = digit_picture(64)
    png = _encode(picture, "PNG")
    jpeg = _encode(picture.convert("RGB"), "JPEG", quality=90)
    files: dict[str, tuple[bytes, str]] = {
        # plain files that must work
        "plain.png": (png, "ok"),
        "plain.jpg": (jpeg, "ok"),
        # wrong or missing extension: the content decides, never the name (a folder's files without an
        # image extension are skipped by `cnnlab predict`; named on their own they are predicted)
        "png-named.jpg": (png, "ok"),
        "jpeg-named.png": (jpeg, "ok"),
        "no-extension": (png, "ok"),
        # modes
        "grey16.png": (_encode(Image.fromarray(np.asarray(picture, dtype=np.uint16) * 257), "PNG"), "ok"),
        "cmyk.jpg": (_encode(picture.convert("CMYK"), "JPEG"), "ok"),
        "rgba-transparent.png": (_encode(_transparent_digit(), "PNG"), "ok"),
        "la.png": (_encode(picture.convert("LA"), "PNG"), "ok"),
        "palette-transparency.png": (_encode(picture.convert("P"), "PNG", transparency=0), "ok"),
        "one-bit.png": (_encode(picture.convert("1"), "PNG"), "ok"),
        "float32.tiff": (_encode(Image.fromarray(np.asarray(picture, dtype=np.float32) / 255.0), "TIFF"), "ok"),
        "int32.tiff": (_encode(picture.convert("I"), "TIFF"), "ok"),
        "bmp.bmp": (_encode(picture, "BMP"), "ok"),
        "exif-rotated.jpg": (exif_rotated_jpeg()[0], "ok"),
        "animated.gif": (_animated_gif(), "ok"),
        "progressive.jpg": (_encode(picture.convert("RGB"), "JPEG", progressive=True), "ok"),
        "very-wide.png": (_encode(Image.new("L", (4000, 8), 200), "PNG"), "any"),
        # broken files
        "empty.png": (b"", "reject"),
        "truncated.png": (png[: len(png) // 2], "reject"),
        "header-only.png": (png[:33], "reject"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "any"),  # some decoders show the top part
        "garbage-after-header.png": (png[:40] + bytes(range(256)) * 8, "reject"),
        "flipped-bytes.jpg": (_flip_bytes(jpeg), "any"),
        "text-named.png": (b"<html><body>not an image</body></html>\n", "reject"),
        "svg-named.png": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>', "reject"),
        "zip-named.jpg": (_zip_bytes(), "reject"),
        "tiny-1x1.png": (_encode(Image.new("L", (1, 1), 0), "PNG"), "reject"),
        # hostile files
        "decompression-bomb.png": (png_bomb(30_000, 30_000), "reject"),       # 100 KB on disk, 900 Mpixel
        "large-but-allowed.png": (png_bomb(6_000, 6_000), "blank"),           # 36 Mpixel, under the limit
        "grey16-bomb.png": (png16_bomb(6_300, 6_300), "reject"),              # 77 KB, 79 MB decoded: over the budget
        # nothing drawn: no digit (but a picture a colour model classifies)
        "empty-transparent-canvas.png": (_encode(Image.new("RGBA", (280, 280), (0, 0, 0, 0)), "PNG"), "blank"),
        "blank-paper.jpg": (_encode(_blank_paper(), "JPEG", quality=75), "blank"),
        "white-strokes-on-transparency.png": (_encode(_transparent_digit((255, 255, 255)), "PNG"), "ok"),
        "huge-dimensions-header.png": (png_bomb(65_535, 65_535, complete=False), "reject"),
        "gif-huge-screen.gif": (_gif_with_screen(65_535, 65_535), "reject"),
        "pickle-named.png": (b"", "reject"),  # filled in below: needs the folder for its marker path
    }
    files["pickle-named.png"] = (pickle_payload(folder.parent / MARKER_NAME), "reject")
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: expectation for name, (_, expectation) in files.items()}


def expected_outcome(expectation: str, kind: str) -> str:
    """What a model whose preprocessing is `kind` ("digit" or "resize") must do with a file:
    "ok", "reject" or "any"."""
    if expectation == "blank":
        return "reject" if kind == "digit" else "ok"
    return expectation


def _transparent_digit(colour: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    grey = np.asarray(digit_picture(64))
    alpha = np.where(grey < 128, 255, 0).astype(np.uint8)  # ink opaque, paper transparent
    return Image.fromarray(np.stack([np.full_like(grey, value) for value in colour] + [alpha], -1))


def _blank_paper() -> Image.Image:
    """A phone photo of empty paper: tinted, lit from one side, noisy."""
    rng = np.random.default_rng(8)
    xx = np.mgrid[0:480, 0:640][1] / 640
    paper = np.array([225.0, 220.0, 205.0])[None, None, :] * (0.85 + 0.2 * xx)[..., None]
    return Image.fromarray(np.clip(paper + rng.normal(0, 3, (480, 640, 3)), 0, 255).astype(np.uint8))


def _animated_gif() -> bytes:
    frames = [digit_picture(64).rotate(angle, fillcolor=235) for angle in (0, 20, 40)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _gif_with_screen(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("L", (8, 8), 0).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen, which PIL reports as the size
    return bytes(data)


def _flip_bytes(data: bytes) -> bytes:
    rng = np.random.default_rng(6)
    out = bytearray(data)
    for position in rng.integers(len(out) // 4, len(out), 40):
        out[position] ^= 0xFF
    return bytes(out)


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", b"\x80\x04K\x01.")
    return buffer.getvalue()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-images")
    for name, expectation in write_corpus(target).items():
        print(f"{expectation:7s} {target / name} ({(target / name).stat().st_size:,} bytes)")
