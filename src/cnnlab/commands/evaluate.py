"""loss, accuracy, per-class metrics and confusion matrix of a model"""

from __future__ import annotations

import argparse
import json

from .train import add_data_arguments

DESCRIPTION = "Evaluate a trained model on its dataset's test split."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder or a model .safetensors file")
    add_data_arguments(parser)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from ..evaluate import format_metrics
    from ..runs import open_run
    from ..runtime import resolve_device

    opened = open_run(args.model, resolve_device(args.device))
    data = opened.load_test_data(args.dataset, args.data_root, limit_per_class=args.limit_per_class)
    metrics = opened.evaluate(data)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.model} on the {data.name} test split")
        print(format_metrics(metrics))
    return 0
