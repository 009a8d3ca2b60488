"""`cnnlab serve MODEL`: an HTTP API and a drawing page for a trained model.

    cnnlab serve runs/mnist                       # http://127.0.0.1:8000 (page), /docs (API)
    cnnlab serve runs/mnist --host 0.0.0.0 --port 9000

`app.py` builds the FastAPI app (`create_app`), `routes/` holds the endpoints, `schemas.py` the
request/response bodies, `static/` the page. uvicorn runs it.
"""

from __future__ import annotations

import socket

from ..errors import CnnlabError


def create_app(*args, **kwargs):
    """See `cnnlab.serve.app.create_app` (imported lazily: FastAPI is an optional dependency)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


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


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int | None = None,
          max_pixels: int | None = None, max_batch: int | None = None, device: str = "cpu",
          log_level: str = "info", max_decoded_mb: float | None = None, max_decodes: int | None = None,
          runtime: str = "torch") -> None:
    """Serve `model` (a run folder or .safetensors file) over HTTP with uvicorn until Ctrl+C."""
    try:
        import uvicorn
    except ImportError:
        raise CnnlabError("serving needs the serve extra: pip install 'cnnlab[serve]'") from None
    from ..predict import MAX_PIXELS
    from ..runtime import resolve_device
    from .app import MAX_BATCH, MAX_UPLOAD_BYTES
    from .app import create_app as _create_app

    if not 1 <= port <= 65535:
        raise CnnlabError(f"--port must be between 1 and 65535, got {port}")
    app = _create_app(model, max_upload_bytes=MAX_UPLOAD_BYTES if max_upload_bytes is None else max_upload_bytes,
                      max_pixels=MAX_PIXELS if max_pixels is None else max_pixels,
                      max_batch=MAX_BATCH if max_batch is None else max_batch, device=resolve_device(device),
                      max_decoded_mb=max_decoded_mb, max_decodes=max_decodes, runtime=runtime)
    _check_port_free(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model} at http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
