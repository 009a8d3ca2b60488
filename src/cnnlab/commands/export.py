"""export a model to ONNX or torch.export (.pt2), checked against the original"""

from __future__ import annotations

import argparse
import json

from ..errors import CnnlabError

DESCRIPTION = ("Export a model to ONNX (for onnxruntime, Netron, other runtimes) or a torch.export program (.pt2), "
               "with BatchNorm folded and a dynamic batch size; the result is checked against the original model.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..export import FORMATS, TOLERANCE

    parser.add_argument("model", metavar="MODEL", help="a run folder or a model .safetensors file")
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="onnx (default: opset of the installed exporter; predict and serve use model.onnx when it "
                             "is beside the model) or pt2 (torch.export)")
    parser.add_argument("--out", metavar="FILE", help="output file (default: beside the model, model.onnx / model.pt2)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"largest allowed logit difference (default {TOLERANCE:g})")
    parser.add_argument("--no-real-images", action="store_true",
                        help="check parity on random inputs only (skip loading the dataset's test images)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..export import INPUT_NAME, OUTPUT_NAME, export_model

    if not args.tolerance > 0:
        raise CnnlabError(f"--tolerance must be positive, got {args.tolerance}")
    report = export_model(args.model, args.format, args.out, args.tolerance, check_real=not args.no_real_images)
    if args.json:
        print(json.dumps(report))
        return 0
    kind = f"ONNX opset {report['opset']}" if report["format"] == "onnx" else "torch.export program"
    folded = f"{report['batchnorm_folded']} BatchNorm layer(s) folded"
    if report["batchnorm_left"]:
        folded += f", {report['batchnorm_left']} kept (not after a conv/linear layer)"
    print(f"exported {report['path']} ({kind}, {report['bytes'] / 1024:.0f} KiB, dynamic batch, {folded})")
    diffs = report["max_abs_diff"]
    real = f", {diffs['real']:.1e} on {report['real_inputs']}" if "real" in diffs else f"; {report['real_inputs']}"
    print(f"parity with the original: max |logit difference| {diffs['random']:.1e} on random inputs{real} "
          f"(limit {report['tolerance']:g})")
    prep = report["preprocessing"]
    shape = ", ".join(map(str, report["input_shape"]))
    print(f"input '{INPUT_NAME}': float32 (N, {shape}), (pixel/255 - mean)/std with mean {prep['mean']} std {prep['std']} "
          f"({prep['kind']} preprocessing); output '{OUTPUT_NAME}': (N, {report['classes']})")
    where = "the ONNX metadata (key 'cnnlab')" if report["format"] == "onnx" else f"{report['metadata_file']}"
    print(f"class names and preprocessing are stored in {where}")
    return 0
