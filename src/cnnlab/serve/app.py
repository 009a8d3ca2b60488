"""`create_app(model)`: the FastAPI application for one trained model.

    app = create_app("runs/mnist")           # a run folder, a .safetensors file,
    app = create_app(open_run("runs/mnist"))  # or a model already loaded

Routes live in `routes/` (one module per topic); request and response bodies in `schemas.py`;
the drawing page in `static/`. All settings are arguments of `create_app` and live on
`app.state.cnnlab` (no module-level globals), so tests build as many apps as they like.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..data.decode import check_limit, limit_bytes
from ..errors import CnnlabError
from ..runs import Run
from ..layers import LayerInfo
from ..predict import MAX_PIXELS, BadImage, Predictor

MAX_UPLOAD_BYTES = 16 * 1024 * 1024
MAX_BATCH = 64
DEFAULT_TOP_K = 3
log = logging.getLogger("cnnlab.serve")


@dataclass
class ServeState:
    """Everything the routes need: the model and the limits on what clients may send."""

    predictor: Predictor
    layers: list[LayerInfo]
    name: str
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS
    max_batch: int = MAX_BATCH
    explainer: Any = None   # routes.explain.Explainer: a private model copy for POST /explain

    def top_k(self, requested: int | None) -> int:
        """The number of classes to return: the request's, else the default, at most all classes."""
        return max(1, min(requested or DEFAULT_TOP_K, len(self.predictor.classes)))


class BodySizeLimit:
    """ASGI middleware: answer 413 to request bodies over `max_bytes`, before any parsing.

    Looks at Content-Length first (no upload is read at all), and also counts the bytes of
    chunked uploads that declare no length. The body is buffered (it is small by construction)
    and replayed to the app.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, {"detail": "invalid Content-Length header"})
                return
            if declared > self.max_bytes:
                await _send_json(send, 413, {"detail": self._too_large(declared)})
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _send_json(send, 413, {"detail": self._too_large(total, at_least=True)})
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        data, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body only a disconnect can come

        await self.app(scope, replay, send)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (f"upload too large: {'more than ' if at_least else ''}{size:,} bytes, the limit is "
                f"{self.max_bytes:,} bytes ({self.max_bytes / 2**20:.0f} MiB)")


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def _as_predictor(model: Any, device: str | torch.device, runtime: str = "torch") -> tuple[Predictor, str]:
    if isinstance(model, Predictor):
        return model, model.run.name
    if isinstance(model, Run):
        return Predictor(model, device, runtime=runtime), model.name
    if isinstance(model, (str, Path)):
        return Predictor.from_path(model, device, runtime), Path(model).name
    if isinstance(model, tuple) and len(model) == 2:
        bundle = Run.from_module(*model)
        return Predictor(bundle, device), str(bundle.meta.get("name") or "model")
    raise TypeError("create_app expects a model path, a Run, a Predictor or a (model, metadata) pair")


def create_app(model: str | Path | Run | Predictor | tuple[torch.nn.Module, dict[str, Any]], *,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, max_batch: int = MAX_BATCH,
               device: str | torch.device = "cpu", max_decoded_mb: float | None = None,
               max_decodes: int | None = None, runtime: str = "torch") -> FastAPI:
    """Build the app for `model`: a run folder / .safetensors path, a loaded `Run`, a `Predictor`,
    or (model, metadata).

    `max_upload_bytes` bounds every request body (413 beyond), `max_pixels` every decoded image
    (413 beyond: decompression bombs), `max_decoded_mb` the memory one image takes once decoded (413
    beyond, read from its header: `data.decode`), `max_decodes` how many images are decoded at once
    (default: one per core, at most 4), `max_batch` the images of one /predict/batch request.
    `runtime` runs the predictions (`predict.RUNTIMES`: torch, onnx or auto); maps and explanations use PyTorch.
    """
    from .routes import explain, info, network, page, predict

    predictor, name = _as_predictor(model, device, runtime)
    if max_decoded_mb is not None:
        check_limit(max_decoded_mb)
        predictor.max_decoded_bytes = limit_bytes(max_decoded_mb)
    if max_decodes is not None:
        if not 1 <= max_decodes <= 256:
            raise CnnlabError(f"--max-decodes must be between 1 and 256, got {max_decodes}")
        predictor.decode_slots = threading.BoundedSemaphore(max_decodes)
    try:
        layers = predictor.run.infos()
    except CnnlabError as exc:
        raise CnnlabError(f"{name}: the stored layer spec is invalid: {exc}") from None
    app = FastAPI(title=f"cnnlab: {name}",
                  description=f"Classify images with the CNN `{name}` ({len(predictor.classes)} classes). "
                              "Draw digits at `/`.",
                  version=str(predictor.run.versions.get("cnnlab") or __version__))
    app.state.cnnlab = ServeState(predictor, layers, name, max_upload_bytes, max_pixels, max_batch,
                                  explain.Explainer(predictor.run))
    app.include_router(predict.router)
    app.include_router(explain.router)
    app.include_router(network.router)
    app.include_router(info.router)
    app.include_router(page.router)
    page.mount_static(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default body is a list of dicts; the API promises one readable line (ErrorOut).
        problems = []
        for error in exc.errors()[:3]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems).replace("\n", " ") or "invalid request"}, status_code=422)

    @app.exception_handler(CnnlabError)
    async def user_error(request: Request, exc: CnnlabError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # Bad input never gets here (it is a BadImage or a validation error); this is a bug.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    return app
