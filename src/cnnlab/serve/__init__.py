"""`cnnlab serve MODEL`: an HTTP API and a drawing page for a trained model.

    cnnlab serve runs/mnist                       # http://127.0.0.1:8000 (page), /docs (API)
    cnnlab serve runs/mnist --host 0.0.0.0 --port 9000

`app.py` builds the FastAPI app (`create_app`), `routes/` holds the endpoints, `schemas.py` the
request/response bodies, `static/` the page. uvicorn runs it.
"""

from __future__ import annotations

import argparse
import socket

from ..errors import CnnlabError

DESCRIPTION = ("Serve a trained model: POST /predict, /predict/batch, /inspect, /explain, /network, GET /health, /model, "
               "/network/spec, API docs at /docs, "
               "and a page at / to draw digits or drop images and watch the prediction and every layer at work.")


def create_app(*args, **kwargs):
    """See `cnnlab.serve.app.create_app` (imported lazily: FastAPI is an optional dependency)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..predict import MAX_PIXELS
    from .app import MAX_BATCH, MAX_UPLOAD_BYTES

    parser.add_argument("model", metavar="MODEL", help="a run folder or a model .safetensors file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                        help=f"largest request body in MiB; bigger ones get 413 (default {MAX_UPLOAD_BYTES / 2**20:.0f})")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"largest image in pixels (default {MAX_PIXELS:,})")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help=f"most images per /predict/batch (default {MAX_BATCH})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _check_port_free(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CnnlabError(f"--host {host}: cannot resolve this address ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CnnlabError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server running? "
                              "Choose another --port") from None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise CnnlabError("serving needs the serve extra: pip install 'cnnlab[serve]'") from None
    from ..runtime import resolve_device
    from .app import create_app as _create_app

    if not 1 <= args.port <= 65535:
        raise CnnlabError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_pixels < 64 or args.max_batch < 1:
        raise CnnlabError("--max-upload-mb, --max-pixels and --max-batch must be positive")
    app = _create_app(args.model, max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                      max_batch=args.max_batch, device=resolve_device(args.device))
    _check_port_free(args.host, args.port)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.model} at http://{shown}:{args.port}/  (API docs: http://{shown}:{args.port}/docs; Ctrl+C stops)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
