"""`cnnlab show PICTURE ...`: the command line of the pictures (arguments, and which figure each
picture builds from which inputs); the figures themselves are in `figures.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import CnnlabError
from .convolution import FILTERS, convolve, demo_image, mnist_test_digit, parse_kernel
from .figures import (DPI, confusion_figure, confusion_title, convolve_figure, curves_figure, feature_maps_figure,
                      filters_figure, mistakes_figure, samples_figure, save_figure)
from ..runs import Run, open_run
from .figures import pick_test_image

DESCRIPTION = ("Pictures of what a CNN does, written as PNG files: samples, convolve, filters, feature-maps, "
               "curves, confusion, mistakes. Example: cnnlab show convolve --filter sobel-x")


PICTURES = {
    "samples": "a labelled grid of dataset images",
    "convolve": "apply a filter to an image: input, kernel, feature map, ReLU, pooling (RGB: per-channel products)",
    "filters": "a trained model's learned conv filters",
    "feature-maps": "every conv/activation/pool layer's maps for one image through a trained model",
    "curves": "loss and accuracy per epoch of a run",
    "confusion": "the confusion matrix of a run on its test split, as a heatmap",
    "mistakes": "the test images a run's model gets most confidently wrong",
}


def _padding(text: str) -> int | str:
    if text in ("same", "valid"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, 'same' or 'valid', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="picture", metavar="PICTURE", required=True)
    parsers = {name: sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
               for name, text in PICTURES.items()}
    for name, p in parsers.items():
        p.add_argument("--out", metavar="FILE.png", default=f"{name}.png", help=f"output PNG (default: {name}.png)")
        p.add_argument("--dpi", type=_positive, default=DPI, help=f"pixels per inch (default {DPI})")
        p.add_argument("--data-root", help="folder holding MNIST/raw (default: $CNNLAB_DATA, else ~/.cache/cnnlab)")
        if name not in ("samples", "convolve"):
            p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or model .safetensors file)")
        if name in ("confusion", "mistakes", "feature-maps"):
            p.add_argument("--dataset", help="evaluate on this dataset instead of the run's own (same classes)")

    p = parsers["samples"]
    p.add_argument("--dataset", default="mnist", help="mnist, or folder:PATH (one sub-folder of images per class)")
    p.add_argument("--image-size", type=_positive, help="folder datasets: side length (default 32)")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--count", type=_positive, default=32, help="how many images (default 32)")
    p.add_argument("--columns", type=_positive, default=8)
    p.add_argument("--seed", type=int, default=0, help="which random images (default 0)")

    p = parsers["convolve"]
    source = p.add_mutually_exclusive_group()
    source.add_argument("--image", metavar="FILE", help="any image file (default: an MNIST test digit)")
    source.add_argument("--digit", type=int, default=4, metavar="INDEX", help="MNIST test image number (default 4, a four)")
    p.add_argument("--filter", action="append", metavar="NAME|NUMBERS",
                   help=f"a named filter ({', '.join(sorted(FILTERS))}) or numbers like '1,0,-1; 2,0,-2; 1,0,-1'; "
                        "for colour images give it once, or three times (red, green, blue). Numbers that start with a minus "
                        "need an equals sign: --filter='-1,0,1; -2,0,2; -1,0,1'. Default: sobel-x")
    p.add_argument("--stride", type=_positive, default=1)
    p.add_argument("--padding", type=_padding, default=1, help="a whole number, 'same' or 'valid' (default 1)")
    p.add_argument("--padding-mode", choices=["zeros", "reflect", "replicate", "circular"], default="zeros")
    p.add_argument("--dilation", type=_positive, default=1)
    p.add_argument("--pool", choices=["max", "avg", "none"], default="max", help="pooling after ReLU (default max)")
    p.add_argument("--pool-size", type=_positive, default=2)
    p.add_argument("--grey", action="store_true", help="convert a colour --image to grey first")

    parsers["filters"].add_argument("--layer", metavar="N",
                                    help="the conv layer's number in `cnnlab summary`, e.g. 4 or 5.1 inside a residual block "
                                         "(default: the first conv)")
    p = parsers["feature-maps"]
    p.add_argument("--image", metavar="FILE", help="an image file, preprocessed like `predict` does (default: a test image)")
    p.add_argument("--index", type=int, default=0, help="test image number when no --image is given (default 0)")
    p.add_argument("--maps", type=_positive, default=8, help="feature maps shown per layer (default 8)")
    parsers["confusion"].add_argument("--normalize", action="store_true", help="show each row as percentages")
    parsers["mistakes"].add_argument("--count", type=_positive, default=24, help="how many mistakes (default 24)")


def run(args: argparse.Namespace) -> int:
    fig = build_picture(args)
    width, height = save_figure(fig, args.out, args.dpi)
    print(f"wrote {args.out} ({width}x{height} pixels)")
    return 0


def build_picture(args: argparse.Namespace) -> Figure:
    """The Figure that `cnnlab show PICTURE ...` writes."""
    if args.picture == "samples":
        return _samples_from_args(args)
    if args.picture == "convolve":
        return _convolve_from_args(args)
    context = open_run(args.run_dir, dataset=getattr(args, "dataset", None), data_root=args.data_root)
    if args.picture == "filters":
        return filters_figure(context, args.layer)
    if args.picture == "feature-maps":
        return _feature_maps_from_args(context, args)
    if args.picture == "curves":
        return curves_figure(context.history(), f"Training curves of {context.name}")
    if args.picture == "confusion":
        metrics = context.evaluate()
        return confusion_figure(metrics["confusion"], context.classes, confusion_title(context.name, metrics),
                                args.normalize)
    data = context.data()
    return mistakes_figure(data.test.images, data.test.labels, context.test_logits(), context.classes,
                           f"Most confident mistakes of {context.name}", args.count)


def _samples_from_args(args: argparse.Namespace) -> Figure:
    from ..config import DataConfig
    from ..data import load_dataset

    config = DataConfig(dataset=args.dataset, root=args.data_root, image_size=args.image_size)
    data = load_dataset(config, progress=False)
    split = data.train if args.split == "train" else data.test
    if len(split) == 0:
        raise CnnlabError(f"{args.dataset}: the {args.split} split has no images")
    index = _seeded_indices(len(split), min(args.count, len(split)), args.seed)
    return samples_figure(split.images[index], split.labels[index], data.classes,
                          f"{data.name}: {len(index)} random {args.split} images of {len(split):,} "
                          f"({', '.join(data.classes[:10])}{'...' if len(data.classes) > 10 else ''})", args.columns)


def _convolve_from_args(args: argparse.Namespace) -> Figure:
    if args.image:
        image = _demo_image_file(args.image, args.grey)
        source = Path(args.image).name
    else:
        image, label = mnist_test_digit(args.digit, args.data_root)
        source = f"MNIST test digit #{args.digit} (a {label})"
    parsed = [parse_kernel(text) for text in (args.filter or ["sobel-x"])]
    names = [name if name != "custom" else "custom kernel" for name, _ in parsed]
    result = convolve(image, [kernel for _, kernel in parsed], args.stride, args.padding, args.padding_mode,
                      args.dilation, args.pool, args.pool_size)
    return convolve_figure(result, source, names, args.pool, args.pool_size)


def _feature_maps_from_args(context: Run, args: argparse.Namespace) -> Figure:
    if args.image:
        from ..predict import BadImage, Predictor

        predictor = Predictor(context)
        path = Path(args.image).expanduser()
        try:  # decoded and preprocessed exactly as `cnnlab predict` does
            image = predictor.prepare(predictor.load(path))
        except BadImage as exc:
            raise CnnlabError(f"--image {path}: {exc}") from None
        caption = path.name
    else:
        image, caption = pick_test_image(context, args.index)
    return feature_maps_figure(context, image, caption, args.maps)


def _seeded_indices(n: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:count]


def _demo_image_file(path: str, grey: bool) -> np.ndarray:
    """The convolve demo's `--image`, decoded by `predict.open_image` (its limits and one-line reasons)."""
    from ..predict import BadImage, open_image

    try:
        return demo_image(open_image(Path(path).expanduser()), grey)
    except BadImage as exc:
        raise CnnlabError(f"--image {Path(path).expanduser()}: {exc}") from None
