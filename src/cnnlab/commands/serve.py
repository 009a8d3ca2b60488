"""HTTP API and a drawing page for a trained model"""

from __future__ import annotations

import argparse

from ..errors import CnnlabError

DESCRIPTION = ("Serve a trained model: POST /predict, /predict/batch, /inspect, /explain, /network, GET /health, /model, "
               "/network/spec, API docs at /docs, and a page at / to draw digits or drop images and watch the "
               "prediction and every layer at work.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..predict import MAX_PIXELS
    from ..serve.app import MAX_BATCH, MAX_UPLOAD_BYTES

    parser.add_argument("model", metavar="MODEL", help="a run folder or a model .safetensors file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                        help=f"largest request body in MiB; bigger ones get 413 (default {MAX_UPLOAD_BYTES / 2**20:.0f})")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"largest image in pixels (default {MAX_PIXELS:,})")
    parser.add_argument("--max-decoded-mb", type=float, default=None, metavar="MB",
                        help="most memory one image may take once decoded, read from its header (default 64); "
                             "larger images get 413")
    parser.add_argument("--max-decodes", type=int, default=None, metavar="N",
                        help="images decoded at once (default: one per core, at most 4); others wait their turn")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help=f"most images per /predict/batch (default {MAX_BATCH})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto",
                        help="what runs /predict: as `cnnlab predict --runtime` (auto: ONNX Runtime on the CPU when the "
                             "model.onnx of `cnnlab export MODEL` is beside it and passes the check, else torch)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from ..serve import serve

    if args.max_upload_mb <= 0 or args.max_pixels < 64 or args.max_batch < 1:
        raise CnnlabError("--max-upload-mb, --max-pixels and --max-batch must be positive")
    serve(args.model, args.host, args.port, max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
          max_batch=args.max_batch, device=args.device, log_level=args.log_level, max_decoded_mb=args.max_decoded_mb,
          max_decodes=args.max_decodes, runtime=args.runtime)
    return 0
