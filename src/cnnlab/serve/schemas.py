"""Request and response bodies of the HTTP API (pydantic models; they also make the /docs page)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ClassProbability(BaseModel):
    label: str
    probability: float = Field(description="softmax probability, 0..1")


class PredictionOut(BaseModel):
    """The model's answer for one image."""

    label: str = Field(description="the most likely class")
    index: int = Field(description="its index in the model's class list")
    confidence: float = Field(description="its probability, 0..1")
    top_k: list[ClassProbability] = Field(description="the k most likely classes, best first")


class ImageIn(BaseModel):
    """An image sent as JSON."""

    image: str = Field(description="the image file's bytes in base64, or a data URL (data:image/png;base64,...)")
    top_k: int | None = Field(default=None, ge=1, description="how many classes to return (default 3)")


class BatchIn(BaseModel):
    """Several images sent as JSON."""

    images: list[str] = Field(description="image files in base64 or as data URLs")
    top_k: int | None = Field(default=None, ge=1, description="how many classes to return per image (default 3)")


class ItemError(BaseModel):
    status: int = Field(description="the HTTP status this image alone would have been answered with")
    detail: str


class BatchItem(BaseModel):
    """One image of a batch: its prediction, or why there is none (unreadable, or no digit found)."""

    index: int
    filename: str | None = None
    prediction: PredictionOut | None = None
    error: ItemError | None = None


class BatchOut(BaseModel):
    results: list[BatchItem]
    failed: int = Field(description="how many images got an error instead of a prediction")


class FeatureMapsOut(BaseModel):
    """One layer's output for the image, as a PNG grid of its channels."""

    layer: int = Field(description="1-based index in the layer spec")
    name: str = Field(description="what the layer is, e.g. 'conv 5x5, stride 1, padding 2'")
    shape: list[int] = Field(description="(channels, height, width) of the output")
    columns: int = Field(description="channels per row of the grid")
    png: str = Field(description="data URL of the grid image")
    colormap: str = Field(description="'RdBu_r' (signed: blue negative, white 0, red positive; conv outputs) or "
                                      "'magma' (0 black to the maximum bright; after ReLU or pooling)")
    scale: list[float] = Field(description="[low, high]: the values at the two ends of the colour map, one scale "
                                           "for all the layer's channels")


class SkippedLayerOut(BaseModel):
    """A layer whose output the page does not draw (batchnorm, dropout), and why."""

    layer: int = Field(description="1-based index in the layer spec")
    name: str
    shape: list[int] = Field(description="(channels, height, width) of the output")
    reason: str


class InspectOut(BaseModel):
    """A prediction plus what the model saw and computed."""

    prediction: PredictionOut
    input_png: str = Field(description="data URL of the preprocessed input, exactly as the model saw it")
    input_shape: list[int]
    feature_maps: list[FeatureMapsOut]
    skipped_layers: list[SkippedLayerOut] = Field(default_factory=list,
                                                  description="spatial layers left out of feature_maps, with the reason")


class LayerOut(BaseModel):
    index: int
    type: str
    description: str
    output_shape: list[int]
    parameters: int


class ModelOut(BaseModel):
    """What the model is: classes, input, preprocessing, layers."""

    name: str
    classes: list[str]
    input_shape: list[int] = Field(description="(channels, height, width)")
    preprocessing: dict[str, Any]
    parameters: int
    layers: list[LayerOut]
    metrics: dict[str, Any] = Field(default_factory=dict, description="test metrics stored at training time")
    limits: dict[str, int] = Field(description="max_upload_bytes, max_pixels, max_batch, max_decoded_bytes")


class HealthOut(BaseModel):
    status: str
    model: str
    classes: int


class ErrorOut(BaseModel):
    detail: str


class ExplainOut(BaseModel):
    """A prediction and which input pixels made it (`cnnlab explain`)."""

    prediction: PredictionOut
    method: str = Field(description="gradcam, saliency, integrated-gradients or occlusion")
    target: ClassProbability = Field(description="the class explained and its probability")
    target_index: int = Field(description="its index in the model's class list")
    layer: int | None = Field(default=None, description="Grad-CAM: the 1-based spec layer whose output was used")
    layer_name: str | None = Field(default=None, description="Grad-CAM: that layer and its output shape")
    signed: bool = Field(description="true when negative values mean 'against the class' (diverging colours); "
                                     "Grad-CAM is non-negative")
    map: list[list[float]] = Field(description="the attribution of each input pixel, input height x width, "
                                               "4 significant digits")
    limit: float = Field(description="the largest magnitude in the map (the colour scale's end)")
    overlay_png: str = Field(description="data URL of the map as a transparent colour overlay at the input's size, "
                                         "to lay over input_png")
    input_png: str = Field(description="data URL of the preprocessed input, exactly as the model saw it")
    caveat: str | None = Field(default=None, description="one line to show beside the map when this method failed "
                                                         "(or was never given) the faithfulness check for this model "
                                                         "(`cnnlab explain RUN --check`); null when it passed")
