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
from PIL import Image, ImageDraw, ImageFilter

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


# ---------------------------------------------------------------------------------------------
# Hard but real digits, and pictures with no digit at all (the "no digit found" decision)
# ---------------------------------------------------------------------------------------------

HARD_STYLES = ("faint_pencil", "corner_small", "thick_marker", "uneven_light", "chalkboard", "blurry_photo",
               "noisy_paper", "alpha_white", "alpha_colour", "alpha_faint", "tiny_canvas", "hairline", "low_contrast_app", "low_quality_jpeg", "speckled")
BLANK_KINDS = ("uniform", "gaussian_noise", "salt_pepper", "gradient", "vignette", "soft_shadow", "jpeg_photo",
               "low_quality_jpeg", "transparent", "texture", "dust", "tiny")


def _save(image: Image.Image, rng: np.random.Generator, jpeg: bool) -> tuple[bytes, str]:
    if jpeg:
        return encode(image.convert("RGB"), "JPEG", quality=int(rng.integers(40, 92))), ".jpg"
    return encode(image), ".png"


def _lighting(h: int, w: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A photo's light falling on the page: a gradient, a vignette and a soft shadow edge, about
    `strength` (a fraction of the brightness) each; (H, W) factors around 1."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = xx / w - 0.5, yy / h - 0.5
    light = 1.0 + strength * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)
    light -= strength * rng.uniform(0, 1.2) * (x ** 2 + y ** 2) * 2                       # vignette
    angle = rng.uniform(0, np.pi)
    edge = (np.cos(angle) * x + np.sin(angle) * y - rng.uniform(-0.3, 0.3)) / rng.uniform(0.08, 0.3)
    light -= strength * rng.uniform(0, 0.8) / (1 + np.exp(-edge))                           # a soft shadow
    return light.astype(np.float32)


def _paper_photo(ink: np.ndarray, rng: np.random.Generator, paper: float, ink_level: float, noise: float,
                 light_strength: float, tint: bool = True) -> Image.Image:
    """Ink strength (H, W) 0..1 -> an RGB photo of it on paper with uneven light and sensor noise."""
    h, w = ink.shape
    paper_rgb = paper - (rng.uniform(0, 20, 3) if tint else np.zeros(3))
    ink_rgb = np.full(3, ink_level) + (rng.uniform(-8, 8, 3) if tint else 0)
    image = paper_rgb[None, None, :] * (1 - ink[..., None]) + ink_rgb[None, None, :] * ink[..., None]
    image = image * _lighting(h, w, rng, light_strength)[..., None]
    image += rng.normal(0, noise, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def _digit_on_page(digit: np.ndarray, page: tuple[int, int], height: int, rng: np.random.Generator,
                   stroke_centre: tuple[float, float] = (0.3, 0.55), corner: bool = False) -> np.ndarray:
    """The digit's ink at `height` pixels placed on a page (H, W), anywhere (or near a corner)."""
    canvas_h, canvas_w = page
    ink = _pen(digit, height, rng.uniform(*stroke_centre))
    h, w = ink.shape
    margin = max(2, min(canvas_h, canvas_w) // 40)
    if corner:
        top = margin if rng.random() < 0.5 else canvas_h - h - margin
        left = margin if rng.random() < 0.5 else canvas_w - w - margin
    else:
        top = int(rng.integers(margin, max(margin + 1, canvas_h - h - margin)))
        left = int(rng.integers(margin, max(margin + 1, canvas_w - w - margin)))
    full = np.zeros(page, dtype=np.float32)
    full[top:top + h, left:left + w] = ink[:canvas_h - top, :canvas_w - left]
    return full


def _pen(digit: np.ndarray, height: int, centre: float) -> np.ndarray:
    """Like `_ink_strength` with a given stroke threshold: lower = a wider pen."""
    rows = np.flatnonzero(digit.max(axis=1) > 30)
    cols = np.flatnonzero(digit.max(axis=0) > 30)
    crop = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    width = max(2, round(crop.shape[1] * height / crop.shape[0]))
    big = np.asarray(Image.fromarray(crop).resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
    return np.clip((big - centre) / 0.15 + 0.5, 0.0, 1.0)


def hard_digit(digit: np.ndarray, style: str, seed: int) -> tuple[bytes, str]:
    """One MNIST digit (28x28, white on black) as a hard but real picture of it; returns (bytes, suffix).

    faint_pencil: grey pencil 12-35 levels darker than the paper; corner_small: a digit 2.5-5% of a
    2000-4000 px photo's height near a corner; thick_marker: a pen about a quarter of the digit's
    height wide; uneven_light: strong gradient, vignette and shadow; chalkboard: light chalk on a dark,
    textured board; blurry_photo: out of focus; noisy_paper: heavy sensor noise; alpha_white,
    alpha_colour and alpha_faint: strokes of one colour on a transparent canvas (alpha_faint: 15-50%
    opaque); tiny_canvas: a 20-40 px picture; hairline: a 1-pixel pen on a big canvas;
    low_contrast_app: a flat canvas and a pen 15-30 levels away from it; low_quality_jpeg: a photo
    saved at JPEG quality 5-20; speckled: 1-20% of the pixels salt-and-pepper noise.
    """
    rng = np.random.default_rng(seed)
    if style == "faint_pencil":
        page = (int(rng.integers(300, 900)), int(rng.integers(300, 900)))
        ink = _digit_on_page(digit, page, int(page[0] * rng.uniform(0.3, 0.7)), rng, (0.45, 0.6))
        paper = rng.uniform(190, 240)
        image = _paper_photo(ink, rng, paper, paper - rng.uniform(12, 35), rng.uniform(0.8, 2.5), 0.1, tint=False)
        return _save(image, rng, jpeg=rng.random() < 0.5)
    if style == "corner_small":
        long_side = int(rng.integers(2000, 4000))
        page = (long_side, int(long_side * rng.uniform(0.7, 0.8)))
        ink = _digit_on_page(digit, page, int(page[0] * rng.uniform(0.025, 0.05)), rng, corner=True)
        image = _paper_photo(ink, rng, rng.uniform(170, 235), rng.uniform(20, 80), rng.uniform(1, 4), 0.15)
        return _save(image, rng, jpeg=True)
    if style == "thick_marker":
        page = (int(rng.integers(240, 700)),) * 2
        height = int(page[0] * rng.uniform(0.5, 0.8))
        ink = _digit_on_page(digit, page, height, rng, (0.1, 0.2))
        radius = max(1, int(height * rng.uniform(0.06, 0.1)))
        ink = np.asarray(Image.fromarray(ink, "F").filter(ImageFilter.MaxFilter(2 * radius + 1)), dtype=np.float32)
        image = _paper_photo(ink, rng, rng.uniform(200, 250), rng.uniform(0, 50), rng.uniform(0.5, 3), 0.05)
        return _save(image, rng, jpeg=rng.random() < 0.5)
    if style == "uneven_light":
        page = (int(rng.integers(400, 1400)), int(rng.integers(400, 1400)))
        ink = _digit_on_page(digit, page, int(min(page) * rng.uniform(0.2, 0.6)), rng)
        image = _paper_photo(ink, rng, rng.uniform(180, 250), rng.uniform(30, 90), rng.uniform(1, 4), 0.45)
        return _save(image, rng, jpeg=True)
    if style == "chalkboard":
        page = (int(rng.integers(300, 800)), int(rng.integers(300, 800)))
        ink = _digit_on_page(digit, page, int(min(page) * rng.uniform(0.3, 0.7)), rng)
        board = rng.uniform(25, 70)
        image = _paper_photo(ink, rng, board, board + rng.uniform(60, 160), rng.uniform(2, 6), 0.2)
        texture = _texture(page, rng, rng.uniform(3, 8))
        array = np.clip(np.asarray(image, dtype=np.float32) + texture[..., None], 0, 255).astype(np.uint8)
        return _save(Image.fromarray(array, "RGB"), rng, jpeg=True)
    if style == "blurry_photo":
        page = (int(rng.integers(300, 900)), int(rng.integers(300, 900)))
        height = int(min(page) * rng.uniform(0.3, 0.7))
        ink = _digit_on_page(digit, page, height, rng)
        image = _paper_photo(ink, rng, rng.uniform(170, 240), rng.uniform(10, 70), 0.5, 0.15)
        image = image.filter(ImageFilter.GaussianBlur(height * rng.uniform(0.02, 0.05)))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(1, 3), (page[0], page[1], 3))
        return _save(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), rng, jpeg=True)
    if style == "noisy_paper":
        page = (int(rng.integers(250, 700)), int(rng.integers(250, 700)))
        ink = _digit_on_page(digit, page, int(min(page) * rng.uniform(0.3, 0.7)), rng)
        image = _paper_photo(ink, rng, rng.uniform(170, 240), rng.uniform(20, 90), rng.uniform(12, 25), 0.15)
        return _save(image, rng, jpeg=rng.random() < 0.5)
    if style in ("alpha_white", "alpha_colour", "alpha_faint"):
        page = (int(rng.integers(200, 600)),) * 2
        ink = _digit_on_page(digit, page, int(page[0] * rng.uniform(0.4, 0.8)), rng)
        colour = (255, 255, 255) if style == "alpha_white" else tuple(int(v) for v in rng.integers(0, 256, 3))
        opacity = rng.uniform(40, 120) if style == "alpha_faint" else 255  # a soft, half-transparent brush
        rgba = np.zeros(page + (4,), dtype=np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = np.round(ink * opacity)
        return encode(Image.fromarray(rgba, "RGBA")), ".png"
    if style == "hairline":
        # A 1-pixel pen on a big canvas: the line is the pen's path (the digit's skeleton, roughly).
        page = (int(rng.integers(500, 1300)),) * 2
        ink = _digit_on_page(digit, page, int(page[0] * rng.uniform(0.4, 0.8)), rng, (0.5, 0.6))
        core = ink >= 0.5
        thin = core & ~np.asarray(Image.fromarray(core.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3)), bool)
        image = Image.fromarray(np.where(thin, rng.uniform(0, 80), 255).astype(np.uint8))
        return encode(image), ".png"
    if style == "low_contrast_app":
        # A drawing app: flat grey canvas, a pen only 15-30 levels darker or lighter, no noise.
        page = (int(rng.integers(200, 700)),) * 2
        ink = _digit_on_page(digit, page, int(page[0] * rng.uniform(0.4, 0.8)), rng)
        paper = rng.uniform(60, 200)
        pen = paper + rng.choice([-1, 1]) * rng.uniform(15, 30)
        return encode(Image.fromarray(np.round(paper + (pen - paper) * ink).astype(np.uint8))), ".png"
    if style == "tiny_canvas":
        side = int(rng.integers(20, 41))
        ink = _digit_on_page(digit, (side, side), int(side * rng.uniform(0.6, 0.85)), rng)
        image = _paper_photo(ink, rng, rng.uniform(200, 255), rng.uniform(0, 60), rng.uniform(0, 3), 0.05, tint=False)
        return encode(image.convert("L")), ".png"
    if style == "low_quality_jpeg":
        page = (int(rng.integers(250, 900)), int(rng.integers(250, 900)))
        ink = _digit_on_page(digit, page, int(min(page) * rng.uniform(0.3, 0.7)), rng)
        image = _paper_photo(ink, rng, rng.uniform(150, 240), rng.uniform(10, 90), rng.uniform(0, 4), 0.3)
        return encode(image, "JPEG", quality=int(rng.integers(5, 20))), ".jpg"
    if style == "speckled":
        page = (int(rng.integers(250, 800)), int(rng.integers(250, 800)))
        height = int(min(page) * rng.uniform(0.4, 0.8))
        ink = _digit_on_page(digit, page, height, rng, (0.2, 0.4))
        array = np.asarray(_paper_photo(ink, rng, rng.uniform(150, 240), rng.uniform(0, 60), 1.0, 0.1, tint=False).convert("L"))
        hits = rng.random(page) < rng.choice([0.01, 0.05, 0.1, 0.2])
        array = np.where(hits, rng.choice(np.array([0, 255], dtype=np.uint8), page), array)
        return encode(Image.fromarray(array.astype(np.uint8))), ".png"
    raise ValueError(f"unknown style {style!r}")


def _texture(shape: tuple[int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Paper grain: noise summed over a few spatial scales, about `amplitude` levels (std)."""
    h, w = shape
    total = np.zeros(shape, dtype=np.float32)
    for scale in (1, 3, 9, 27):
        small = rng.normal(0, 1, (max(2, h // scale), max(2, w // scale))).astype(np.float32)
        total += np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC), dtype=np.float32)
    return total * amplitude / max(float(total.std()), 1e-6)


def blank_picture(kind: str, seed: int) -> tuple[bytes, str]:
    """A picture with no digit in it (of `BLANK_KINDS`); returns (bytes, suffix).

    uniform: one grey or colour, black and white included; gaussian_noise and salt_pepper: noisy
    paper (also uniform 0..255 noise and colour noise); gradient: a linear light gradient up to the
    full 0..255 range; vignette: a bright centre or dark corners; soft_shadow: a shadow with a soft
    edge; jpeg_photo: a phone photo of empty paper (tint, light, noise, JPEG); low_quality_jpeg: the
    same at JPEG quality 3-20 (blocks); transparent: an empty canvas export (RGBA, LA, palette); texture:
    grained paper; dust: clean paper with up to 30 specks of dust 1-4 px across; tiny: an 8-40 px blank.
    """
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(200, 900)), int(rng.integers(200, 900))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    level = float(rng.choice([0, 30, 128, 200, 235, 255]))
    if kind == "uniform":
        if rng.random() < 0.5:
            return _save(Image.new("L", (w, h), int(level)), rng, jpeg=False)
        return _save(Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3))), rng, jpeg=rng.random() < 0.5)
    if kind == "gaussian_noise":
        choice = rng.random()
        if choice < 0.2:  # every pixel anything: uniform noise
            return encode(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))), ".png"
        if choice < 0.4:  # colour noise
            array = rng.normal(rng.uniform(60, 200, 3), rng.uniform(5, 40), (h, w, 3))
            return _save(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB"), rng, jpeg=rng.random() < 0.3)
        array = rng.normal(rng.uniform(40, 220), rng.uniform(2, 40), (h, w))
        return _save(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), rng, jpeg=rng.random() < 0.3)
    if kind == "salt_pepper":
        array = np.full((h, w), rng.uniform(60, 230), dtype=np.float32)
        density = rng.choice([0.005, 0.02, 0.05, 0.1, 0.2])
        hits = rng.random((h, w)) < density
        array[hits] = rng.choice([0.0, 255.0], int(hits.sum()))
        return _save(Image.fromarray(array.astype(np.uint8)), rng, jpeg=False)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xx / w + np.sin(angle) * yy / h
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        low, high = sorted(rng.uniform(0, 255, 2)) if rng.random() < 0.6 else (0.0, 255.0)
        array = low + (high - low) * ramp + rng.normal(0, rng.uniform(0, 3), (h, w))
        return _save(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), rng, jpeg=rng.random() < 0.3)
    if kind == "vignette":
        radius = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2
        centre, edge = rng.uniform(150, 250), rng.uniform(40, 200)
        array = edge + (centre - edge) * np.clip(np.cos(np.clip(radius, 0, 1) * np.pi / 2), 0, 1) ** rng.uniform(1, 4)
        array += rng.normal(0, rng.uniform(0, 3), (h, w))
        return _save(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), rng, jpeg=rng.random() < 0.5)
    if kind == "soft_shadow":
        paper = np.full((h, w), rng.uniform(170, 245), dtype=np.float32)
        array = paper * _lighting(h, w, rng, rng.uniform(0.2, 0.4)) + rng.normal(0, rng.uniform(0.5, 3), (h, w))
        return _save(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), rng, jpeg=rng.random() < 0.5)
    if kind == "jpeg_photo":
        big = (int(rng.integers(900, 3000)), int(rng.integers(900, 3000)))
        image = _paper_photo(np.zeros(big, dtype=np.float32), rng, rng.uniform(150, 245), 0, rng.uniform(1, 6),
                             rng.uniform(0.1, 0.4))
        return _save(image, rng, jpeg=True)
    if kind == "low_quality_jpeg":
        paper = np.full((h, w, 3), rng.uniform(120, 245), dtype=np.float32) - rng.uniform(0, 20, 3)
        array = paper * _lighting(h, w, rng, rng.uniform(0.1, 0.4))[..., None] + rng.normal(0, rng.uniform(0, 4), (h, w, 3))
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")
        return encode(image, "JPEG", quality=int(rng.integers(3, 20))), ".jpg"
    if kind == "transparent":
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        choice = int(rng.integers(0, 4))
        if choice == 0:
            return encode(Image.new("RGBA", (w, h), (0, 0, 0, 0))), ".png"
        if choice == 1:
            return encode(Image.new("RGBA", (w, h), colour + (0,))), ".png"
        if choice == 2:
            return encode(Image.new("LA", (w, h), (int(level), 0))), ".png"
        palette = Image.new("P", (w, h), 0)
        return encode(palette, transparency=0), ".png"
    if kind == "texture":
        array = rng.uniform(120, 235) + _texture((h, w), rng, rng.uniform(2, 10))
        array = array * _lighting(h, w, rng, rng.uniform(0, 0.2))
        return _save(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), rng, jpeg=rng.random() < 0.5)
    if kind == "dust":
        image = Image.fromarray(np.clip(rng.normal(rng.uniform(170, 250), rng.uniform(0.5, 3), (h, w)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 30))):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, 2.0)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.uniform(0, 150)))
        return _save(image, rng, jpeg=rng.random() < 0.5)
    if kind == "tiny":
        side = int(rng.integers(8, 41))
        array = np.full((side, side), level) + rng.normal(0, rng.uniform(0, 4), (side, side))
        return encode(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))), ".png"
    raise ValueError(f"unknown kind {kind!r}")
