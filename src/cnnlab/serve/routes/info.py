"""GET /health and GET /model."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..schemas import HealthOut, LayerOut, ModelOut

router = APIRouter(tags=["model"])


@router.get("/health", response_model=HealthOut, summary="Is the server up and the model loaded?")
async def health(request: Request) -> HealthOut:
    state = request.app.state.cnnlab
    return HealthOut(status="ok", model=state.name, classes=len(state.predictor.classes))


@router.get("/model", response_model=ModelOut, summary="Class names, input size, preprocessing and layer summary")
async def model_info(request: Request) -> ModelOut:
    state = request.app.state.cnnlab
    predictor = state.predictor
    layers = [LayerOut(index=info.index, type=info.spec.type, description=info.spec.describe(),
                       output_shape=list(info.out_shape), parameters=info.params) for info in state.layers]
    metrics = predictor.run.metrics
    return ModelOut(name=state.name, classes=predictor.classes, input_shape=list(predictor.input_shape),
                    preprocessing=predictor.preprocessing.to_dict(),
                    parameters=sum(p.numel() for p in predictor.model.parameters()), layers=layers,
                    metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
                    limits={"max_upload_bytes": state.max_upload_bytes, "max_pixels": state.max_pixels,
                            "max_batch": state.max_batch, "max_decoded_bytes": predictor.max_decoded_bytes})
