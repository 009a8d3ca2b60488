"""The one preprocessing definition stored with every model.

Training, `cnnlab predict`, the HTTP API and the drawing page all turn an image into the
model's input through `Preprocessing`: the same PIL steps (`image_to_uint8`) and the same
normalisation (`normalize`). The definition is saved in the checkpoint's metadata. The colour
mode comes from `colour.py` (`to_mode`).

Kinds:
- `digit`: MNIST-style, the way MNIST itself was made: finding the digit is `digits.py`'s job
  (`digit_to_mnist`: grey, a blank picture refused with `NoDigitFound`, cropped to the ink,
  fitted into 20x20 and centred by centre of mass in 28x28).
- `resize`: natural images. Grey or RGB, resize the shorter side, centre-crop to the input size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import CnnlabError
from .colour import to_mode
from .decode import resized_size
from .digits import digit_to_mnist
from .tensors import normalize, stats_tensors

__all__ = ["Preprocessing", "digit_to_mnist", "resize_center_crop", "to_mode"]


@dataclass
class Preprocessing:
    """How an image becomes the model's input: the kind of pipeline, input size and normalisation."""

    kind: str                      # "digit" or "resize"
    channels: int                  # 1 or 3
    size: tuple[int, int]          # (H, W) of the model input
    mean: list[float] = field(default_factory=list)   # per channel, 0..1 scale
    std: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able form, as stored in a checkpoint's metadata."""
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "Preprocessing":
        """Read and validate the metadata form; a malformed one is a `CnnlabError`."""
        try:
            prep = cls(kind=str(raw["kind"]), channels=int(raw["channels"]), size=(int(raw["size"][0]), int(raw["size"][1])),
                       mean=[float(v) for v in raw["mean"]], std=[float(v) for v in raw["std"]])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CnnlabError(f"preprocessing metadata is incomplete or malformed ({exc})") from None
        if prep.kind not in ("digit", "resize") or prep.channels not in (1, 3) or len(prep.mean) != prep.channels \
                or len(prep.std) != prep.channels or min(prep.std) <= 0 or min(prep.size) < 1:
            raise CnnlabError(f"preprocessing metadata is inconsistent: {raw}")
        return prep

    def image_to_uint8(self, image: Image.Image) -> torch.Tensor:
        """A PIL image of any mode and size -> the model's uint8 input (C, H, W), before normalising."""
        if self.kind == "digit":
            array = torch.from_numpy(digit_to_mnist(image, self.size)).unsqueeze(0)  # (1, H, W)
            # MNIST trained as RGB (channels 3) sees the grey digit in all three channels.
            return array.expand(self.channels, -1, -1).contiguous()
        # numpy's transpose, not torch's permute: the same bytes, without a tensor op's dispatch on each small image
        array = resize_center_crop(image, self.size, self.channels)  # (H, W, C)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def stats(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, C, 1, 1) tensors on `device`, for `tensors.normalize`."""
        return stats_tensors(self.mean, self.std, device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32, on the images' device."""
        return normalize(images, *self.stats(images.device))


def resize_center_crop(image: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """Resize the shorter side to fit `size`, centre-crop; returns (H, W, C) uint8."""
    image = to_mode(image, channels)
    h, w = size
    new = resized_size(image.width, image.height, size)  # the size the image door checked before decoding
    if new != image.size:
        image = image.resize(new, Image.BILINEAR, reducing_gap=3.0)
    if image.size != (w, h):
        left, top = (image.width - w) // 2, (image.height - h) // 2
        image = image.crop((left, top, left + w, top + h))
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy shares it
    return array[:, :, None] if array.ndim == 2 else array
