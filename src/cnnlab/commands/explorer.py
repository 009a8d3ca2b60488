"""the network explorer (every layer, receptive fields, one cell's arithmetic) as one offline HTML file

    cnnlab explorer runs/mnist                      # runs/mnist/explorer.html, one test image per class
    cnnlab explorer runs/mnist --images 3 --out net.html
    cnnlab explorer runs/mnist --image my_digit.png --image other.jpg

The file needs no server and loads nothing from the network: a teacher can hand it out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .train import DATA_ROOT_HELP

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
    parser.add_argument("--data-root", help=DATA_ROOT_HELP)


def run(args: argparse.Namespace) -> int:
    from ..files import atomic_write_text, check_can_write, write_error
    from ..runs import EXPLORER_FILE, open_run
    from ..serve.offline import explorer_html, pick_images

    bundle = open_run(args.run_dir)
    path = Path(args.out) if args.out else bundle.file(EXPLORER_FILE)
    check_can_write(path, "the explorer")  # a read-only run folder: said before the work, not after
    images = pick_images(bundle, args.images, args.image, args.dataset, args.data_root)
    try:
        atomic_write_text(path, explorer_html(bundle, images))
    except OSError as exc:
        raise write_error(path, exc, "the explorer") from None
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {len(images)} images, self-contained: open it in any browser)")
    return 0
