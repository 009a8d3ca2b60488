"""which pixels made the model decide: Grad-CAM, saliency, integrated gradients, occlusion"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CnnlabError
from .predict import add_decode_flag, check_file_flags, decode_limit

DESCRIPTION = ("Show which input pixels made a trained model decide: one PNG per image with what the model sees, "
               "the attribution map and the prediction. Example: cnnlab explain runs/mnist digit.png "
               "--method integrated-gradients --target 3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..explain import METHODS
    from ..predict import MAX_PIXELS

    parser.add_argument("model", metavar="MODEL", help="a run folder or a model .safetensors file")
    parser.add_argument("paths", metavar="IMAGE_OR_DIR", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--method", choices=list(METHODS), default="gradcam",
                        help="gradcam (default; coarse, fast), saliency (gradient), integrated-gradients "
                             "(signed, sums to the score), occlusion (blanking squares; slowest)")
    parser.add_argument("--target", metavar="CLASS",
                        help="explain this class (a name or index) instead of each image's predicted class")
    parser.add_argument("--layer", type=int, metavar="N",
                        help="Grad-CAM: use the output of spec layer N (1-based, see cnnlab summary) instead of the "
                             "last conv block with at least 2x2 outputs")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for the PNGs (default: explanations/; with --json, PNGs only when --out is given)")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"path", "label", "index", "confidence", "method", "target", '
                             '"target_index", "target_confidence", "layer", "map" (HxW numbers), "png"} or {"path", "error"}')
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                        help=f"refuse images with more pixels than this (default {MAX_PIXELS:,})")
    add_decode_flag(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images explained together")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def run(args: argparse.Namespace) -> int:
    from ..explain import check_captum, explain_files, gradcam_layer, resolve_target
    from ..predict import Predictor, finish_files, print_error
    from ..runtime import resolve_device

    check_file_flags(args)
    check_captum()
    predictor = Predictor.from_path(args.model, resolve_device(args.device))
    predictor.max_decoded_bytes = decode_limit(args)
    classes = predictor.run.classes
    target = resolve_target(args.target, classes)
    if args.method == "gradcam":
        gradcam_layer(predictor.run.infos(), args.layer)  # a bad --layer is one error, before any file is read
    elif args.layer is not None:
        raise CnnlabError(f"--layer chooses Grad-CAM's layer; --method {args.method} works on the input pixels")
    out = Path(args.out or "explanations").expanduser() if (args.out or not args.json) else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CnnlabError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    seen = failed = 0
    skipped: list[Path] = []
    for path, result in explain_files(predictor, args.paths, args.method, target, args.layer, out, args.batch_size,
                                      args.max_pixels, skipped):
        seen += 1
        if isinstance(result, str):
            failed += 1
            print_error(path, result, args.json)
        elif args.json:
            print(json.dumps({"path": str(path), **result.to_dict(classes)}))
        else:
            item = result.explanation.item(result.index, classes)
            line = f"{path}: {item['label']} ({item['confidence']:.1%})"
            if item["target_index"] != item["index"]:
                line += f", explaining {item['target']} ({item['target_confidence']:.1%})"
            line += f" with {result.explanation.title}"
            print(line + (f" -> {result.png}" if result.png else ""))
        sys.stdout.flush()
    return finish_files(seen, failed, args.paths, args.json, skipped)
