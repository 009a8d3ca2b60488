"""MNIST through torchvision, held in memory as uint8 tensors.

The data root comes from `--data-root`, else `$CNNLAB_DATA`, else `~/.cache/cnnlab`.
torchvision downloads the files when they are missing and the machine has internet;
`CNNLAB_OFFLINE=1` (tests set it) forbids trying. Missing data without network is one clear
`CnnlabError` naming the folder and the files expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CnnlabError
from .tensors import ImageTensors

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_CLASSES = [str(d) for d in range(10)]


def data_root(root: str | None = None) -> Path:
    """The folder holding `MNIST/raw`: the argument, else $CNNLAB_DATA, else ~/.cache/cnnlab."""
    return Path(root or os.environ.get("CNNLAB_DATA") or Path.home() / ".cache" / "cnnlab").expanduser()


def _have_files(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / name).exists() or (raw / f"{name}.gz").exists() for name in MNIST_FILES)


def load_mnist(root: str | None = None) -> tuple[ImageTensors, ImageTensors]:
    """(train, test) MNIST as uint8 (N, 1, 28, 28) images and int64 labels."""
    import torchvision

    folder = data_root(root)
    if not _have_files(folder):
        if os.environ.get("CNNLAB_OFFLINE"):
            reason = "downloads are off (CNNLAB_OFFLINE is set)"
        else:
            reason = _try_download(folder)
        if not _have_files(folder):
            raise CnnlabError(
                f"MNIST not found in {folder / 'MNIST' / 'raw'} (expected {', '.join(MNIST_FILES)}) and {reason}; "
                "pass --data-root or set CNNLAB_DATA to the folder that holds MNIST/raw")
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.MNIST(root=str(folder), train=train, download=False)
        except (RuntimeError, OSError, ValueError) as exc:
            raise CnnlabError(f"cannot read MNIST from {folder / 'MNIST' / 'raw'}: {exc}") from None
        images = ds.data.unsqueeze(1).contiguous()  # (N, 1, 28, 28) uint8
        splits.append(ImageTensors(images, ds.targets.to(torch.int64)))
    return splits[0], splits[1]


def _try_download(folder: Path) -> str:
    import torchvision

    try:
        folder.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            torchvision.datasets.MNIST(root=str(folder), train=train, download=True)
        return "was downloaded"
    except Exception as exc:  # no network, no permission, a mirror down: all mean "not available"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"could not be downloaded ({text[:120]})"
