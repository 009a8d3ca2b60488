#!/usr/bin/env python3
"""How well the digit preprocessing tells a digit from a blank picture ("no digit found").

    python benchmarks/no_digit.py                          # 40 pictures per style and kind (~10 min)
    python benchmarks/no_digit.py --model runs/mnist       # also the model's accuracy on the hard digits
    python benchmarks/no_digit.py --per-style 5            # a quick look

Counts, through `Preprocessing.image_to_uint8` exactly as `predict` and the API run it (decoded by
`open_image`), how often `NoDigitFound` is raised on
- all 10,000 MNIST test digits, as stored (white on black) and inverted (dark on light): must be 0;
- hard but real digits made by `tests/support/user_digits.hard_digit` (faint pencil, a small digit on a big
  page, thick marker, uneven light, blur, noise, transparent canvases, ...): must be 0;
- blank pictures made by `tests/support/user_digits.blank_picture` (paper, noise, gradients, vignettes,
  shadows, JPEG, transparent canvases, texture, dust): should be all of them.
The seeds (900,000 up) are not those the thresholds were tuned on. Results:
benchmarks/results/no-digit-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))           # tests.support.user_digits: the generators
sys.path.insert(0, str(ROOT / "src"))   # cnnlab, when run from a checkout

from cnnlab.data.preprocess import Preprocessing  # noqa: E402
from cnnlab.errors import NoDigitFound  # noqa: E402
from cnnlab.predict import open_image  # noqa: E402
from tests.support.user_digits import BLANK_KINDS, HARD_STYLES, blank_picture, hard_digit  # noqa: E402

SEED = 900_000
PREPROCESSING = Preprocessing("digit", 1, (28, 28), [0.1307], [0.3081])


def is_blank(data: bytes) -> tuple[bool, float]:
    """(NoDigitFound raised?, seconds) for one encoded picture, decoded as `predict` decodes it."""
    image = open_image(data, draft_side=1024)
    started = time.perf_counter()
    try:
        PREPROCESSING.image_to_uint8(image)
        return False, time.perf_counter() - started
    except NoDigitFound:
        return True, time.perf_counter() - started


def mnist_rows(root: Path) -> list[dict]:
    import torchvision
    from PIL import Image

    digits = torchvision.datasets.MNIST(str(root), train=False).data.numpy()
    rows = []
    for name, images in (("MNIST test, as stored (white on black)", digits), ("MNIST test, inverted (dark on light)", 255 - digits)):
        started = time.perf_counter()
        blank = [i for i, digit in enumerate(images) if _raises(Image.fromarray(digit))]
        rows.append({"set": name, "pictures": len(images), "no_digit": len(blank), "examples": blank[:5],
                     "ms_per_picture": 1000 * (time.perf_counter() - started) / len(images)})
    return rows


def _raises(image) -> bool:
    try:
        PREPROCESSING.image_to_uint8(image)
        return False
    except NoDigitFound:
        return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/no_digit.py", description=__doc__.splitlines()[0])
    parser.add_argument("--per-style", type=int, default=40, help="pictures per hard style and per blank kind")
    parser.add_argument("--model", help="a trained MNIST run: also report its accuracy on the hard digits")
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw (default: $CNNLAB_DATA)")
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    import os

    import torchvision

    root = Path(args.data_root or os.environ.get("CNNLAB_DATA") or Path.home() / ".cache" / "cnnlab")
    test = torchvision.datasets.MNIST(str(root), train=False)
    digits, labels = test.data.numpy(), test.targets.numpy()
    predictor = None
    if args.model:
        from cnnlab.predict import BadImage, Predictor

        predictor = Predictor.from_path(args.model)

    rows = [] if args.skip_mnist else mnist_rows(root)
    for row in rows:
        print(row, flush=True)
    rng = np.random.default_rng(SEED)
    for s, style in enumerate(HARD_STYLES):
        blank, seconds, correct, examples = 0, [], 0, []
        for i in range(args.per_style):
            index = int(rng.integers(len(digits)))
            data, _ = hard_digit(digits[index], style, SEED + 1000 * s + i)
            called_blank, took = is_blank(data)
            blank += called_blank
            seconds.append(took)
            if called_blank:
                examples.append(index)
            if predictor is not None:
                try:
                    correct += predictor.predict_bytes(data).label == str(labels[index])
                except BadImage:
                    pass
        rows.append({"set": f"hard digits: {style}", "pictures": args.per_style, "no_digit": blank, "examples": examples[:5],
                     "ms_per_picture": 1000 * float(np.median(seconds)),
                     **({"accuracy": correct / args.per_style} if predictor is not None else {})})
        print(rows[-1], flush=True)
    for k, kind in enumerate(BLANK_KINDS):
        blank, seconds = 0, []
        for i in range(args.per_style):
            data, _ = blank_picture(kind, SEED + 500_000 + 1000 * k + i)
            called_blank, took = is_blank(data)
            blank += called_blank
            seconds.append(took)
        rows.append({"set": f"blank: {kind}", "pictures": args.per_style, "no_digit": blank, "examples": [],
                     "ms_per_picture": 1000 * float(np.median(seconds))})
        print(rows[-1], flush=True)
    write(rows, Path(args.out), args)
    return 0


def write(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"no-digit-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"per_style": args.per_style, "model": args.model, "rows": rows}, indent=1))
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    lines = ["| pictures | count | 'no digit found' | rate | median ms to preprocess" + (" | model accuracy |" if args.model else " |"),
             "|---|---|---|---|---" + ("|---|" if args.model else "|")]
    for row in rows:
        group = "blank" if row["set"].startswith("blank") else "digit"
        totals[group][0] += row["pictures"]
        totals[group][1] += row["no_digit"]
        accuracy = f" | {row['accuracy']:.0%} |" if "accuracy" in row else (" | |" if args.model else " |")
        lines.append(f"| {row['set']} | {row['pictures']:,} | {row['no_digit']:,} | {row['no_digit'] / row['pictures']:.1%} "
                     f"| {row['ms_per_picture']:.1f}{accuracy}")
    digits, blanks = totals["digit"], totals["blank"]
    lines += ["", f"Real digits called blank: {digits[1]} of {digits[0]:,} ({digits[1] / max(digits[0], 1):.2%}). "
                  f"Blank pictures called blank: {blanks[1]} of {blanks[0]:,} ({blanks[1] / max(blanks[0], 1):.1%})."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {stem}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
