"""MNIST through torchvision, held in memory as uint8 tensors.

The data root comes from `--data-root`, else `$CNNLAB_DATA`, else `~/.cache/cnnlab`.
The IDX files are read directly with numpy (torchvision is only imported to download: importing
it costs more than a second, a large share of a 10-second training run). torchvision downloads
the files when they are missing and the machine has internet;
`CNNLAB_OFFLINE=1` (tests set it) forbids trying. Missing data without network is one clear
`CnnlabError` naming the folder and the files expected.
"""

from __future__ import annotations

import math
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
    raw = folder / "MNIST" / "raw"
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte", ndim=3)  # (N, 28, 28) uint8
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte", ndim=1)  # (N,) uint8
        if images.shape[0] != labels.shape[0]:
            raise CnnlabError(f"cannot read MNIST from {raw}: {prefix} has {images.shape[0]} images "
                              f"but {labels.shape[0]} labels")
        splits.append(ImageTensors(images.unsqueeze(1).contiguous(), labels.to(torch.int64)))
    return splits[0], splits[1]


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An uncompressed (or .gz) IDX file of uint8 values as a tensor.

    IDX: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, one big-endian
    int32 per dimension, then the values.
    """
    import numpy as np

    try:
        if path.exists():
            data = path.read_bytes()
        else:
            import gzip

            data = gzip.decompress(Path(f"{path}.gz").read_bytes())
    except (OSError, EOFError) as exc:
        raise CnnlabError(f"cannot read MNIST file {path}: {exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise CnnlabError(f"{path}: not an IDX file of uint8 values with {ndim} dimension(s)")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if len(data) != header + math.prod(shape):
        raise CnnlabError(f"{path}: expected {math.prod(shape):,} values after the header, "
                          f"found {len(data) - header:,} (truncated or corrupt file?)")
    # bytearray: a writable buffer, so torch does not warn (and may later modify in place)
    return torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape))


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
