"""MNIST test digits re-drawn the way users hand them in, plus broken files, for predict/serve tests.

`user_style_digit` turns one 28x28 MNIST digit into what a phone photo or a canvas export looks
like: dark ink on light (sometimes tinted, unevenly lit, noisy) paper, the digit large and
off-centre on a big canvas, saved as JPEG, PNG, or an RGBA canvas export whose background is
transparent. Everything is generated at test time from a seed; nothing binary is committed.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

STYLES = ("jpeg_photo", "png_paper", "rgba_canvas", "rgba_white", "jpeg_blue_ink", "png_grey")


def _ink_strength(digit: np.ndarray, height: int, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 digit -> (H', W') float ink 0..1 of the digit's box at `height` pixels, with crisp pen edges."""
    rows = np.flatnonzero(digit.max(axis=1) > 30)
    cols = np.flatnonzero(digit.max(axis=0) > 30)
    crop = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = height / crop.shape[0]
    width = max(2, round(crop.shape[1] * scale))
    big = np.asarray(Image.fromarray(crop).resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
    # A pen gives hard edges; the threshold varies the stroke width a little from image to image.
    centre = rng.uniform(0.3, 0.55)
    return np.clip((big - centre) / 0.15 + 0.5, 0.0, 1.0)


def user_style_digit(digit: np.ndarray, style: str, seed: int) -> tuple[bytes, str]:
    """Encode one MNIST digit (28x28 uint8, white on black) as a user's picture; returns (bytes, suffix)."""
    rng = np.random.default_rng(seed)
    canvas_h, canvas_w = int(rng.integers(220, 640)), int(rng.integers(220, 640))
    height = int(canvas_h * rng.uniform(0.35, 0.8))
    aspect = (np.ptp(np.flatnonzero(digit.max(axis=0) > 30)) + 1) / (np.ptp(np.flatnonzero(digit.max(axis=1) > 30)) + 1)
    height = int(min(height, (canvas_w - 8) / aspect))  # the whole digit on the page, however wide
    ink = _ink_strength(digit, height, rng)
    h, w = ink.shape
    top = int(rng.integers(2, max(3, canvas_h - h - 2)))
    left = int(rng.integers(2, max(3, canvas_w - w - 2)))
    full = np.zeros((canvas_h, canvas_w), dtype=np.float32)
    full[top:top + h, left:left + w] = ink

    if style in ("rgba_canvas", "rgba_white"):
        # An HTML canvas export: black strokes; alpha carries the stroke, the background is
        # transparent (toDataURL of an untouched canvas) or painted white.
        rgba = np.zeros((canvas_h, canvas_w, 4), dtype=np.uint8)
        if style == "rgba_canvas":
            rgba[..., :3] = 0
            rgba[..., 3] = np.round(full * 255)
        else:
            value = np.round(255 * (1 - full))
            rgba[..., 0] = rgba[..., 1] = rgba[..., 2] = value
            rgba[..., 3] = 255
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
        return buffer.getvalue(), ".png"

    paper = np.array(rng.uniform(185, 250) - rng.uniform(0, 25, 3) * (style == "jpeg_photo"), dtype=np.float32)
    ink_colour = np.array([rng.uniform(10, 70)] * 3, dtype=np.float32)
    if style == "jpeg_blue_ink":
        ink_colour = np.array([rng.uniform(10, 40), rng.uniform(20, 60), rng.uniform(90, 160)], dtype=np.float32)
    yy, xx = np.mgrid[0:canvas_h, 0:canvas_w].astype(np.float32)
    # Uneven lighting: a brightness gradient across the photo.
    light = 1.0 + rng.uniform(-0.12, 0.12) * (xx / canvas_w - 0.5) + rng.uniform(-0.12, 0.12) * (yy / canvas_h - 0.5)
    image = (paper[None, None, :] * (1 - full[..., None]) + ink_colour[None, None, :] * full[..., None]) * light[..., None]
    image += rng.normal(0, rng.uniform(1, 5), image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    if style == "png_grey":
        Image.fromarray(image.mean(axis=2).astype(np.uint8), "L").save(buffer, "PNG")
        return buffer.getvalue(), ".png"
    if style == "png_paper":
        Image.fromarray(image, "RGB").save(buffer, "PNG")
        return buffer.getvalue(), ".png"
    Image.fromarray(image, "RGB").save(buffer, "JPEG", quality=int(rng.integers(55, 92)))
    return buffer.getvalue(), ".jpg"


def write_user_style_set(folder: Path, digits: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[tuple[Path, int]]:
    """Write every digit in a rotating style; returns (path, true label) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (digit, label) in enumerate(zip(digits, labels)):
        data, suffix = user_style_digit(digit, STYLES[i % len(STYLES)], seed * 100_003 + i)
        path = folder / f"{i:04d}-{STYLES[i % len(STYLES)]}-{int(label)}{suffix}"
        path.write_bytes(data)
        out.append((path, int(label)))
    return out


def drawn_one(size: int = 280, width: int = 18) -> Image.Image:
    """A vertical stroke on a white canvas, as a user draws a '1'."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(size * 0.55, size * 0.15), (size * 0.5, size * 0.85)], fill="black", width=width)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """PIL image -> file bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def save_tiny_model(path: Path, classes: int = 10, batchnorm: bool = True, seed: int = 0,
                    kind: str = "digit", input_shape: tuple[int, int, int] = (1, 28, 28)) -> Path:
    """A small random-weight CNN saved with `checkpoint.save_model`, for fast tests of predict/export/serve.

    BatchNorm layers get non-trivial running statistics so that folding them is really tested;
    one sits after an activation, where it cannot be folded.
    """
    import torch

    from cnnlab.checkpoint import save_model
    from cnnlab.layers import build_model, parse_layers, spec_to_list

    norm = ["batchnorm"] if batchnorm else []
    spec = [{"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1, "bias": not batchnorm}, *norm, "relu",
            {"type": "maxpool", "kernel_size": 2},
            {"type": "conv", "out_channels": 8, "kernel_size": 3}, "relu", *norm,
            {"type": "maxpool", "kernel_size": 2}, "flatten", {"type": "linear", "out_features": 24}, *norm, "relu",
            {"type": "dropout", "p": 0.2}, {"type": "linear"}]
    layers = parse_layers(spec)
    torch.manual_seed(seed)
    model = build_model(layers, input_shape, classes)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    channels = input_shape[0]
    save_model(path, model.eval(), {
        "layers": spec_to_list(layers), "input_shape": list(input_shape),
        "classes": [str(i) for i in range(classes)] if classes == 10 else [f"class-{i}" for i in range(classes)],
        "preprocessing": {"kind": kind, "channels": channels, "size": list(input_shape[1:]),
                          "mean": [0.1307] * channels, "std": [0.3081] * channels},
        "dataset": "mnist" if kind == "digit" and classes == 10 else "synthetic",
    })
    return path


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb as PIL first sees it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
