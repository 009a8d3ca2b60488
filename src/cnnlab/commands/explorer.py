"""`cnnlab explorer RUN`: the server page's network view as one self-contained HTML file.

    cnnlab explorer runs/mnist                      # runs/mnist/explorer.html, one test image per class
    cnnlab explorer runs/mnist --images 3 --out net.html
    cnnlab explorer runs/mnist --image my_digit.png --image other.jpg

The file needs no server and loads nothing from the network: a teacher can hand it out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CnnlabError

DESCRIPTION = ("Write the network explorer (every layer's feature maps, receptive fields, one cell's arithmetic, "
               "the convolution playground) as one self-contained HTML file with a few images baked in. "
               "Example: cnnlab explorer runs/mnist --out explorer.html")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a model .safetensors file)")
    parser.add_argument("--out", metavar="FILE.html", help="where to write it (default: RUN_DIR/explorer.html)")
    parser.add_argument("--images", type=int, default=6, metavar="N",
                        help="bake in the first test image of N classes (default 6)")
    parser.add_argument("--image", action="append", metavar="FILE",
                        help="bake in this image file instead of test images (repeatable)")
    parser.add_argument("--dataset", help="take test images from this dataset instead of the run's own")
    parser.add_argument("--data-root", help="folder holding MNIST/raw (default: $CNNLAB_DATA, else ~/.cache/cnnlab)")


def pick_images(bundle, count: int, files: list[str] | None, dataset: str | None, data_root: str | None):
    """(name, uint8 (C, H, W)) pairs: the given files preprocessed as the server would, else the
    first test image of each of the first `count` classes."""
    from ..predict import Predictor

    if files:
        predictor = Predictor(bundle)
        images = []
        for name in files:
            if not Path(name).is_file():
                raise CnnlabError(f"--image {name}: no such file")
            try:
                images.append((Path(name).name, predictor.prepare(predictor.load(Path(name)))))
            except CnnlabError as exc:
                raise CnnlabError(f"--image {name}: {exc}") from None
        return images
    if count < 1:
        raise CnnlabError(f"--images must be at least 1, got {count}")
    test = bundle.load_test_data(dataset, data_root).test
    chosen: dict[int, int] = {}
    for index, label in enumerate(test.labels.tolist()):
        if label not in chosen and len(chosen) < count:
            chosen[label] = index
    return [(f"test #{index}: {bundle.classes[label]}", test.images[index]) for label, index in sorted(chosen.items())]


def run(args: argparse.Namespace) -> int:
    from ..files import atomic_write_text
    from ..runs import open_run
    from ..serve.offline import explorer_html

    bundle = open_run(args.run_dir)
    images = pick_images(bundle, args.images, args.image, args.dataset, args.data_root)
    path = Path(args.out) if args.out else bundle.run_dir / "explorer.html"
    atomic_write_text(path, explorer_html(bundle, images))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {len(images)} images, self-contained: open it in any browser)")
    return 0
