"""`load_dataset(config.data)`: the one entry point every command uses to get data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import DataConfig, folder_path
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
    val: ImageTensors | None = None         # the validation split, when there is one
    split: dict[str, Any] = field(default_factory=dict)   # how val was made (RUN/split.json)
    stats: dict[str, Any] = field(default_factory=dict)   # folders: original sizes, modes, files skipped

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.train.images.shape
        return (c, h, w)


def load_dataset(config: DataConfig, seed: int = 0, progress: bool = True) -> Dataset:
    """The dataset `config.dataset` names (a dataset by name, `mnist`, `cifar10`, ..., or `folder:PATH`),
    with at most `limit_per_class` images of a class per split and a validation split held out of the
    training images when `val_fraction` asks for one (folders: 0.1 by default) and no val/ folder exists."""
    if config.dataset in NAMED_DATASETS:
        spec = NAMED_DATASETS[config.dataset]
        train, test, classes = load_named(spec.name, config.root)
        train, test = (_fit_images(split, config.channels, config.image_size) for split in (train, test))
        data = Dataset(spec.name, train, test, classes, spec.preprocess_kind)
        default_fraction = 0.0
    else:
        path = folder_path(config.dataset)
        archive = path if path.is_file() else None
        if archive is not None:
            path = unpacked_folder(archive)
        try:
            folder = load_folder(path, config.image_size or 32, config.channels, config.test_fraction, seed, progress,
                                 config.max_decoded_mb, config.skip_bad)
        except CnnlabError as exc:
            if archive is None:
                raise
            # name the user's archive, not the cache folder it was unpacked into
            raise CnnlabError(str(exc).replace(str(path), f"{archive}:"), exc.exit_code) from None
        data = Dataset(config.dataset, folder.train, folder.test, folder.classes, "resize", val=folder.val,
                       split={"val": "val/ folder"} if folder.val is not None else {}, stats=folder.stats)
        default_fraction = 0.1
    if config.limit_per_class:
        data.train, data.test = (limit_per_class(s, config.limit_per_class, seed) for s in (data.train, data.test))
        data.val = limit_per_class(data.val, config.limit_per_class, seed) if data.val is not None else None
    fraction = default_fraction if config.val_fraction is None else config.val_fraction
    if data.val is None and fraction > 0:
        keep, held = stratified_split(data.train.labels, fraction, seed)
        if len(held) and len(keep):
            data.train, data.val = data.train.subset(keep), data.train.subset(held)
            data.split = {"val": "held out of the training images", "val_fraction": fraction, "seed": seed,
                          "val_indices": held.tolist()}
    return data


def limit_per_class(data: ImageTensors, limit: int, seed: int) -> ImageTensors:
    """At most `limit` images of each class: the first of a seeded shuffle, in their original order."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    kept, counts = [], {}
    for i in order.tolist():
        label = int(data.labels[i])
        if counts.get(label, 0) < limit:
            counts[label] = counts.get(label, 0) + 1
            kept.append(i)
    return data.subset(torch.tensor(sorted(kept), dtype=torch.int64))


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices: a seeded `fraction` of each class held out (none of a class of one)."""
    generator = torch.Generator().manual_seed(seed + 7919)  # not the test split's draw
    kept, held = [], []
    for label in torch.unique(labels).tolist():
        mine = torch.nonzero(labels == label).flatten()
        order = mine[torch.randperm(len(mine), generator=generator)]
        n_held = round(len(mine) * fraction) if len(mine) > 1 else 0
        if len(mine) > 1 and n_held == 0 and fraction > 0:
            n_held = 1
        held.append(order[:n_held])
        kept.append(order[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


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
