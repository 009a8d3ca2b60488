"""classify image files with a trained model"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CnnlabError

DESCRIPTION = ("Classify image files with a trained model. Reads PNG, JPEG, WebP, BMP, GIF (first frame) and TIFF "
               "in any mode; folders are searched recursively. Example: cnnlab predict runs/mnist digit.png --top-k 3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..predict import BATCH_SIZE, MAX_PIXELS, RUNTIMES, batch_size_for

    parser.add_argument("model", metavar="MODEL", help="a run folder or a model .safetensors file")
    parser.add_argument("paths", metavar="IMAGE_OR_DIR", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="also show the K most likely classes (default 1)")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"path", "label", "index", "confidence", "top_k"} or {"path", "error"} '
                             '(unreadable files; "no digit found ..." for blank pictures given to a digit model)')
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                        help=f"refuse images with more pixels than this (decompression bombs; default {MAX_PIXELS:,})")
    add_decode_flag(parser)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per forward pass (default: {BATCH_SIZE} on inputs up to 64x64 pixels, fewer on "
                             f"larger ones: {batch_size_for((3, 224, 224))} at 224x224, measured fastest on a CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="what runs the model: onnx: ONNX Runtime on the model.onnx that `cnnlab export MODEL` wrote "
                             "beside it, checked against the model's own logits first (about 2x faster on a CPU); torch; "
                             "auto (default): onnx on the CPU when that file is there and passes the check, else torch")


def add_decode_flag(parser: argparse.ArgumentParser) -> None:
    """--max-decoded-mb, as predict and explain take it."""
    parser.add_argument("--max-decoded-mb", type=float, default=None, metavar="MB",
                        help="refuse images that take more memory than this once decoded, read from the header "
                             "(width x height x bytes per pixel; default 64)")


def decode_limit(args: argparse.Namespace) -> int:
    """The --max-decoded-mb budget in bytes, for `Predictor.max_decoded_bytes`."""
    from ..data.decode import limit_bytes

    return limit_bytes(args.max_decoded_mb)


def check_file_flags(args: argparse.Namespace) -> None:
    """--batch-size, --max-pixels and --max-decoded-mb, as predict and explain take them."""
    from ..data.decode import check_limit
    from ..predict import MIN_SIDE

    if args.max_decoded_mb is not None:
        check_limit(args.max_decoded_mb)

    if args.batch_size is not None and args.batch_size < 1:
        raise CnnlabError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_pixels < MIN_SIDE * MIN_SIDE:
        raise CnnlabError(f"--max-pixels must be at least {MIN_SIDE * MIN_SIDE}, got {args.max_pixels}")


def run(args: argparse.Namespace) -> int:
    from ..predict import Predictor, finish_files, predict_files, print_error
    from ..runtime import resolve_device

    if args.top_k < 1:
        raise CnnlabError(f"--top-k must be at least 1, got {args.top_k}")
    check_file_flags(args)
    # two batches side by side: measured faster than one batch on every core (NOTES.md §20)
    predictor = Predictor.from_path(args.model, resolve_device(args.device), args.runtime, batches_at_once=2)
    predictor.max_decoded_bytes = decode_limit(args)
    seen = failed = 0
    skipped: list[Path] = []
    for path, result in predict_files(predictor, args.paths, args.top_k, args.batch_size, args.max_pixels, skipped):
        seen += 1
        if isinstance(result, str):
            failed += 1
            print_error(path, result, args.json)
        elif args.json:
            print(json.dumps({"path": str(path), **result.to_dict()}))
        else:
            line = f"{path}: {result.label} ({result.confidence:.1%})"
            if len(result.top_k) > 1:
                line += "   top-{}: {}".format(len(result.top_k), ", ".join(
                    f"{item['label']} {item['probability']:.1%}" for item in result.top_k))
            print(line)
        sys.stdout.flush()
    return finish_files(seen, failed, args.paths, args.json, skipped)
