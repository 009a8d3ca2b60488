"""learning-rate range test: loss against an exponentially rising lr, a suggested lr"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .train import SET_METAVAR, add_data_arguments, overrides

DESCRIPTION = ("Learning-rate range test: train a copy of the network for a few hundred steps while the learning "
               "rate rises exponentially, plot the smoothed loss against it and suggest a rate (fastai's 'valley'). "
               "Example: cnnlab lr-find --preset tutorial")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..presets import PRESETS

    parser.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help=f"architecture + recipe ({', '.join(PRESETS)})")
    parser.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON file with model/data/train settings")
    add_data_arguments(parser)
    parser.add_argument("--image-size", type=int, help="folder datasets: resize images to this side length (default 32)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per physical core)")
    parser.add_argument("--set", action="append", default=[], metavar=SET_METAVAR,
                        help="any other setting, as `cnnlab train --set` takes it (e.g. --set model.3.out_channels=64)")
    parser.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    parser.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    parser.add_argument("--steps", type=int, default=200, help="steps of the sweep (default 200)")
    parser.add_argument("--plot", metavar="FILE.png", default="lr-find.png", help="the plot (default lr-find.png)")
    parser.add_argument("--json", action="store_true", help="print the sweep and the suggestion as JSON")


def run(args: argparse.Namespace) -> int:
    from ..config import resolve_config
    from ..lr_range import find_lr, sweep_line

    config = resolve_config(args.preset, args.config, overrides(args))
    quiet = (lambda *_: None) if args.json else print
    name = config.preset or (Path(args.config).stem if args.config else "custom")
    result, device = find_lr(config, args.start, args.end, args.steps, args.plot, name, log=quiet)
    if args.json:
        print(json.dumps({**result.to_dict(), "plot": str(args.plot)}))
        return 0
    print(f"{sweep_line(result)}, on {device}")
    print(f"suggested learning rate: {result.suggestion:.2g} (valley: half-way down the longest fall of the smoothed loss)")
    print(f"plot: {args.plot}")
    # the same command line as this one, so that training gets the same network, data and batch
    where = f"--preset {args.preset}" if args.preset else f"--config {args.config}" if args.config else ""
    where += f" --dataset {args.dataset}" if args.dataset else ""
    where += f" --batch-size {args.batch_size}" if args.batch_size else ""
    print(f"next: cnnlab train {where} --lr {result.suggestion:.2g}".replace("  ", " "))
    return 0
