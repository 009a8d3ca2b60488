"""which pixels made the model decide (Grad-CAM, Layer-CAM, saliency, SmoothGrad, integrated gradients, occlusion), and --check whether to trust them"""

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
    from ..explain import BASELINES, METHODS
    from ..predict import MAX_PIXELS

    parser.add_argument("model", metavar="MODEL", help="a run folder or a model .safetensors file")
    parser.add_argument("paths", metavar="IMAGE_OR_DIR", nargs="*", help="image files and/or folders (searched recursively)")
    parser.add_argument("--method", choices=list(METHODS), default="gradcam",
                        help="gradcam (default; coarse, fast), layercam (sharper, from the same or a finer layer), "
                             "saliency (gradient), smoothgrad (saliency averaged over noisy copies), "
                             "integrated-gradients (signed, sums to the score), occlusion (blanking squares; slowest)")
    parser.add_argument("--baseline", choices=list(BASELINES), default="blank",
                        help="integrated gradients: start from the blank image (default) or a blurred copy of the input")
    parser.add_argument("--check", action="store_true",
                        help="instead of explaining images: measure whether each method's maps can be trusted for "
                             "this model (deletion, insertion and ROAD against a random ranking; model randomisation) "
                             "and save RUN/explain-check.json")
    parser.add_argument("--images", type=int, metavar="N", help="--check: test images to use (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="--check: which test images (default 0)")
    parser.add_argument("--methods", metavar="A,B",
                        help="--check: only these methods (as the table names them), or all (the default up to "
                             "64x64 inputs; on larger ones, such as photos at 224x224, the default is gradcam: each "
                             "method there takes minutes). Rows of other methods already saved for the same images "
                             "stay in the file")
    parser.add_argument("--target", metavar="CLASS",
                        help="explain this class (a name or index) instead of each image's predicted class")
    parser.add_argument("--layer", metavar="N_OR_TYPE",
                        help="Grad-CAM / Layer-CAM: use the output of spec layer N (1-based, see cnnlab summary), "
                             "of a layer inside a block as summary numbers it (e.g. 1.8: a timm backbone's block) or "
                             "of the last layer of a type (e.g. relu) instead of the last conv block with at least "
                             "7x7 outputs (a quarter of the side on small inputs)")
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
    from ..explain import CAM_METHODS, check_captum, explain_files, gradcam_layer, method_caveat, resolve_target
    from ..predict import Predictor, finish_files, print_error
    from ..runtime import resolve_device

    check_file_flags(args)
    check_captum()
    predictor = Predictor.from_path(args.model, resolve_device(args.device))
    predictor.max_decoded_bytes = decode_limit(args)
    classes = predictor.run.classes
    if args.check:
        return _check(predictor.run, args)
    if not args.paths:
        raise CnnlabError("give one or more images or folders to explain (or --check)")
    target = resolve_target(args.target, classes)
    if args.method in CAM_METHODS:
        gradcam_layer(predictor.run.infos(), args.layer)  # a bad --layer is one error, before any file is read
    elif args.layer is not None:
        raise CnnlabError(f"--layer chooses Grad-CAM's layer; --method {args.method} works on the input pixels")
    if args.baseline != "blank" and args.method != "integrated-gradients":
        raise CnnlabError(f"--baseline is where integrated gradients start; --method {args.method} has none")
    caveat = method_caveat(predictor.run, args.method, args.baseline, args.layer, args.model)
    if caveat and not args.json:  # once, on stderr: stdout keeps one line per image; pictures and JSON lines carry it
        print(caveat, file=sys.stderr)
    out = Path(args.out or "explanations").expanduser() if (args.out or not args.json) else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CnnlabError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    seen = failed = 0
    skipped: list[Path] = []
    for path, result in explain_files(predictor, args.paths, args.method, target, args.layer, out, args.batch_size,
                                      args.max_pixels, skipped, args.baseline, caveat):
        seen += 1
        if isinstance(result, str):
            failed += 1
            print_error(path, result, args.json)
        elif args.json:
            print(json.dumps({"path": str(path), **result.to_dict(classes), **({"caveat": caveat} if caveat else {})}))
        else:
            item = result.explanation.item(result.index, classes)
            line = f"{path}: {item['label']} ({item['confidence']:.1%})"
            if item["target_index"] != item["index"]:
                line += f", explaining {item['target']} ({item['target_confidence']:.1%})"
            line += f" with {result.explanation.title}"
            print(line + (f" -> {result.png}" if result.png else ""))
        sys.stdout.flush()
    return finish_files(seen, failed, args.paths, args.json, skipped)


def _check(run, args: argparse.Namespace) -> int:
    """`cnnlab explain RUN --check`: the faithfulness check on the run's test images, as a table."""
    from ..explain import run_check
    from ..faithfulness import IMAGES, check_path, default_methods, table
    from ..files import check_can_write

    if args.paths:
        raise CnnlabError("--check measures the model on its own test images: give no image paths")
    check_can_write(check_path(run.path), "the check's result")  # before the check's minutes of work
    images = args.images if args.images is not None else IMAGES
    if args.methods:
        methods = None if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = default_methods(run.input_shape)
    print(f"checking {', '.join(methods) if methods else 'the attribution methods'} of {run.name} on {images} of its "
          f"test images (seed {args.seed})", flush=True)
    if methods and not args.methods:
        print(f"  on inputs of this size the check measures {', '.join(methods)}, the map explain shows by default "
              f"(minutes per method); --methods all, or a list, for others", flush=True)
    result, path = run_check(run, images, args.seed, methods, progress=lambda line: print("  " + line, flush=True))
    print(table(result))
    print(f"saved {path}")
    return 0
