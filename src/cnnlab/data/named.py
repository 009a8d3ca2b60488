"""Datasets by name: mnist, fashion-mnist, kmnist, cifar10, cifar100 and svhn, in torchvision's layout.

Where the files are looked for, in order: `--data-root` (else `$CNNLAB_DATA`), then the cache
(`$CNNLAB_CACHE`, default ~/.cache/cnnlab). Each place holds them as torchvision's dataset classes
do, so a folder that torchvision made (or filled) works as it is:

    ROOT/MNIST/raw/train-images-idx3-ubyte ...       (FashionMNIST/raw, KMNIST/raw alike; .gz too)
    ROOT/cifar-10-batches-py/data_batch_1 ...        ROOT/cifar-100-python/train, test, meta
    ROOT/train_32x32.mat, ROOT/test_32x32.mat        (SVHN)

When no place holds them and downloads are allowed (`CNNLAB_OFFLINE` unset), torchvision downloads
them into the cache. Otherwise the error names the files and the folder expected.

The MNIST family is read straight from its IDX files (no torchvision import, which costs a second).
CIFAR's python batches are pickles: they are read only through torchvision, which checks every
file's MD5 against the published archive's before it unpickles anything (`CIFAR10._check_integrity`),
so the only pickles ever loaded are the published ones. SVHN's .mat files need scipy.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CnnlabError
from ..runtime import cache_root, downloads_allowed
from .catalog import NAMED_DATASETS, NamedDataset
from .tensors import ImageTensors

def search_roots(root: str | None = None) -> list[Path]:
    """Where a named dataset is looked for: `root` (else $CNNLAB_DATA), then the cache."""
    given = root or os.environ.get("CNNLAB_DATA")
    roots = [Path(given).expanduser()] if given else []
    cache = cache_root()
    return roots + ([cache] if cache not in roots else [])


def found_root(name: str, root: str | None = None) -> str | None:
    """The folder (absolute) where named dataset `name` is found through `root` or $CNNLAB_DATA, or
    None (not a named dataset, or found only in the cache, which is searched anyway). A run remembers
    it, so that `evaluate RUN` finds the data in a shell without the CNNLAB_DATA that trained it."""
    spec = NAMED_DATASETS.get(name)
    if spec is None:
        return None
    cache = cache_root()
    found = next((r for r in search_roots(root) if r != cache and spec.present_in(r)), None)
    return str(found.resolve()) if found is not None else None


def load_named(name: str, root: str | None = None) -> tuple[ImageTensors, ImageTensors, list[str]]:
    """(train, test, classes) of a named dataset: uint8 (N, C, H, W) images and int64 labels."""
    spec = NAMED_DATASETS[name]
    roots = search_roots(root)
    found = next((r for r in roots if spec.present_in(r)), None)
    if found is None:
        reason = _download(spec, cache_root()) if downloads_allowed() else "downloads are off (CNNLAB_OFFLINE is set)"
        found = cache_root() if spec.present_in(cache_root()) else None
        if found is None:
            elsewhere = f" nor in {', '.join(str(spec.folder_in(r)) for r in roots[1:])}" if len(roots) > 1 else ""
            holder = spec.folder or " and ".join(spec.files)
            raise CnnlabError(f"{name} not found in {spec.folder_in(roots[0])}{elsewhere} (expected {', '.join(spec.files)}) "
                              f"and {reason}; pass --data-root or set CNNLAB_DATA to the folder that holds {holder}")
    if spec.reader == "idx":
        train, test = _read_idx_pair(spec.folder_in(found), "train"), _read_idx_pair(spec.folder_in(found), "t10k")
        return train, test, list(spec.classes)
    return _read_with_torchvision(spec, found)


def _read_idx_pair(folder: Path, prefix: str) -> ImageTensors:
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte", ndim=3)  # (N, 28, 28) uint8
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte", ndim=1)  # (N,) uint8
    if images.shape[0] != labels.shape[0]:
        raise CnnlabError(f"cannot read {folder}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels")
    return ImageTensors(images.unsqueeze(1).contiguous(), labels.to(torch.int64))


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An uncompressed (or .gz) IDX file of uint8 values as a tensor.

    IDX: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, one big-endian
    int32 per dimension, then the values.
    """
    import math

    import numpy as np

    try:
        if path.exists():
            data = path.read_bytes()
        else:
            import gzip

            data = gzip.decompress(Path(f"{path}.gz").read_bytes())
    except (OSError, EOFError) as exc:
        raise CnnlabError(f"cannot read {path}: {exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise CnnlabError(f"{path}: not an IDX file of uint8 values with {ndim} dimension(s)")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if len(data) != header + math.prod(shape):
        raise CnnlabError(f"{path}: expected {math.prod(shape):,} values after the header, "
                          f"found {len(data) - header:,} (truncated or corrupt file?)")
    # bytearray: a writable buffer, so torch does not warn (and may later modify in place)
    return torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape))


def _read_with_torchvision(spec: NamedDataset, root: Path) -> tuple[ImageTensors, ImageTensors, list[str]]:
    import numpy as np
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    splits = []
    for train in (True, False):
        try:
            if spec.reader == "svhn":
                dataset = cls(str(root), split="train" if train else "test", download=False)
                images, labels = dataset.data, dataset.labels                      # (N, 3, 32, 32), (N,)
            else:
                # torchvision checks every file's MD5 before it unpickles anything
                dataset = cls(str(root), train=train, download=False)
                images, labels = dataset.data.transpose(0, 3, 1, 2), dataset.targets  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        except ImportError as exc:
            raise CnnlabError(f"{spec.name}: reading {', '.join(spec.files)} needs the Python package "
                              f"{exc.name or 'scipy'}, which is not installed (pip install {exc.name or 'scipy'})") from None
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            raise CnnlabError(_integrity_error(spec, root)) from None
        splits.append(ImageTensors(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                                   torch.as_tensor(np.asarray(labels), dtype=torch.int64)))
    classes = list(spec.classes) or [str(c) for c in dataset.classes]
    return splits[0], splits[1], classes


def _integrity_error(spec: NamedDataset, root: Path) -> str:
    """Which file failed torchvision's checksum, in one line."""
    from torchvision.datasets.utils import check_integrity

    import torchvision.datasets as tvd

    folder = spec.folder_in(root)
    cls = getattr(tvd, spec.torchvision_class)
    if spec.reader == "svhn":
        checksums = {name: md5 for _, name, md5 in cls.split_list.values()}
    else:
        checksums = {name: md5 for name, md5 in cls.train_list + cls.test_list}
        checksums[cls.meta["filename"]] = cls.meta["md5"]
    bad = next((name for name in spec.files if not check_integrity(str(folder / name), checksums.get(name))), None)
    which = f"{folder / bad} is not the published file" if bad else f"the files in {folder} are not the published ones"
    return (f"{spec.name}: {which} (its MD5 checksum differs: truncated, or another version); "
            "delete it and let cnnlab download it again, or copy the original")


def _download(spec: NamedDataset, cache: Path) -> str:
    """Download through torchvision into `cache`; returns what happened, for the error message."""
    try:
        import torchvision.datasets as tvd

        cache.mkdir(parents=True, exist_ok=True)
        cls = getattr(tvd, spec.torchvision_class)
        for train in (True, False):
            if spec.reader == "svhn":
                cls(str(cache), split="train" if train else "test", download=True)
            else:
                cls(str(cache), train=train, download=True)
        return "it was downloaded"
    except ImportError:  # SVHN without scipy: the files arrived; reading them says what is missing
        return "it was downloaded"
    except Exception as exc:  # no network, no permission, a mirror down: all mean "not available"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"it could not be downloaded ({text[:120]})"
