"""POST /explain: which input pixels made the model decide (`cnnlab.explain`).

Grad-CAM hooks a layer of the model while it runs, and the served model is shared by concurrent
requests: explanations use their own copy of the model, one at a time (`Explainer`).
"""

from __future__ import annotations

import base64
import copy
import threading
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from ...explain import explain, map_limit, method_caveat, overlay_png, round_map
from ..featuremaps import input_png
from ..inputs import read_uploads
from ..schemas import ClassProbability, ExplainOut, PredictionOut
from .predict import TopK, _ERRORS, _request_body

router = APIRouter(tags=["explain"])


class Explainer:
    """A private copy of the served model for attributions, used by one request at a time."""

    def __init__(self, bundle):
        self.bundle = bundle.with_model(copy.deepcopy(bundle.model))
        self.lock = threading.Lock()

    def explain(self, *args, **kwargs):
        with self.lock:
            return explain(self.bundle, *args, **kwargs)

    def caveat(self, method: str, baseline: str, layer: int | None) -> str | None:
        """The faithfulness check's one-line caveat for this method on the served model (read from
        the check file beside it on every request, so a check run while serving shows up)."""
        if not Path(self.bundle.path).is_file():  # a model given as a module: no run folder, no check
            return None
        return method_caveat(self.bundle, method, baseline, layer, self.bundle.run_dir) or None


Method = Literal["gradcam", "layercam", "saliency", "smoothgrad", "integrated-gradients", "occlusion"]


@router.post("/explain", response_model=ExplainOut, responses=_ERRORS, openapi_extra=_request_body(True),
             summary="Classify one image and show which input pixels made the model decide")
async def explain_image(
        request: Request,
        method: Method = Query("gradcam", description="gradcam (coarse, fast), saliency (gradient), "
                                                      "integrated-gradients (signed), occlusion (slowest)"),
        target: str | None = Query(None, max_length=200,
                                   description="the class to explain, a name or an index (default: the predicted one)"),
        layer: int | None = Query(None, ge=1, le=10_000,
                                  description="Grad-CAM / Layer-CAM: the 1-based spec layer to read (default: the "
                                              "last conv block with at least 7x7 outputs, a quarter of a small "
                                              "input's side)"),
        baseline: Literal["blank", "blur"] = Query("blank", description="integrated gradients: start from the blank "
                                                                         "image or a blurred copy of the input"),
        top_k: int | None = TopK) -> ExplainOut:
    state = request.app.state.cnnlab
    uploads, body_top_k = await read_uploads(request, many=False, max_files=1)
    k = state.top_k(body_top_k or top_k)
    return await run_in_threadpool(_explain, state, uploads[0].data, method, target, layer, k, baseline)


def _explain(state, data: bytes, method: str, target: str | None, layer: int | None, k: int,
             baseline: str = "blank") -> ExplainOut:
    predictor = state.predictor
    image = predictor.load_input(data, state.max_pixels)   # uint8 (C, H, W), decoded within the budget
    result = state.explainer.explain(image, method, target, layer, baseline)
    classes = predictor.classes
    prediction = predictor.top_k(result.probabilities[0], k)
    chosen = int(result.target[0])
    values = result.maps[0]
    return ExplainOut(prediction=PredictionOut(**prediction.to_dict()), method=method,
                      target=ClassProbability(label=classes[chosen], probability=round(float(result.probabilities[0, chosen]), 6)),
                      target_index=chosen, layer=result.layer, layer_name=result.layer_name or None, signed=result.signed,
                      map=round_map(values), limit=float(f"{map_limit(values):.4g}"),
                      overlay_png="data:image/png;base64," + base64.b64encode(overlay_png(values, result.signed)).decode("ascii"),
                      input_png=input_png(image), caveat=state.explainer.caveat(method, baseline, layer))
