"""`load_dataset(config.data)`: the one entry point every command uses to get data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import CnnlabError
from .archives import unpacked_folder
from .folders import load_folder, to_grey
from .catalog import NAMED_DATASETS
from .named import load_named
from .tensors import ImageTensors


@dataclass
class Dataset:
    name: str
    train: ImageTensors
    test: ImageTensors
    classes: list[str]
    preprocess_kind: str  # "digit" for MNIST, "resize" for everything else

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.train.images.shape
        return (c, h, w)


def load_dataset(config: DataConfig, seed: int = 0, progress: bool = True) -> Dataset:
    """The dataset `config.dataset` names: a dataset by name (`mnist`, `cifar10`, ...) or `folder:PATH`."""
    if config.dataset in NAMED_DATASETS:
        spec = NAMED_DATASETS[config.dataset]
        train, test, classes = load_named(spec.name, config.root)
        train, test = (_fit_images(split, config.channels, config.image_size) for split in (train, test))
        return Dataset(spec.name, train, test, classes, spec.preprocess_kind)
    path = Path(config.dataset[len("folder:"):]).expanduser()
    if path.is_file():
        path = unpacked_folder(path)
    train, test, classes, _ = load_folder(path, config.image_size or 32, config.channels, config.val_fraction, seed, progress)
    return Dataset(config.dataset, train, test, classes, "resize")


def _fit_images(data: ImageTensors, channels: int | None, size: int | None) -> ImageTensors:
    """A named dataset's images with the channels and size the config asks for (default: as they are)."""
    if channels == 3 and data.images.shape[1] == 1:
        data = ImageTensors(data.images.expand(-1, 3, -1, -1).contiguous(), data.labels)
    elif channels == 1 and data.images.shape[1] == 3:
        data = to_grey(data)
    if size is not None and tuple(data.images.shape[2:]) != (size, size):
        data = ImageTensors(resize_images(data.images, size), data.labels)
    return data


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialiasing, in chunks."""
    if images.shape[2] != images.shape[3]:
        raise CnnlabError(f"cannot resize {images.shape[2]}x{images.shape[3]} images to a square without cropping")
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], 4096):
        chunk = images[start:start + 4096].float()
        resized = torch.nn.functional.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                                                  align_corners=False)
        out[start:start + 4096] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out
