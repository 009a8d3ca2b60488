"""Any folder of images: one sub-folder per class, decoded once into uint8 tensors and cached.

Layouts:
- `PATH/train/<class>/*`, with `PATH/test/<class>/*` for testing and `PATH/val/<class>/*` (or
  `valid/`, `validation/`) for validation, each optional: a split without its folder is held out of
  the training images (a seeded fraction of each class: `data.test_fraction` for testing here,
  `data.val_fraction` for validation in `datasets.py`);
- `PATH/<class>/*`: the same, all splits held out of the class folders.

Images of any size are resized (shorter side) and centre-cropped to the input size by the same
`resize_center_crop` that `predict` uses. Files that cannot be decoded are skipped, each named
in a warning (the first few; the rest counted), with a count at the end; an image over the
decoded-size budget (`data.max_decoded_mb`, checked from its header) stops with an error naming it,
unless `data.skip_bad` skips it too. Decoding is done once: the tensors are cached as
safetensors under `$CNNLAB_CACHE` (default ~/.cache/cnnlab/folders), keyed by the files' names,
sizes and modification times and the input size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import CnnlabError, first_line, shorten
from ..runtime import cache_root
from .decode import HEADER_SIZE, BadImage, ImageTooLarge, OutOfMemory, header_mode, limit_bytes, open_image
from .preprocess import Preprocessing, resize_center_crop
from .tensors import ImageTensors

TEST_NAMES = ("test",)
VAL_NAMES = ("val", "valid", "validation")
CACHE_VERSION = 3  # bumped when what the cache holds changes (2: val split, size and mode statistics; 3: sizes are
# the smallest and largest image, not the corners of their bounding box)


def cache_dir() -> Path:
    return cache_root() / "folders"


def _class_folders(path: Path) -> list[Path]:
    """The sub-folders of `path`, less hidden ones and links back to `path` or above it: a link to the
    dataset's own root would make a class of copies of every image."""
    folders = []
    for p in sorted(path.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.is_symlink() and _loops_back(p, path):
            print(f"warning: skipping {p}: a symbolic link to the dataset folder itself (or a folder above it)",
                  file=sys.stderr)
            continue
        folders.append(p)
    return folders


def _loops_back(link: Path, parent: Path) -> bool:
    target, parent = link.resolve(), parent.resolve()
    return target == parent or target in parent.parents


def _files(folder: Path) -> list[Path]:
    """The files under `folder`, hidden ones left out. A dangling symbolic link is kept: decoding it
    gives the warning that names it, where leaving it out would lose an image without a word."""
    return sorted(p for p in folder.rglob("*") if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and not p.name.startswith("."))


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def looks_grey(path: Path, sample: int = 24) -> bool:
    """Whether a folder of class folders holds grey images: the modes of up to `sample` files spread over its classes,
    read from their headers (nothing is decoded), most of them grey. Archives and unreadable files count as colour."""
    root = path / "train" if (path / "train").is_dir() else path
    if not root.is_dir():
        return False
    classes = _class_folders(root)
    per_class = max(1, sample // max(1, len(classes)))
    files = [f for folder in classes for f in sorted(p for p in folder.iterdir() if p.is_file())[:per_class]][:sample]
    grey = sum(header_mode(file) in GREY_MODES for file in files)  # not an image: None, the loader names it later
    return bool(files) and grey > len(files) / 2


TOO_LARGE = "too large: "  # the start of the reason `_decode` gives for an image over the decoded-size budget
NO_MEMORY = "out of memory: "  # ... and for one that ran out of memory: a fault of the moment, never cached


def _decode(args: tuple[str, int, int]) -> tuple[np.ndarray, tuple[int, int], str] | str:
    """Decode one file through the image door to ((S, S, 3) uint8, its size, its mode), or return the
    reason it failed (starting with `TOO_LARGE` when it, or its resized copy, is over `max_bytes`;
    with `NO_MEMORY` when the machine ran out of memory)."""
    path, size, max_bytes = args
    prepared = Preprocessing("resize", 3, (size, size), [0.0] * 3, [1.0] * 3)  # what `resize_center_crop` below does
    try:
        # JPEG: decode at reduced scale when much larger. Tiny images (icons) are still images here.
        image = open_image(path, max_pixels=Image.MAX_IMAGE_PIXELS, draft_side=size * 2, max_decoded_bytes=max_bytes,
                           prepared=prepared, min_side=1, setting="data.max_decoded_mb")
        with image:
            return resize_center_crop(image, (size, size), 3), image.info[HEADER_SIZE], image.mode
    except (OutOfMemory, MemoryError):
        return NO_MEMORY + "the machine ran out of memory decoding it (tried again next time)"
    except ImageTooLarge as exc:
        return TOO_LARGE + str(exc)
    except BadImage as exc:
        return str(exc)
    except Exception as exc:  # a converter failing after a good decode: skip this file too
        return f"{type(exc).__name__}: {str(exc)[:100]}"


def _decode_all(files: list[Path], size: int, progress: bool, max_bytes: int, skip_bad: bool
                ) -> tuple[list[np.ndarray | None], list[str], dict[str, Any]]:
    jobs = [(str(f), size, max_bytes) for f in files]
    workers = max(1, min(os.cpu_count() or 1, 8))
    results: list = []
    if len(jobs) > 2000 and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            iterator = pool.map(_decode, jobs, chunksize=256)
            results = list(_progress(iterator, len(jobs), progress))
    else:
        results = [_decode(job) for job in _progress(jobs, len(jobs), progress)]
    skipped = []
    arrays: list[np.ndarray | None] = []
    sizes: list[tuple[int, int]] = []
    modes: dict[str, int] = {}
    reasons: list[str] = []
    out_of_memory = 0
    for f, result in zip(files, results):
        out_of_memory += isinstance(result, str) and result.startswith(NO_MEMORY)
        if isinstance(result, str) and result.startswith(TOO_LARGE) and not skip_bad:
            raise CnnlabError(f"{f}: {result[len(TOO_LARGE):]}; raise data.max_decoded_mb, or skip such images "
                              "with data.skip_bad: true")
        if isinstance(result, str):
            reasons.append(f"{f}: {result}")
            skipped.append(str(f))
            arrays.append(None)
        else:
            arrays.append(result[0])
            sizes.append(result[1])
            modes[result[2]] = modes.get(result[2], 0) + 1
    _warn_skipped(reasons)
    # The smallest and the largest image (by pixels), each as it is: the corners of a bounding box
    # would describe images nobody has (30000x1 and 1x30000 are not "1x1 to 30000x30000").
    smallest, largest = (min(sizes, key=_area), max(sizes, key=_area)) if sizes else ((), ())
    stats = {"sizes": [*smallest, *largest], "modes": modes, "out_of_memory": out_of_memory}
    return arrays, skipped, stats


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


SHOWN_SKIPS = 5  # skipped files named one by one; the rest are counted


def _warn_skipped(reasons: list[str]) -> None:
    """The first few skipped files, each with its reason, then one line for the rest (a folder of
    100,000 broken files must not print 100,000 lines)."""
    for reason in reasons[:SHOWN_SKIPS]:
        print(f"warning: skipping {reason}", file=sys.stderr)
    if len(reasons) > SHOWN_SKIPS:
        print(f"warning: ... and {len(reasons) - SHOWN_SKIPS:,} more file(s) skipped", file=sys.stderr)


def _progress(iterable, total: int, show: bool):
    if show and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc="decoding images", unit="img", leave=False)
    return iterable


def _to_tensors(arrays: list[np.ndarray | None], labels: list[int]) -> ImageTensors:
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        return ImageTensors(torch.zeros((0, 3, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    images = torch.from_numpy(np.stack([arrays[i] for i in keep])).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, torch.tensor([labels[i] for i in keep], dtype=torch.int64))


@dataclass
class FolderData:
    """A decoded folder: its splits (val None without a val/ folder), class names, channels, and what the
    files were like before resizing (for warnings)."""

    train: ImageTensors
    test: ImageTensors
    val: ImageTensors | None
    classes: list[str]
    channels: int
    stats: dict[str, Any]  # {"sizes": [min w, min h, max w, max h], "modes": {mode: count}, "skipped": n}


def load_folder(path: str | Path, image_size: int = 32, channels: int | None = None, test_fraction: float = 0.1,
                seed: int = 0, progress: bool = True, max_decoded_mb: float | None = None,
                skip_bad: bool = False) -> FolderData:
    """A folder of class folders (or train/, test/, val/ folders of them), decoded.

    An image over `max_decoded_mb` once decoded (`data.decode`, read from its header) is an error
    naming it, or skipped like an unreadable file with `skip_bad`."""
    max_bytes = limit_bytes(max_decoded_mb)
    root = Path(path).expanduser()
    # A relative folder is taken from the current folder: say which one (a run trained elsewhere names it relatively)
    shown = str(root) if root.is_absolute() else f"{root} (here: {root.resolve()})"
    if not root.is_dir():
        raise CnnlabError(f"dataset folder {shown} does not exist")
    split_dirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    test_dir = next((split_dirs[n] for n in TEST_NAMES if n in split_dirs), None)
    val_dir = next((split_dirs[n] for n in VAL_NAMES if n in split_dirs), None)
    if "train" in split_dirs and (test_dir is not None or val_dir is not None):
        classes = [p.name for p in _class_folders(split_dirs["train"])]
        if not classes:
            raise CnnlabError(f"{split_dirs['train']}: no class folders inside")
        for other in (test_dir, val_dir):
            missing = sorted({p.name for p in _class_folders(other)} - set(classes)) if other is not None else []
            if missing:
                raise CnnlabError(f"{other}: class folder {shorten(missing[0])} has no counterpart in {split_dirs['train']}")
        train_files = [(f, classes.index(c.name)) for c in _class_folders(split_dirs["train"]) for f in _files(c)]
        if test_dir is not None:
            test_files = [(f, classes.index(c.name)) for c in _class_folders(test_dir) for f in _files(c)]
        else:
            train_files, test_files = _hold_out(train_files, len(classes), test_fraction, seed)
        val_files = [(f, classes.index(c.name)) for c in _class_folders(val_dir) for f in _files(c)] if val_dir else []
    else:
        class_dirs = _class_folders(root)
        if len(class_dirs) < 2:
            raise CnnlabError(f"{shown}: expected one sub-folder per class (at least 2), or train/ and test/ folders holding them")
        classes = [c.name for c in class_dirs]
        files = [(f, label) for label, folder in enumerate(class_dirs) for f in _files(folder)]
        train_files, test_files = _hold_out(files, len(classes), test_fraction, seed)
        val_files = []
    if not train_files:
        raise CnnlabError(f"{root}: no image files found in the class folders")

    all_files = [f for f, _ in train_files + test_files + val_files]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, str(root.resolve()), image_size, test_fraction, seed, max_bytes, skip_bad,
                                     [(str(f), *_stamp(f)) for f in all_files]]).encode()).hexdigest()[:24]
    cached = _read_cache(key)
    if cached is None:
        arrays, skipped, stats = _decode_all(all_files, image_size, progress, max_bytes, skip_bad)
        n_train, n_test = len(train_files), len(test_files)
        train = _to_tensors(arrays[:n_train], [label for _, label in train_files])
        test = _to_tensors(arrays[n_train:n_train + n_test], [label for _, label in test_files])
        val = _to_tensors(arrays[n_train + n_test:], [label for _, label in val_files]) if val_files else None
        if skipped:
            print(f"warning: skipped {len(skipped)} file(s) of {len(all_files)} (unreadable, or over data.max_decoded_mb)",
                  file=sys.stderr)
        if len(train) == 0:
            raise CnnlabError(f"{root}: none of the {len(train_files)} training files could be decoded as an image")
        if stats.pop("out_of_memory"):  # the machine's fault of the moment: decode those files again next time
            print("warning: the decode is not cached, since some files were skipped for lack of memory", file=sys.stderr)
        else:
            _write_cache(key, train, test, val, skipped, stats)
    else:
        train, test, val, skipped, stats = cached
        if skipped:
            print(f"warning: skipped {len(skipped)} unreadable file(s) of {len(all_files)} (cached decode; first: {skipped[0]})",
                  file=sys.stderr)
    # Grey if every decoded pixel has R == G == B, unless the config says otherwise.
    if channels is None:
        channels = 1 if all(is_grey(s.images) for s in (train, test, val) if s is not None) else 3
    if channels == 1:
        train, test = to_grey(train), to_grey(test)
        val = to_grey(val) if val is not None else None
    return FolderData(train, test, val, classes, channels, {**stats, "skipped": len(skipped)})


def _stamp(path: Path) -> tuple[int, int]:
    """(size, modification time) for the cache key; a dangling link's own, so it is keyed too."""
    try:
        info = path.stat()
    except OSError:
        info = path.lstat()
    return info.st_size, info.st_mtime_ns


def _hold_out(files: list[tuple[Path, int]], num_classes: int, fraction: float,
              seed: int) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(kept, held out): a seeded `fraction` of each class's files held out (at least one of a class of 2+)."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for label in range(num_classes):
        mine = [item for item in files if item[1] == label]
        order = torch.randperm(len(mine), generator=generator).tolist()
        n_held = max(1, round(len(mine) * fraction)) if len(mine) > 1 else 0
        held += [mine[i] for i in order[:n_held]]
        kept += [mine[i] for i in order[n_held:]]
    return kept, held


def is_grey(images: torch.Tensor) -> bool:
    """True if every pixel of the uint8 (N, 3, H, W) images has R == G == B."""
    return bool(images.shape[0] == 0 or (torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])))


def to_grey(data: ImageTensors) -> ImageTensors:
    """RGB images -> one grey channel."""
    if data.images.shape[0] == 0:
        return ImageTensors(data.images[:, :1], data.labels)
    # ITU-R 601 luma, as PIL's convert("L") does
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = (data.images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return ImageTensors(grey, data.labels)


def _read_cache(key: str):
    path = cache_dir() / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        val = ImageTensors(tensors["val_images"], tensors["val_labels"]) if "val_images" in tensors else None
        return (ImageTensors(tensors["train_images"], tensors["train_labels"]),
                ImageTensors(tensors["test_images"], tensors["test_labels"]), val,
                json.loads(meta.get("skipped", "[]")), json.loads(meta.get("stats", "{}")))
    except Exception:  # a damaged cache is only a cache: decode again
        return None


def _write_cache(key: str, train: ImageTensors, test: ImageTensors, val: ImageTensors | None, skipped: list[str],
                 stats: dict[str, Any]) -> None:
    from safetensors.torch import save

    from ..files import atomic_write_bytes

    tensors = {"train_images": train.images, "train_labels": train.labels,
               "test_images": test.images, "test_labels": test.labels}
    if val is not None:
        tensors.update({"val_images": val.images, "val_labels": val.labels})
    try:
        data = save(tensors, metadata={"skipped": json.dumps(skipped), "stats": json.dumps(stats)})
        atomic_write_bytes(cache_dir() / f"{key}.safetensors", data)
    except OSError as exc:
        print(f"warning: could not write the decode cache ({exc}); the folder will be decoded again next time", file=sys.stderr)
