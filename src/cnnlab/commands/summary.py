"""layer-by-layer table: output-size formula, shapes, parameters, MACs, receptive field"""

from __future__ import annotations

import argparse
import json

from ..errors import CnnlabError

DESCRIPTION = ("Layer-by-layer table of a CNN: type and settings, the output-size formula with the numbers "
               "filled in, output shape, parameters, multiply-adds, receptive field and effective stride (jump). "
               "Every shape is checked against a real forward pass. Example: cnnlab summary --preset tutorial")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..presets import PRESETS

    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run folder or model .safetensors file")
    parser.add_argument("--preset", metavar="NAME", help=f"a named architecture ({', '.join(PRESETS)})")
    parser.add_argument("--config", metavar="FILE", help="a YAML/TOML/JSON config file with a model: layer list")
    parser.add_argument("--input", metavar="CxHxW", help="input shape, e.g. 1x28x28 or 3x32x32 (default: the data's)")
    parser.add_argument("--classes", type=int, metavar="N", help="number of classes (default: the data's, else 10)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ..summarize import (
        format_summary,
        load_spec,
        parse_input_shape,
        summarize,
        summary_to_dict,
    )

    shape = parse_input_shape(args.input) if args.input else None
    if args.classes is not None and args.classes < 1:
        raise CnnlabError(f"--classes must be a positive whole number, got {args.classes}")
    name, layers, shape, classes = load_spec(args.preset, args.config, args.run_dir, shape, args.classes)
    summary = summarize(layers, shape, classes, name=name)
    if args.json:
        print(json.dumps(summary_to_dict(summary), ensure_ascii=False, indent=2))
    else:
        print(format_summary(summary))
    return 0
