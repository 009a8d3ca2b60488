"""POST /predict, /predict/batch and /inspect.

Decoding and inference are blocking (PIL, PyTorch), so they run in the thread pool
(`run_in_threadpool`): the event loop keeps serving other requests meanwhile.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from ...predict import BadImage
from ..featuremaps import feature_maps, input_png
from ..inputs import read_uploads
from ..schemas import BatchIn, BatchItem, BatchOut, ErrorOut, ImageIn, InspectOut, ItemError, PredictionOut

router = APIRouter(tags=["predict"])

_ERRORS = {413: {"model": ErrorOut, "description": "upload or image too large (decoded, or once resized for the model)"},
           415: {"model": ErrorOut, "description": "not an image / unsupported content type"},
           422: {"model": ErrorOut, "description": "corrupt image, malformed request, or (digit models) a picture with "
                                                  "no digit in it: 'no digit found ...'; an extreme aspect ratio"},
           503: {"model": ErrorOut, "description": "the server ran out of memory decoding an image within the limits: "
                                                  "try again"}}


def _request_body(single: bool) -> dict:
    schema = (ImageIn if single else BatchIn).model_json_schema()
    field = "file" if single else "files"
    file_schema = {"type": "string", "format": "binary"}
    form = {"type": "object", "properties": {field: file_schema if single else {"type": "array", "items": file_schema},
                                             "top_k": {"type": "integer", "minimum": 1}}, "required": [field]}
    content = {"multipart/form-data": {"schema": form}, "application/json": {"schema": schema}}
    if single:
        content["image/*"] = {"schema": file_schema}
    return {"requestBody": {"required": True, "content": content}}


TopK = Query(None, ge=1, description="how many classes to return (default 3); a `top_k` in the body wins")


@router.post("/predict", response_model=PredictionOut, responses=_ERRORS, openapi_extra=_request_body(True),
             summary="Classify one image (multipart upload, JSON with base64, or a raw image body)")
async def predict(request: Request, top_k: int | None = TopK) -> PredictionOut:
    state = request.app.state.cnnlab
    uploads, body_top_k = await read_uploads(request, many=False, max_files=1)
    k = state.top_k(body_top_k or top_k)
    prediction = await run_in_threadpool(state.predictor.predict_bytes, uploads[0].data, k, state.max_pixels)
    return PredictionOut(**prediction.to_dict())


@router.post("/predict/batch", response_model=BatchOut, responses=_ERRORS, openapi_extra=_request_body(False),
             summary="Classify several images; each gets its prediction or its own error")
async def predict_batch(request: Request, top_k: int | None = TopK) -> BatchOut:
    state = request.app.state.cnnlab
    uploads, body_top_k = await read_uploads(request, many=True, max_files=state.max_batch)
    if len(uploads) > state.max_batch:
        raise BadImage(f"too many images: {len(uploads)}, at most {state.max_batch} per request", 413)
    k = state.top_k(body_top_k or top_k)
    return await run_in_threadpool(_predict_many, state, uploads, k)


def _predict_many(state, uploads, k: int) -> BatchOut:
    predictor = state.predictor
    items: list[BatchItem] = []
    images, positions = [], []
    for i, upload in enumerate(uploads):
        try:
            images.append(predictor.load_input(upload.data, state.max_pixels))
            positions.append(i)
            items.append(BatchItem(index=i, filename=upload.filename))
        except BadImage as exc:
            items.append(BatchItem(index=i, filename=upload.filename, error=ItemError(status=exc.status, detail=str(exc))))
    if images:
        import torch

        probabilities = predictor.probabilities(torch.stack(images))
        for position, p in zip(positions, probabilities):
            items[position].prediction = PredictionOut(**predictor.top_k(p, k).to_dict())
    return BatchOut(results=items, failed=sum(item.error is not None for item in items))


@router.post("/inspect", response_model=InspectOut, responses=_ERRORS, openapi_extra=_request_body(True),
             summary="Classify one image and return the preprocessed input and every layer's feature maps")
async def inspect(request: Request, top_k: int | None = TopK) -> InspectOut:
    state = request.app.state.cnnlab
    uploads, body_top_k = await read_uploads(request, many=False, max_files=1)
    k = state.top_k(body_top_k or top_k)
    return await run_in_threadpool(_inspect, state, uploads[0].data, k)


def _inspect(state, data: bytes, k: int) -> InspectOut:
    predictor = state.predictor
    image = predictor.load_input(data, state.max_pixels)   # uint8 (C, H, W)
    x = predictor.preprocessing.normalize(image.unsqueeze(0).to(predictor.device))
    prediction = predictor.top_k(predictor.probabilities(image.unsqueeze(0))[0], k)
    shown, skipped = feature_maps(predictor.model, x, state.layers)
    return InspectOut(prediction=PredictionOut(**prediction.to_dict()), input_png=input_png(image),
                      input_shape=list(image.shape), feature_maps=shown, skipped_layers=skipped)
