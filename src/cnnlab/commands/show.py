"""pictures: samples, convolve, filters, feature-maps, curves, confusion, mistakes"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import shorten
from .train import DATA_ROOT_HELP, DATASET_HELP

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DESCRIPTION = ("Pictures of what a CNN does, written as PNG files: samples, convolve, filters, feature-maps, "
               "curves, confusion, mistakes. Example: cnnlab show convolve --filter sobel-x")


def _whole(text: str, minimum: int, choices: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number{choices}, got {shorten(text)}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _padding(text: str) -> int | str:
    return text if text in ("same", "valid") else _whole(text, 0, ", 'same' or 'valid'")


def _positive(text: str) -> int:
    return _whole(text, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.catalog import DATASET_NAMES
    from ..visualize.convolution import FILTERS
    from ..visualize.figures import DPI
    from ..visualize.pictures import PICTURES

    sub = parser.add_subparsers(dest="picture", metavar="PICTURE", required=True)
    parsers = {name: sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
               for name, text in PICTURES.items()}
    for name, p in parsers.items():
        p.add_argument("--out", metavar="FILE.png", default=f"{name}.png", help=f"output PNG (default: {name}.png)")
        p.add_argument("--dpi", type=_positive, default=DPI, help=f"pixels per inch (default {DPI})")
        p.add_argument("--data-root", help=DATA_ROOT_HELP)
        if name not in ("samples", "convolve"):
            p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or model .safetensors file)")
        if name in ("confusion", "mistakes", "feature-maps"):
            p.add_argument("--dataset", help="evaluate on this dataset instead of the run's own (same classes)")

    p = parsers["samples"]
    p.add_argument("--dataset", default="mnist",
                   help=DATASET_HELP.format(names=", ".join(DATASET_NAMES)) + " (default mnist)")
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
    from ..visualize.figures import save_figure

    fig = build_picture(args)
    width, height = save_figure(fig, args.out, args.dpi)
    print(f"wrote {args.out} ({width}x{height} pixels)")
    return 0


def build_picture(args: argparse.Namespace) -> "Figure":
    """The Figure that `cnnlab show PICTURE ...` writes."""
    from ..runs import open_run
    from ..visualize import (
        confusion_figure,
        confusion_title,
        convolve_picture,
        curves_figure,
        feature_maps_picture,
        filters_figure,
        mistakes_figure,
        samples_picture,
    )

    if args.picture == "samples":
        return samples_picture(args.dataset, args.data_root, args.image_size, args.split, args.count, args.columns,
                               args.seed)
    if args.picture == "convolve":
        return convolve_picture(args.image, args.digit, args.data_root, args.filter or ["sobel-x"], args.stride,
                                args.padding, args.padding_mode, args.dilation, args.pool, args.pool_size, args.grey)
    run = open_run(args.run_dir, dataset=getattr(args, "dataset", None), data_root=args.data_root)
    if args.picture == "filters":
        return filters_figure(run, args.layer)
    if args.picture == "feature-maps":
        return feature_maps_picture(run, args.image, args.index, args.maps)
    if args.picture == "curves":
        return curves_figure(run.history(), f"Training curves of {run.name}")
    if args.picture == "confusion":
        metrics = run.evaluate()
        return confusion_figure(metrics["confusion"], run.classes, confusion_title(run.name, metrics), args.normalize)
    data = run.data()
    return mistakes_figure(data.test.images, data.test.labels, run.test_logits(), run.classes,
                           f"Most confident mistakes of {run.name}", args.count)
