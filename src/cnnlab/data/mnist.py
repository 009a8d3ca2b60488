"""MNIST, held in memory as uint8 tensors: the first of the datasets by name (see `named.py`).

The data root comes from `--data-root`, else `$CNNLAB_DATA`, else the cache (~/.cache/cnnlab).
The IDX files are read directly with numpy (torchvision is only imported to download: importing
it costs more than a second, a large share of a 10-second training run).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..runtime import cache_root
from .catalog import IDX_FILES, NAMED_DATASETS
from .named import load_named, read_idx
from .tensors import ImageTensors

MNIST_FILES = IDX_FILES
MNIST_CLASSES = list(NAMED_DATASETS["mnist"].classes)

__all__ = ["MNIST_CLASSES", "MNIST_FILES", "data_root", "load_mnist", "read_idx"]


def data_root(root: str | None = None) -> Path:
    """The folder holding `MNIST/raw`: the argument, else $CNNLAB_DATA, else the cache."""
    return Path(root or os.environ.get("CNNLAB_DATA") or cache_root()).expanduser()


def load_mnist(root: str | None = None) -> tuple[ImageTensors, ImageTensors]:
    """(train, test) MNIST as uint8 (N, 1, 28, 28) images and int64 labels."""
    train, test, _ = load_named("mnist", root)
    return train, test
