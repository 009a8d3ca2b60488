"""GET /network/spec, GET /network/weights and POST /network: the numbers behind the page's
network view (`cnnlab.network_view`).

The spec (layers, formulas, receptive fields) does not depend on the image: the page asks for it
once, and for one layer's weights when a cell of it is clicked. POST /network takes an image as
/predict does and answers every layer's output for it.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...network_view import network_activations, network_spec, split_arrays
from ..inputs import read_uploads
from ..schemas import ErrorOut
from .predict import _ERRORS, _request_body

router = APIRouter(tags=["network"])
_spec_lock = threading.Lock()


def _spec(app) -> tuple[dict, dict, dict]:
    """(the full spec, the spec without arrays, node id -> arrays), built on first use and kept:
    the weights never change while the server runs."""
    with _spec_lock:
        built = getattr(app.state, "cnnlab_network", None)
        if built is None:
            state = app.state.cnnlab
            spec = network_spec(state.predictor.run, state.name)
            built = (spec, *split_arrays(spec))
            app.state.cnnlab_network = built
    return built


@router.get("/network/spec", summary="Every layer of the model for the network view: summary rows, receptive "
                                     "fields, windows and settings (weights: GET /network/weights)")
async def spec(request: Request) -> JSONResponse:
    return JSONResponse((await run_in_threadpool(_spec, request.app))[1])


@router.get("/network/weights", responses={404: {"model": ErrorOut, "description": "no layer with that id"},
                                           422: {"model": ErrorOut, "description": "node missing or too long"}},
            summary="One layer's weights, bias or batchnorm statistics (float32 in base64), for the cell panel")
async def weights(request: Request, node: str = Query(..., max_length=200, description="the layer's id, e.g. 4.2")) -> JSONResponse:
    arrays = (await run_in_threadpool(_spec, request.app))[2]
    if node not in arrays:
        raise HTTPException(404, f"no layer {node[:40]!r} in this model's network view")  # repr: one line
    return JSONResponse(arrays[node])


@router.post("/network", responses=_ERRORS, openapi_extra=_request_body(True),
             summary="Every layer's output (all channels, float32 in base64) and the head's numbers for one image")
async def network(request: Request) -> JSONResponse:
    uploads, _ = await read_uploads(request, many=False, max_files=1)
    return JSONResponse(await run_in_threadpool(_network, request.app, uploads[0].data))


def _network(app, data: bytes) -> dict:
    state = app.state.cnnlab
    predictor = state.predictor
    image = predictor.load_input(data, state.max_pixels)  # uint8 (C, H, W), at most max_decodes at once
    return network_activations(predictor.run, image, _spec(app)[0])
