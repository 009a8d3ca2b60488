"""The pictures of `cnnlab show` that need more than one figure function: their inputs (a dataset,
an image file, a run) found and prepared, with typed arguments. `commands/show.py` is the parser."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import CnnlabError
from ..runs import Run
from .convolution import convolve, demo_image, mnist_test_digit, parse_kernel
from .figures import (
    convolve_figure,
    feature_maps_figure,
    pick_test_image,
    samples_figure,
)

PICTURES = {
    "samples": "a labelled grid of dataset images",
    "convolve": "apply a filter to an image: input, kernel, feature map, ReLU, pooling (RGB: per-channel products)",
    "filters": "a trained model's learned conv filters",
    "feature-maps": "every conv/activation/pool layer's maps for one image through a trained model",
    "curves": "loss and accuracy per epoch of a run",
    "confusion": "the confusion matrix of a run on its test split, as a heatmap",
    "mistakes": "the test images a run's model gets most confidently wrong",
}


def samples_picture(dataset: str = "mnist", data_root: str | None = None, image_size: int | None = None,
                    split: str = "train", count: int = 32, columns: int = 8, seed: int = 0) -> Figure:
    """A labelled grid of `count` random images (chosen by `seed`) of a dataset's `split`."""
    from ..config import DataConfig
    from ..data import load_dataset

    config = DataConfig(dataset=dataset, root=data_root, image_size=image_size)
    data = load_dataset(config, progress=False)
    images = data.train if split == "train" else data.test
    if len(images) == 0:
        raise CnnlabError(f"{dataset}: the {split} split has no images")
    index = _seeded_indices(len(images), min(count, len(images)), seed)
    return samples_figure(images.images[index], images.labels[index], data.classes,
                          f"{data.name}: {len(index)} random {split} images of {len(images):,} "
                          f"({', '.join(data.classes[:10])}{'...' if len(data.classes) > 10 else ''})", columns)


def convolve_picture(image: str | None = None, digit: int = 4, data_root: str | None = None,
                     filters: Sequence[str] = ("sobel-x",), stride: int = 1, padding: int | str = 1,
                     padding_mode: str = "zeros", dilation: int = 1, pool: str = "max", pool_size: int = 2,
                     grey: bool = False) -> Figure:
    """The convolution demo on an image file (or MNIST test digit number `digit`): one filter per
    channel, or one for all (named or as numbers, see `parse_kernel`)."""
    if image:
        pixels = _demo_image_file(image, grey)
        source = Path(image).name
    else:
        pixels, label = mnist_test_digit(digit, data_root)
        source = f"MNIST test digit #{digit} (a {label})"
    parsed = [parse_kernel(text) for text in (filters or ["sobel-x"])]
    names = [name if name != "custom" else "custom kernel" for name, _ in parsed]
    result = convolve(pixels, [kernel for _, kernel in parsed], stride, padding, padding_mode, dilation, pool, pool_size)
    return convolve_figure(result, source, names, pool, pool_size)


def feature_maps_picture(run: Run, image: str | None = None, index: int = 0, maps: int = 8) -> Figure:
    """Every layer's maps (`maps` per layer) for an image file, preprocessed as `predict` does, or
    for test image number `index`."""
    if image:
        from ..predict import BadImage, Predictor

        predictor = Predictor(run)
        path = Path(image).expanduser()
        try:  # decoded and preprocessed exactly as `cnnlab predict` does
            picture = predictor.prepare(predictor.load(path))
        except BadImage as exc:
            raise CnnlabError(f"--image {path}: {exc}") from None
        caption = path.name
    else:
        picture, caption = pick_test_image(run, index)
    return feature_maps_figure(run, picture, caption, maps)


def _seeded_indices(n: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:count]


def _demo_image_file(path: str, grey: bool) -> np.ndarray:
    """The convolve demo's `--image`, decoded by `data.decode.open_image` (its limits and one-line reasons)."""
    from ..data.decode import BadImage, open_image

    try:
        return demo_image(open_image(Path(path).expanduser()), grey)
    except BadImage as exc:
        raise CnnlabError(f"--image {Path(path).expanduser()}: {exc}") from None
