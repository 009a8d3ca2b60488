"""`load_dataset(config.data)`: the one entry point every command uses to get data."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig
from .folders import load_folder
from .mnist import MNIST_CLASSES, load_mnist
from .tensors import ImageTensors


@dataclass
class Dataset:
    name: str
    train: ImageTensors
    test: ImageTensors
    classes: list[str]
    preprocess_kind: str  # "digit" for MNIST-style data, "resize" for everything else

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.train.images.shape
        return (c, h, w)


def load_dataset(config: DataConfig, seed: int = 0, progress: bool = True) -> Dataset:
    if config.dataset == "mnist":
        train, test = load_mnist(config.root)
        if config.channels == 3:
            train = ImageTensors(train.images.expand(-1, 3, -1, -1).contiguous(), train.labels)
            test = ImageTensors(test.images.expand(-1, 3, -1, -1).contiguous(), test.labels)
        return Dataset("mnist", train, test, list(MNIST_CLASSES), "digit")
    path = config.dataset[len("folder:"):]
    train, test, classes, _ = load_folder(path, config.image_size or 32, config.channels, config.val_fraction, seed, progress)
    return Dataset(config.dataset, train, test, classes, "resize")
