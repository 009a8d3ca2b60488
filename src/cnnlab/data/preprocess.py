"""The one preprocessing definition stored with every model.

Training, `cnnlab predict`, the HTTP API and the drawing page all turn an image into the
model's input through `Preprocessing`: the same PIL steps (`image_to_uint8`) and the same
normalisation (`normalize`). The definition is saved in the checkpoint's metadata.

Kinds:
- `digit`: MNIST-style. Grey, transparent pixels on white, dark-ink-on-light-paper inverted,
  cropped to the ink, scaled to fit 20x20, centred by centre of mass in 28x28.
- `resize`: natural images. Grey or RGB, resize the shorter side, centre-crop to the input size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import CnnlabError


@dataclass
class Preprocessing:
    kind: str                      # "digit" or "resize"
    channels: int                  # 1 or 3
    size: tuple[int, int]          # (H, W) of the model input
    mean: list[float] = field(default_factory=list)   # per channel, 0..1 scale
    std: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "Preprocessing":
        try:
            prep = cls(kind=str(raw["kind"]), channels=int(raw["channels"]), size=(int(raw["size"][0]), int(raw["size"][1])),
                       mean=[float(v) for v in raw["mean"]], std=[float(v) for v in raw["std"]])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CnnlabError(f"preprocessing metadata is incomplete or malformed ({exc})") from None
        if prep.kind not in ("digit", "resize") or prep.channels not in (1, 3) or len(prep.mean) != prep.channels \
                or len(prep.std) != prep.channels or min(prep.std) <= 0:
            raise CnnlabError(f"preprocessing metadata is inconsistent: {raw}")
        return prep

    def image_to_uint8(self, image: Image.Image) -> torch.Tensor:
        """A PIL image of any mode and size -> the model's uint8 input (C, H, W), before normalising."""
        if self.kind == "digit":
            array = digit_to_mnist(image, self.size)
            return torch.from_numpy(array).unsqueeze(0)
        return torch.from_numpy(resize_center_crop(image, self.size, self.channels)).permute(2, 0, 1).contiguous()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32, on the images' device."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L or RGB; transparent pixels are composited on white."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / max(high, 1.0) * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def resize_center_crop(image: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """Resize the shorter side to fit `size`, centre-crop; returns (H, W, C) uint8."""
    image = to_mode(image, channels)
    h, w = size
    scale = max(h / image.height, w / image.width)
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    if new != image.size:
        image = image.resize(new, Image.BILINEAR, reducing_gap=3.0)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    image = image.crop((left, top, left + w, top + h))
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def digit_to_mnist(image: Image.Image, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Any picture of one digit -> (H, W) uint8 the way MNIST was made: white ink on black,
    fitted into a 20x20 box, centred by centre of mass in 28x28."""
    grey = np.asarray(to_mode(image, 1), dtype=np.float32)
    if grey.size == 0:
        return np.zeros(size, dtype=np.uint8)
    # Polarity: the border is background. Light paper (bright border) means dark ink: invert.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > 127:
        grey = 255.0 - grey
    # Stretch contrast so the background is 0 and the strongest ink 255 (photos have grey paper).
    background = np.percentile(border if np.median(border) <= 127 else 255.0 - border, 50)
    grey = np.clip(grey - background, 0, None)
    peak = grey.max()
    if peak < 16:  # an empty canvas: nothing to centre
        return np.zeros(size, dtype=np.uint8)
    grey = grey * (255.0 / peak)
    grey[grey < 0.1 * 255.0] = 0  # paper texture and JPEG noise are not ink
    rows = np.flatnonzero(grey.max(axis=1) > 0)
    cols = np.flatnonzero(grey.max(axis=0) > 0)
    ink = grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    out_h, out_w = size
    box = round(min(out_h, out_w) * 20 / 28)
    scale = box / max(ink.shape)
    new_w, new_h = max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale))
    fitted = np.asarray(Image.fromarray(ink.astype(np.uint8), "L").resize((new_w, new_h), Image.LANCZOS), dtype=np.float32)
    canvas = np.zeros((out_h, out_w), dtype=np.float32)
    total = fitted.sum()
    if total <= 0:
        return np.zeros(size, dtype=np.uint8)
    ys, xs = np.indices(fitted.shape)
    cy, cx = (ys * fitted).sum() / total, (xs * fitted).sum() / total
    top = int(round(out_h / 2 - cy))
    left = int(round(out_w / 2 - cx))
    top = min(max(top, 0), out_h - new_h)
    left = min(max(left, 0), out_w - new_w)
    canvas[top:top + new_h, left:left + new_w] = fitted
    return np.clip(canvas, 0, 255).astype(np.uint8)
