"""Why did it say 7? Attribution maps for a model's predictions, with Captum.

`explain(bundle, inputs, method)` is the one implementation used by `cnnlab explain`, the HTML
report, `POST /explain`, the page and the Python API. It answers, for each uint8 model input
(what the model sees, `Predictor.prepare`), how much each input pixel counted for one class:

- `gradcam`: Grad-CAM (Selvaraju et al., 2017): the channels of the last block with a useful
  resolution (`gradcam_layer`), weighted by their average gradient, summed, rectified and upsampled
  to the input; coarse, non-negative;
- `layercam`: Layer-CAM (Jiang et al., 2021): like Grad-CAM, but each position's channels are
  weighted by their own rectified gradient, so a finer (earlier) layer still gives a sharp map;
- `saliency`: the gradient of the class score with respect to each pixel (Simonyan et al., 2014),
  signed: red pixels would raise the score if brighter, blue ones lower it;
- `smoothgrad`: saliency averaged over noisy copies of the input (Smilkov et al., 2017): less
  speckle, the same meaning;
- `integrated-gradients`: gradients averaged along the straight path from a baseline image to the
  input, times the difference (Sundararajan et al., 2017); signed, and they sum to the score's
  change from the baseline: the blank image, or (`baseline="blur"`) a blurred copy of the input;
- `occlusion`: how much the score falls when a small square around each pixel is blanked
  (Zeiler and Fergus, 2014); signed; the slowest (one forward pass per square position).

"Blank" is the model's background: black (0) for digit models, whose preprocessing makes white
ink on black; the training images' mean colour (0 after normalisation) for other models.

    cnnlab explain runs/mnist digit.png --method integrated-gradients --target 3

`docs/EXPLAIN.md` has the evidence that these maps mean something, and `cnnlab.faithfulness`
(`cnnlab explain RUN --check`) measures it for one model: deletion, insertion and ROAD against a
random ranking, and the cascading model-randomisation check.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import CnnlabError
from .faithfulness import blurred, scaled_batch, spearman  # noqa: F401 (spearman: used by benchmarks and tests)
from .formatting import colour_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .predict import Predictor
    from .runs import Run
    from .data.preprocess import Preprocessing
    from .layers import LayerInfo

METHODS = {
    "gradcam": "Grad-CAM",
    "layercam": "Layer-CAM",
    "saliency": "saliency (gradient)",
    "smoothgrad": "SmoothGrad",
    "integrated-gradients": "integrated gradients",
    "occlusion": "occlusion",
}
SIGNED = {"gradcam": False, "layercam": False, "saliency": True, "smoothgrad": True, "integrated-gradients": True,
          "occlusion": True}
CAM_METHODS = ("gradcam", "layercam")
# A gradient's sign says which way a pixel should change, not whether it is evidence for the class
# (that depends on what it is replaced with): the check ranks these maps' pixels by magnitude.
SENSITIVITY_METHODS = ("saliency", "smoothgrad")
BASELINES = ("blank", "blur")  # integrated gradients: from the blank image, or from a blurred copy of the input
# Grad-CAM's map is as fine as its layer: 7x7 is what it was designed with (the last conv of VGG and
# ResNet on 224x224 inputs); small inputs need at most a quarter of their side (7 of 28 or 32).
USEFUL_SIDE = 7
IG_STEPS = 32          # the maps change by < 1% of their range beyond ~30 steps on cnnlab's presets
# The batch sizes below are for inputs of up to 32x32 pixels; larger inputs get proportionally fewer (`scaled_batch`).
EXPLAIN_BATCH = 50     # images explained in one pass (`explain` splits larger batches)
IG_BATCH = 512         # path points per forward pass
OCCLUSION_BATCH = 256  # occluded copies per forward pass
SMOOTHGRAD_SAMPLES = 16  # noisy copies per image; the map's rank correlation with 64 copies is > 0.95 on cnnlab's presets
SMOOTHGRAD_NOISE = 0.15  # noise std as a fraction of the input's value range (Smilkov et al.'s 10-20%)
SMOOTHGRAD_BATCH = 512   # noisy copies per backward pass


@dataclass
class Explanation:
    """Attribution maps for a batch of model inputs and what they explain."""

    method: str
    maps: torch.Tensor           # (B, H, W) float32 on the CPU: each input pixel's attribution (channels summed)
    probabilities: torch.Tensor  # (B, classes) softmax of the model
    predicted: torch.Tensor      # (B,) int64: the most likely class
    target: torch.Tensor         # (B,) int64: the class explained
    layer: int | str | None = None  # Grad-CAM / Layer-CAM: the 1-based spec layer read, or "1.8" inside a block
    layer_name: str = ""         # Grad-CAM / Layer-CAM: e.g. "10: relu 64x7x7"
    baseline: str = ""           # integrated gradients: "blank" or "blur"

    @property
    def signed(self) -> bool:
        """Whether the maps have meaningful negative values (shown with a diverging colour map)."""
        return SIGNED[self.method]

    @property
    def title(self) -> str:
        """The method in words, with Grad-CAM's layer or integrated gradients' baseline."""
        extra = f" at layer {self.layer_name}" if self.layer else ""
        return METHODS[self.method] + extra + (" from a blurred baseline" if self.baseline == "blur" else "")

    @property
    def variant(self) -> str:
        """The method as `cnnlab.faithfulness` names its rows (e.g. `integrated-gradients+blur`)."""
        return variant_name(self.method, self.baseline)

    def item(self, i: int, classes: Sequence[str], digits: int = 4) -> dict[str, Any]:
        """Image `i` as a JSON-able dict: prediction, target, method and the map as rounded numbers."""
        predicted, target = int(self.predicted[i]), int(self.target[i])
        out = {"label": classes[predicted], "index": predicted, "confidence": round(float(self.probabilities[i, predicted]), 6),
               "method": self.method, "target": classes[target], "target_index": target,
               "target_confidence": round(float(self.probabilities[i, target]), 6)}
        if self.layer:
            out["layer"] = self.layer
        if self.baseline == "blur":
            out["baseline"] = self.baseline
        out["map"] = round_map(self.maps[i], digits)
        return out


def round_map(values: torch.Tensor, digits: int = 4) -> list[list[float]]:
    """(H, W) -> nested lists of floats with `digits` significant digits (short JSON, exact enough to draw)."""
    return [[float(f"{v:.{digits}g}") for v in row] for row in values.tolist()]


def _captum():
    try:
        import captum.attr as attr
    except ImportError:
        raise CnnlabError("explanations need Captum: pip install 'cnnlab[explain]'") from None
    return attr


def check_captum() -> None:
    """Raise the one-line error that says how to install Captum when it is missing."""
    _captum()


def spec_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's top-level modules in spec order: spec layer i (1-based) is element i - 1."""
    return list(model.features) + list(model.head)


def module_at(model: torch.nn.Module, layer: int | str) -> torch.nn.Module:
    """The module of layer `layer` as `cnnlab summary` numbers it: 3 (a spec layer), or 3.2 (the second
    layer of block 3's body: a residual block's inner layer, a timm backbone's block)."""
    first, *inner = str(layer).split(".")
    module = spec_modules(model)[int(first) - 1]
    for part in inner:
        module = list(module.body)[int(part) - 1]
    return module


def _info_at(infos: list["LayerInfo"], layer: int | str) -> "LayerInfo":
    first, *inner = str(layer).split(".")
    info = infos[int(first) - 1]
    for part in inner:
        info = info.children[int(part) - 1]
    return info


def resolve_target(value: int | str | None, classes: Sequence[str]) -> int | None:
    """A class name or index (as text or number) -> its index; None stays None (the predicted class).

    A name wins over an index: for a model whose classes are '0'..'9' both mean the same anyway.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text in classes:
        return list(classes).index(text)
    try:
        index = int(text)
    except ValueError:
        index = None
    if index is not None and 0 <= index < len(classes) and not isinstance(value, bool):
        return index
    shown = ", ".join(map(str, classes[:12])) + (", ..." if len(classes) > 12 else "")
    raise CnnlabError(f"target {text[:40]!r}: not a class of this model (a name or an index 0-{len(classes) - 1}; "
                      f"classes: {shown})")


def variant_name(method: str, baseline: str = "") -> str:
    """A method and its option as one name: `integrated-gradients+blur` for the blurred baseline."""
    return f"{method}+blur" if baseline == "blur" else method


def useful_side(input_size: Sequence[int]) -> int:
    """The smallest feature-map side Grad-CAM's automatic layer may have: 7, or a quarter of a small
    input's side (at least 2: a 1x1 map cannot say where)."""
    return max(2, min(USEFUL_SIDE, min(input_size) // 4))


def _spatial_side(info: "LayerInfo") -> int:
    return min(info.out_shape[1:]) if len(info.out_shape) == 3 else 0


def gradcam_layer(infos: list["LayerInfo"], layer: int | str | None = None) -> int | str:
    """The layer a CAM reads: `layer` (a 1-based number, a block's inner layer such as "1.8", or a layer
    type, as `cnnlab summary` shows them) after checking it, else chosen automatically.

    Automatically: the last feature block (conv layer or residual block, `LayerType.extracts_features`)
    whose output is at least `useful_side` wide (7x7 on 28x28 and 32x32 inputs: the resolution
    Grad-CAM was designed with; a 3x3 map is three blobs across), else the last one of at least 2x2;
    then on through the layers that keep the layout (BatchNorm, activations, dropout: `LayerType.keeps_layout`)
    that directly follow it, so that the channels are the rectified features the rest of the
    network reads, as in Grad-CAM's paper (its "last convolutional layer" includes the ReLU).
    """
    if layer is not None:
        number = _layer_number(infos, layer)
        info = _info_at(infos, number)
        if len(info.out_shape) != 3:
            raise CnnlabError(f"layer {number} ({info.spec.describe()}) outputs {info.out_shape[0]} numbers, not a "
                              f"spatial map; Grad-CAM needs a layer with a height and width{_suggestion(infos)}")
        if min(info.out_shape[1:]) < 2:
            raise CnnlabError(f"layer {number} ({info.spec.describe()}) outputs {_shape(info.out_shape)}: Grad-CAM "
                              f"needs a map of at least 2x2 to say where{_suggestion(infos)}")
        return number
    blocks = [i for i, info in enumerate(infos) if info.spec.kind.extracts_features and _spatial_side(info) >= 2]
    if not blocks:
        raise CnnlabError("Grad-CAM needs a conv layer with an output of at least 2x2; this model has none "
                          "(try --method integrated-gradients)")
    wanted = useful_side(infos[0].in_shape[1:]) if len(infos[0].in_shape) == 3 else 2
    fine = [i for i in blocks if _spatial_side(infos[i]) >= wanted]
    index = (fine or blocks)[-1]
    while index + 1 < len(infos) and infos[index + 1].spec.kind.keeps_layout:
        index += 1
    return index + 1


def _layer_number(infos: list["LayerInfo"], layer: int | str) -> int | str:
    """A layer given as a number ("10"), a block's inner layer as `cnnlab summary` numbers it ("1.8": an
    int stays an int, a path stays text) or a type ("relu": the last such layer with a spatial map)."""
    text = str(layer).strip()
    if text.lstrip("-").isdigit():
        number = int(text)
        if not 1 <= number <= len(infos):
            raise CnnlabError(f"layer {number}: this model has layers 1-{len(infos)}")
        return number
    parts = text.split(".")
    if len(parts) > 1 and all(part.isdigit() for part in parts):
        try:
            info = _info_at(infos, text)
        except IndexError:
            raise CnnlabError(f"layer {text}: no such layer inside a block of this model (cnnlab summary numbers "
                              "them, e.g. 1.8)") from None
        return info.path or text
    from .layers import LAYER_TYPES

    name = next((key for key, kind in LAYER_TYPES.items() if text.lower() in (key, *kind.aliases)), text.lower())
    matches = [i + 1 for i, info in enumerate(infos) if info.spec.type == name and _spatial_side(info) >= 2]
    if not matches:
        names = sorted({info.spec.type for info in infos if _spatial_side(info) >= 2})
        raise CnnlabError(f"layer {text[:40]!r}: no such layer with a spatial map in this model (give a number "
                          f"from cnnlab summary, or one of: {', '.join(names)})")
    return matches[-1]


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _suggestion(infos: list["LayerInfo"]) -> str:
    try:
        return f" (the automatic choice is layer {gradcam_layer(infos)})"
    except CnnlabError:
        return ""


def background_uint8(preprocessing: "Preprocessing") -> torch.Tensor:
    """The blank input as uint8 (C, 1, 1): black for digit models (white ink on black), the
    training images' mean colour for the others (which normalises to 0)."""
    if preprocessing.kind == "digit":
        return torch.zeros((preprocessing.channels, 1, 1), dtype=torch.uint8)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32) * 255
    return mean.round().clamp(0, 255).to(torch.uint8).view(-1, 1, 1)


def occlusion_window(size: tuple[int, int]) -> tuple[int, int]:
    """(window side, stride) for occlusion: about 1/7 of the input (4 px on 28x28), half-overlapping."""
    side = max(2, round(min(size) / 7))
    return side, max(1, side // 2)


def explain(bundle: "Run", inputs: torch.Tensor, method: str = "gradcam",
            target: int | str | Sequence[int] | torch.Tensor | None = None, layer: int | str | None = None,
            baseline: str = "blank") -> Explanation:
    """Attribution maps for uint8 model inputs (B, C, H, W) or (C, H, W), as `Predictor.prepare` makes them.

    `target`: the class to explain — None for each image's predicted class, a class name or index
    for all images, or one index per image. `layer`: the spec layer Grad-CAM or Layer-CAM reads
    (a 1-based number or a layer type; default `gradcam_layer`). `baseline`: where integrated
    gradients start, "blank" or "blur" (a blurred copy of each input, `faithfulness.blurred`).
    The CAMs hook their layer during the call: a model shared with other threads needs its own
    copy (the server keeps one).
    """
    if method not in METHODS:
        raise CnnlabError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if layer is not None and method not in CAM_METHODS:
        raise CnnlabError(f"a layer chooses where Grad-CAM or Layer-CAM looks; {method} works on the input pixels")
    if baseline not in BASELINES:
        raise CnnlabError(f"unknown baseline {baseline!r} (known: {', '.join(BASELINES)})")
    if baseline != "blank" and method != "integrated-gradients":
        raise CnnlabError(f"a baseline is where integrated gradients start; {method} has none")
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.dtype != torch.uint8 or inputs.dim() != 4 or tuple(inputs.shape[1:]) != tuple(bundle.input_shape):
        raise CnnlabError(f"explain expects uint8 inputs of shape (B, {', '.join(map(str, bundle.input_shape))}), "
                          f"got {inputs.dtype} {tuple(inputs.shape)}")
    step = scaled_batch(EXPLAIN_BATCH, inputs.shape)
    if inputs.shape[0] > step:  # bounded memory: a pass keeps every activation for the backward
        if target is not None and not isinstance(target, (int, str)):
            _targets(target, torch.zeros(inputs.shape[0], dtype=torch.int64), bundle.classes, inputs.shape[0])  # checked whole
            target = torch.as_tensor(target, dtype=torch.int64).flatten()
        parts = [explain(bundle, inputs[i:i + step], method, target if target is None or isinstance(target, (int, str))
                         else target[i:i + step], layer, baseline) for i in range(0, inputs.shape[0], step)]
        return Explanation(method, *(torch.cat([getattr(part, name) for part in parts])
                                     for name in ("maps", "probabilities", "predicted", "target")),
                           parts[0].layer, parts[0].layer_name, parts[0].baseline)
    attr = _captum()
    model = bundle.model
    device = next(model.parameters()).device
    prep = bundle.preprocessing
    layer_number = gradcam_layer(bundle.infos(), layer) if method in CAM_METHODS else None  # 3, or "1.8"
    was_training = model.training
    model.eval()
    try:
        # Gradients are needed even when a caller runs under inference_mode or no_grad.
        with torch.inference_mode(False), torch.enable_grad():
            x = prep.normalize(inputs.to(device))  # (B, C, H, W)
            with torch.no_grad():
                probabilities = torch.softmax(model(x).float(), dim=1)
            predicted = probabilities.argmax(1)
            targets = _targets(target, predicted, bundle.classes, inputs.shape[0])
            blank = prep.normalize(background_uint8(prep).unsqueeze(0).to(device)).expand_as(x).contiguous()
            start = blurred(x) if baseline == "blur" else blank
            maps = _attribute(attr, model, x, targets.tolist(), method, layer_number, start)  # (B, H, W)
    finally:
        model.train(was_training)
    layer_name = ""
    if layer_number:
        info = _info_at(bundle.infos(), layer_number)
        kind = info.spec.describe() if info.spec.type == "timm_block" else info.spec.type
        layer_name = f"{layer_number}: {kind} {_shape(info.out_shape)}"
    return Explanation(method, maps.detach().float().cpu(), probabilities.detach().cpu(), predicted.cpu(),
                       targets.cpu(), layer_number, layer_name, baseline if method == "integrated-gradients" else "")


def _attribute(attr, model: torch.nn.Module, x: torch.Tensor, targets: list[int], method: str,
               layer: int | str | None, blank: torch.Tensor) -> torch.Tensor:
    """One method's map per input pixel (B, H, W) for normalised inputs `x`; `blank` is the baseline input
    (integrated gradients) or the background (occlusion)."""
    if method == "gradcam":
        cam = attr.LayerGradCam(model, module_at(model, layer))
        coarse = cam.attribute(x, target=targets, relu_attributions=True)  # (B, 1, h, w)
        return attr.LayerAttribution.interpolate(coarse, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    if method == "layercam":
        return layer_cam(model, module_at(model, layer), x, targets)
    if method == "saliency":
        return attr.Saliency(model).attribute(x.requires_grad_(), target=targets, abs=False).sum(1)
    if method == "smoothgrad":
        return smooth_gradients(model, x, targets)
    if method == "integrated-gradients":
        ig = attr.IntegratedGradients(model)
        return ig.attribute(x, baselines=blank, target=targets, n_steps=IG_STEPS,
                            internal_batch_size=scaled_batch(IG_BATCH, x.shape)).sum(1)
    side, stride = occlusion_window(tuple(x.shape[-2:]))
    channels = x.shape[1]
    occluded = attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(channels, side, side), strides=(channels, stride, stride), baselines=blank,
        target=targets, perturbations_per_eval=max(1, scaled_batch(OCCLUSION_BATCH, x.shape) // x.shape[0]))
    return occluded.mean(1)  # the window covers every channel: they all hold the same value


def layer_cam(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Layer-CAM (Jiang et al., 2021): relu(sum over channels of relu(gradient) x activation) at
    `module`'s output, upsampled bilinearly to the input. (B, H, W), non-negative."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        scores = model(x)  # (B, classes)
    finally:
        handle.remove()
    activation = captured[0]  # (B, C, h, w)
    index = torch.as_tensor(targets, device=scores.device).view(-1, 1)
    gradient, = torch.autograd.grad(scores.gather(1, index).sum(), activation)
    coarse = (gradient.clamp(min=0) * activation).sum(1, keepdim=True).clamp(min=0)  # (B, 1, h, w)
    return torch.nn.functional.interpolate(coarse, size=tuple(x.shape[-2:]), mode="bilinear",
                                           align_corners=False)[:, 0].detach()


def smooth_gradients(model: torch.nn.Module, x: torch.Tensor, targets: list[int],
                     samples: int = SMOOTHGRAD_SAMPLES, noise: float = SMOOTHGRAD_NOISE, seed: int = 0) -> torch.Tensor:
    """SmoothGrad (Smilkov et al., 2017): the input gradient averaged over `samples` copies with
    Gaussian noise (std `noise` times each image's value range), channels summed. (B, H, W).
    Seeded, so that the same image gets the same map."""
    b = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    # The same noise pattern for every image (scaled to its range): an image's map does not depend on its batch.
    pattern = torch.randn((samples, 1, *x.shape[1:]), generator=generator).to(x.device)  # (S, 1, C, H, W)
    spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).clamp(min=1e-6).view(b, 1, 1, 1)  # (B, 1, 1, 1)
    index = torch.as_tensor(targets, device=x.device)
    total = torch.zeros_like(x)
    per_pass = max(1, scaled_batch(SMOOTHGRAD_BATCH, x.shape) // b)
    for first in range(0, samples, per_pass):
        count = min(per_pass, samples - first)
        noisy = x.unsqueeze(0) + noise * spread * pattern[first:first + count]
        noisy = noisy.reshape(count * b, *x.shape[1:]).requires_grad_()  # (count·B, C, H, W)
        scores = model(noisy).gather(1, index.repeat(count).view(-1, 1)).sum()
        gradient, = torch.autograd.grad(scores, noisy)
        total += gradient.view(count, *x.shape).sum(0)
    return (total / samples).sum(1).detach()


def _targets(target, predicted: torch.Tensor, classes: Sequence[str], n: int) -> torch.Tensor:
    if target is None:
        return predicted.clone()
    if isinstance(target, (int, str)) and not isinstance(target, bool):
        return torch.full((n,), resolve_target(target, classes), dtype=torch.int64)
    values = torch.as_tensor(target, dtype=torch.int64).flatten()
    if values.numel() != n or (values < 0).any() or (values >= len(classes)).any():
        raise CnnlabError(f"target: expected {n} class indices in 0-{len(classes) - 1}, got {values.tolist()[:8]}")
    return values.to(predicted.device)


# ---------------------------------------------------------------------------------------------
# Pictures: the map alone, over the input, and as a figure
# ---------------------------------------------------------------------------------------------

def colour_map(signed: bool) -> str:
    """Blue-white-red for signed maps (0 white), a dark-to-bright ramp for non-negative ones."""
    return "RdBu_r" if signed else "inferno"


def map_limit(values: np.ndarray | torch.Tensor) -> float:
    """The colour scale's end: the largest magnitude (1 for an all-zero map)."""
    limit = float(np.abs(np.asarray(values)).max()) if np.asarray(values).size else 0.0
    return limit if limit > 0 else 1.0


def overlay_rgba(values: torch.Tensor | np.ndarray, signed: bool) -> np.ndarray:
    """(H, W) map -> uint8 (H, W, 4) colours whose opacity grows with |value|: laid over the input,
    strong attributions show, weak ones leave the input visible."""
    values = np.asarray(values, dtype=np.float32)
    unit = values / map_limit(values)  # -1..1 (signed) or 0..1
    index = np.round((unit + 1) / 2 * 255 if signed else np.clip(unit, 0, 1) * 255).astype(np.int64)
    rgba = np.empty(values.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = colour_table(colour_map(signed))[np.clip(index, 0, 255)]
    rgba[..., 3] = np.round(np.clip(np.abs(unit), 0, 1) ** 0.75 * 220).astype(np.uint8)
    return rgba


def overlay_png(values: torch.Tensor | np.ndarray, signed: bool) -> bytes:
    """`overlay_rgba` as PNG bytes, at the input's size."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(overlay_rgba(values, signed), "RGBA").save(buffer, "PNG", compress_level=3)
    return buffer.getvalue()


def _input_unit(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W) grey or (H, W, 3) RGB floats in 0..1 for imshow."""
    array = image.detach().cpu().float().numpy() / 255.0
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def _show_input(ax, image: torch.Tensor, **kwargs) -> None:
    ax.imshow(_input_unit(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _show_overlay(ax, image: torch.Tensor, values: torch.Tensor, signed: bool) -> None:
    _show_input(ax, image)
    ax.imshow(overlay_rgba(values, signed), interpolation="nearest")


def explanation_figure(image: torch.Tensor, explanation: Explanation, i: int, classes: Sequence[str],
                       caption: str = "", caveat: str = "") -> "Figure":
    """One image's explanation: what the model sees, the map (with its colour scale), the map over the
    input; `caveat` (the faithfulness check's line for this method and model) under it."""
    from .visualize import new_figure

    values = explanation.maps[i].numpy()
    signed = explanation.signed
    predicted, target = int(explanation.predicted[i]), int(explanation.target[i])
    p = explanation.probabilities[i]
    fig = new_figure(9.0, 3.6)
    title = f"predicted {classes[predicted]} ({100 * float(p[predicted]):.1f}%)"
    title += (f" · explained: {classes[target]} ({100 * float(p[target]):.1f}%)" if target != predicted
              else " · explained: the predicted class")
    fig.suptitle(f"{caption + ': ' if caption else ''}{title}\n{explanation.title}", fontsize=10)
    axes = fig.subplots(1, 3)
    _show_input(axes[0], image)
    axes[0].set_title("what the model sees", fontsize=9)
    limit = map_limit(values)
    shown = axes[1].imshow(values, cmap=colour_map(signed), vmin=-limit if signed else 0, vmax=limit,
                           interpolation="nearest")
    axes[1].set_xticks([])
    axes[1].set_yticks([])
    axes[1].set_title("red: for the class, blue: against" if signed else "bright: where it looked", fontsize=9)
    fig.colorbar(shown, ax=axes[1], shrink=0.8)
    _show_overlay(axes[2], image, values, signed)
    axes[2].set_title("over the input", fontsize=9)
    if caveat:
        fig.supxlabel(caveat if len(caveat) <= 150 else caveat[:147] + "...", fontsize=8, color="firebrick")
    return fig


def confident_mistakes(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` wrong predictions with the highest probability, most confident first."""
    confidence, predicted = logits.softmax(1).max(1)
    wrong = (predicted != labels).nonzero().flatten()
    return wrong[confidence[wrong].argsort(descending=True)][:count]


def mistakes_gradcam_figure(bundle: "Run", images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                            title: str, count: int = 12) -> "Figure":
    """Grad-CAM of the `count` most confident mistakes (ranked by `logits`, the model's evaluation
    with its test-time augmentation): for the class it said and for the true class."""
    order = confident_mistakes(logits, labels, count)
    if len(order) == 0:
        raise CnnlabError(f"no mistakes on these {labels.shape[0]:,} test images")
    probabilities = logits[order].softmax(1)
    chosen, truth = images[order], labels[order]
    why = explain(bundle, chosen, "gradcam", target=probabilities.argmax(1))
    against = explain(bundle, chosen, "gradcam", target=truth)
    return mistakes_explained_figure(chosen, truth, probabilities, why, against, bundle.classes,
                                     f"{title}: Grad-CAM at layer {why.layer_name}")


def mistakes_explained_figure(images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor,
                              why: Explanation, against: Explanation, classes: Sequence[str], title: str,
                              columns: int = 4) -> "Figure":
    """Mistakes with two Grad-CAMs each: where the model saw the wrong class it chose (`why`) and
    where it saw the true class (`against`). `probabilities` are those the mistakes were ranked by."""
    import math

    from .visualize import new_figure

    n = images.shape[0]
    fig = new_figure(2.0 * columns * 2 + 0.4, 2.3 * max(1, math.ceil(n / columns)) + 0.9)
    fig.suptitle(title, fontsize=11)
    rows = max(1, math.ceil(n / columns))
    axes = fig.subplots(rows, 2 * columns, squeeze=False)
    for slot in range(rows * columns):
        left, right = axes.flat[2 * slot], axes.flat[2 * slot + 1]
        if slot >= n:
            left.axis("off")
            right.axis("off")
            continue
        predicted, label = int(why.target[slot]), int(labels[slot])
        _show_overlay(left, images[slot], why.maps[slot], why.signed)
        left.set_title(f"said {classes[predicted][:10]} {100 * float(probabilities[slot, predicted]):.0f}%",
                       fontsize=8, color="firebrick")
        _show_overlay(right, images[slot], against.maps[slot], against.signed)
        right.set_title(f"true {classes[label][:10]} {100 * float(probabilities[slot, label]):.0f}%", fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Checking that the maps mean something (docs/EXPLAIN.md; benchmarks/explain_sanity.py; tests)
# ---------------------------------------------------------------------------------------------

@dataclass
class DeletionResult:
    """How far the explained class's probability falls, on average, when pixels are blanked."""

    top_drop: float      # blanking the `fraction` of pixels with the highest attribution
    random_drop: float   # blanking as many pixels chosen at random (scattered)
    moved_drop: float    # blanking the top pixels' pattern moved to a random place (same shape, wrong place)
    top_wins: float      # share of images where the top pixels lowered the probability more than random ones
    count: int


def blank_pixels(images: torch.Tensor, pixels: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) with the pixels at flat indices `pixels` (B, k) set to `background` (C, 1, 1)."""
    b, c, h, w = images.shape
    flat = images.reshape(b, c, h * w).clone()
    flat.scatter_(2, pixels.unsqueeze(1).expand(b, c, -1), background.view(1, c, 1).expand(b, c, pixels.shape[1]))
    return flat.view(b, c, h, w)


def moved_pixels(pixels: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Flat pixel indices (B, k) shifted (cyclically) by a random quarter to three quarters of the
    image in both directions: the same pattern, somewhere else."""
    h, w = size
    rows, cols = pixels // w, pixels % w
    dy = torch.randint(h // 4, h - h // 4 + 1, (pixels.shape[0], 1), generator=generator)
    dx = torch.randint(w // 4, w - w // 4 + 1, (pixels.shape[0], 1), generator=generator)
    return (rows + dy) % h * w + (cols + dx) % w


def deletion_test(bundle: "Run", images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                  fraction: float = 0.1, seed: int = 0) -> DeletionResult:
    """Blank (set to the background, `background_uint8`) the `fraction` of pixels with the highest
    attribution and compare how far the target class's probability falls with two controls: as many
    random pixels, and the same pattern of pixels moved elsewhere. A map that points at the evidence
    makes the first fall further.

    The second control matters for models that react strongly to scattered changed pixels: there,
    blanking random pixels can lower the probability more than blanking any compact region does,
    and the question is whether the map found the right region."""
    b, _, h, w = images.shape
    k = max(1, round(fraction * h * w))
    top = maps.reshape(b, h * w).topk(k, dim=1).indices
    generator = torch.Generator().manual_seed(seed)
    random = torch.rand((b, h * w), generator=generator).topk(k, dim=1).indices
    moved = moved_pixels(top, (h, w), generator)
    background = background_uint8(bundle.preprocessing)
    index = targets.view(-1, 1).to(torch.int64)

    def probability(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = bundle.preprocessing.normalize(batch.to(next(bundle.model.parameters()).device))
            return torch.softmax(bundle.model(x).float(), 1).cpu().gather(1, index)[:, 0]

    before = probability(images)
    top_drop = before - probability(blank_pixels(images, top, background))
    random_drop = before - probability(blank_pixels(images, random, background))
    moved_drop = before - probability(blank_pixels(images, moved, background))
    return DeletionResult(float(top_drop.mean()), float(random_drop.mean()), float(moved_drop.mean()),
                          float((top_drop > random_drop).double().mean()), b)


def randomized(bundle: "Run", seed: int = 0) -> "Run":
    """The same bundle with every weight re-initialised (PyTorch's default initialisation): the
    model-randomisation sanity check of Adebayo et al. (2018) compares maps before and after."""
    from .layers import build_model

    torch.manual_seed(seed)
    model = build_model(bundle.layers, bundle.input_shape, len(bundle.classes))
    model.to(next(bundle.model.parameters()).device).eval()
    return bundle.with_model(model)


def check_variants(bundle: "Run") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """What `cnnlab explain RUN --check` measures: every method at its defaults, and integrated
    gradients from a blurred baseline too; as map functions for `faithfulness.check` and the rows'
    details (title, CAM layer)."""
    variants: dict[str, Any] = {}
    details: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        for baseline in (BASELINES if method == "integrated-gradients" else ("blank",)):
            name = variant_name(method, baseline)
            variants[name] = functools.partial(_check_maps, method=method, baseline=baseline,
                                               magnitude=method in SENSITIVITY_METHODS)
            probe = explain(bundle, torch.zeros((1, *bundle.input_shape), dtype=torch.uint8), method, 0,
                            baseline=baseline)
            details[name] = {"method": method, "title": probe.title, "layer": probe.layer,
                             "layer_name": probe.layer_name,
                             "ranked_by": "magnitude" if method in SENSITIVITY_METHODS else "value"}
    return variants, details


def _check_maps(bundle: "Run", images: torch.Tensor, targets: torch.Tensor, method: str,
                baseline: str, magnitude: bool = False) -> torch.Tensor:
    """Maps of `images` for `targets` (their absolute values when `magnitude`)."""
    maps = explain(bundle, images, method, targets, baseline=baseline).maps
    return maps.abs() if magnitude else maps


def run_check(bundle: "Run", count: int, seed: int, methods: Sequence[str] | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Path]:
    """The faithfulness check of `bundle` on `count` seeded test images of its dataset (`methods`: only
    these rows of `check_variants`), saved beside the model, with the saved rows of other methods when
    those measured the same model on the same images (`faithfulness.merged`): the result and the file."""
    from .faithfulness import check, load_check, merged, require_images, sample, save_check

    require_images(count)
    variants, details = check_variants(bundle)
    if methods:
        unknown = [name for name in methods if name not in variants]
        if unknown:
            raise CnnlabError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(variants)})")
        variants = {name: variants[name] for name in methods}
    data = bundle.load_test_data()
    chosen = sample(count, seed, data.test.images.shape[0])
    result = check(bundle, data.test.images[chosen], variants, seed=seed, labels=data.test.labels[chosen],
                   details=details, progress=progress)
    result["dataset"] = bundle.dataset
    result = merged(result, load_check(bundle.path))  # the saved rows of other methods stay, if still comparable
    return result, save_check(result, bundle.path)


def method_caveat(bundle: "Run", method: str, baseline: str = "blank", layer: int | str | None = None,
                  shown_path: str | Path | None = None) -> str:
    """The one-line caveat for maps of `method` on this model from its saved check ("" when it passed)."""
    from .faithfulness import caveat, default_methods, load_check

    number = gradcam_layer(bundle.infos(), layer) if method in CAM_METHODS and layer is not None else None
    name = variant_name(method, baseline)
    command = f"cnnlab explain {shown_path or bundle.run_dir} --check"
    defaults = default_methods(bundle.input_shape)
    if defaults is not None and name not in defaults:  # a check with no --methods would not measure this one
        command += f" --methods {name}"
    return caveat(load_check(bundle.path), name, command, number)


@dataclass
class ExplainedFile:
    """One file's explanation: the batch's `Explanation`, this file's row in it and its picture (or None)."""

    explanation: Explanation
    index: int
    png: Path | None

    def to_dict(self, classes: Sequence[str]) -> dict[str, Any]:
        """The JSON line of `cnnlab explain --json`."""
        return {**self.explanation.item(self.index, classes), **({"png": str(self.png)} if self.png else {})}


def explain_files(predictor: "Predictor", paths: Sequence[str | Path], method: str = "gradcam",
                  target: int | None = None, layer: int | str | None = None, out: Path | None = None,
                  batch_size: int = 32, max_pixels: int | None = None, skipped: list[Path] | None = None,
                  baseline: str = "blank", caveat: str = "") -> Iterator[tuple[Path, ExplainedFile | str]]:
    """Each image file under `paths`, in the order given, with its explanation (a PNG written into the
    existing folder `out` unless it is None, with `caveat` under the map) or the one-line reason it
    cannot be used. Files inside `out` are not explained: pictures of an earlier run there are not inputs."""
    from .predict import MAX_PIXELS, iter_files, prepared_chunks

    run = predictor.run
    used: set[str] = set()
    files = (path for path in iter_files(paths, skipped) if out is None or out.resolve() not in path.resolve().parents)
    for chunk in prepared_chunks(predictor, files, batch_size, max_pixels or MAX_PIXELS):
        good = [(path, item) for path, item in chunk if isinstance(item, torch.Tensor)]
        results: dict[Path, tuple[int, torch.Tensor]] = {}
        if good:
            inputs = torch.stack([item for _, item in good])
            explanation = explain(run, inputs, method, target, layer, baseline)
            results = {path: (i, image) for i, (path, image) in enumerate(good)}
        for path, item in chunk:
            if isinstance(item, str):
                yield path, item
                continue
            i, image = results[path]
            png = None
            if out is not None:
                png = out / _unique_name(path, method, used, out)
                _save(explanation_figure(image, explanation, i, run.classes, path.name, caveat), png)
            yield path, ExplainedFile(explanation, i, png)


def _unique_name(path: Path, method: str, used: set[str], folder: Path | None = None) -> str:
    """A PNG name for `path` that neither this call nor an earlier one (a file in `folder`) has taken:
    explaining again never overwrites an earlier picture."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:80] or "image"
    name, n = f"{stem}-{method}.png", 1
    while name in used or (folder is not None and (folder / name).exists()):
        n += 1
        name = f"{stem}-{n}-{method}.png"
    used.add(name)
    return name


def _save(fig: "Figure", path: Path) -> None:
    from .visualize import save_figure

    save_figure(fig, path)
