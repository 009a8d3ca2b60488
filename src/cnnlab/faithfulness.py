"""Can this model's attribution maps be trusted? A faithfulness check per method, against a random ranking.

`check(bundle, images, variants)` scores each attribution method on N test images of one model:

- **deletion** (Petsiuk et al., "RISE", 2018): replace the pixels, most relevant first, by a
  blurred copy of the image, in `STEPS` steps; the area under the explained class's probability
  curve is low when the map found the evidence;
- **insertion** (ibid.): start from the blurred copy and put the original pixels back, most
  relevant first; the area is high when the map found the evidence;
- **ROAD** (Rong et al., "A consistent and efficient evaluation strategy for attribution
  methods", 2022): remove 10%..90% of the pixels, most relevant first (MoRF) and least relevant
  first (LeRF), and fill them by noisy linear imputation (each removed pixel the weighted mean of
  its neighbours, plus a little noise), which hides the shape of the removed set from the model;
  the score is the mean of LeRF − MoRF over the fractions (pytorch-grad-cam's `ROADCombined`
  reports half of it);
- the same three for a **random ranking** of the pixels (seeded): a method *beats random* on a test
  when its paired gain over the random ranking, averaged over the images, is more than `Z`
  standard errors above 0;
- **cascading model randomisation** (Adebayo et al., "Sanity checks for saliency maps", 2018):
  re-initialise the layers from the top down, in `RANDOMISATION_STAGES` stages, and measure the
  Spearman rank correlation of the maps' absolute values with the trained model's; a map that
  stays similar (mean above `RANDOMISATION_LIMIT` once every layer is random) shows the input,
  not what the network learned.

All perturbations work on the normalised input, in batches. The result is a JSON-able dict that
`save_check` writes beside the model (`explain-check.json` in a run folder); `caveat` turns it into
the one line that `cnnlab explain`, the report and the page show beside a map.

This module does not compute maps: `check` takes, per method, a function `(bundle, uint8 images,
targets) -> maps` (`cnnlab.explain.check_variants` supplies cnnlab's own).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import CnnlabError
from .runs import CHECK_FILE  # the run folder's file names are spelled in runs.py

FORMAT = 1
STEPS = 16                      # deletion / insertion: 17 points from 0% to 100% of the pixels
PIXELS_BELOW = 64               # inputs under this many pixels a side (MNIST, CIFAR) are ranked pixel by pixel
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # ROAD's own (and pytorch-grad-cam's) fractions
ROAD_NOISE = 0.01               # ROAD's noise, absolute, on the normalised input (as in ROAD's code)
Z = 2.0                         # "beats random": mean paired gain more than 2 standard errors above 0
TESTS = ("deletion", "insertion", "road")
RANDOMISATION_IMAGES = 32       # images for the randomisation check (maps are recomputed per stage)
RANDOMISATION_STAGES = 4        # re-initialised from the top: 1/4, 1/2, 3/4 and all of the parameterised layers
RANDOMISATION_LIMIT = 0.5       # mean rank correlation with the fully randomised model's maps above this: fails
WEAK = 0.5                      # a gain over random below half the best method's (on any test): a weaker map
IMAGES = 200                    # test images the check uses by default (64 photos could not resolve a gain: NOTES §21)
LARGE_METHODS = ("gradcam",)    # what the check measures by default on inputs larger than 64x64 (`default_methods`)
FORWARD_BATCH = 512             # perturbed images per forward pass
PERTURBED_BYTES = 256 * 2**20   # perturbed copies held at once (`images_at_once`): bounded memory for photos

MapFunction = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]  # (bundle, uint8 images, targets) -> (B, H, W)


# ---------------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------------

def blur_sigma(size: Sequence[int]) -> float:
    """The Gaussian blur's standard deviation in pixels: 1/16 of the shorter side, at least 1 (2 px on
    32x32): it removes the detail a classifier reads (edges, texture) and keeps the colours' layout."""
    return max(1.0, min(size) / 16)


def blurred(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A Gaussian-blurred copy of float images (B, C, H, W), reflecting at the borders."""
    h, w = x.shape[-2:]
    sigma = sigma or blur_sigma((h, w))
    radius = max(0, min(math.ceil(3 * sigma), h - 1, w - 1))
    if radius == 0:
        return x.clone()
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                   groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def region_side(size: Sequence[int]) -> int:
    """The side of the squares the check ranks: a pixel on inputs under `PIXELS_BELOW` pixels a side (MNIST,
    CIFAR, whose checks were validated that way), else the blur's own scale, σ = 1/16 of the shorter side
    (14x14 pixels at 224x224; Samek et al., 2017, perturbed 9x9 regions of ImageNet photos). Every ranking,
    the random one too, moves whole regions. Why the blur's scale: a deleted region smaller than σ becomes
    a dot of the local average, and as many scattered dots are a texture no photo has, which hurts any
    model more than losing its evidence does; the random ranking, the most scattered, then "wins" deletion.
    At 1/32 of the side (7 px, one source pixel of a 32x32 JPEG blown up to 224) it did on two photos runs
    of six; at the blur's scale a region is replaced by a patch of the blurred photo (benchmarks/NOTES.md §21)."""
    return 1 if min(size) < PIXELS_BELOW else round(blur_sigma(size))


def regions(maps: torch.Tensor, side: int) -> torch.Tensor:
    """Maps (B, H, W) -> each `side` x `side` region's mean (B, ⌈H/side⌉, ⌈W/side⌉); the maps when side is 1."""
    return maps if side == 1 else F.avg_pool2d(maps.float().unsqueeze(1), side, ceil_mode=True)[:, 0]


def pixel_order(region_order: torch.Tensor, size: Sequence[int], side: int) -> torch.Tensor:
    """An order of the regions (B, R) -> the order of the pixels (B, H·W): each region's pixels together
    (row by row), the regions in `region_order`'s order; unchanged when side is 1."""
    if side == 1:
        return region_order
    h, w = size
    columns = -(-w // side)
    region_of = ((torch.arange(h) // side)[:, None] * columns + (torch.arange(w) // side)[None, :]).reshape(-1)
    position = torch.empty_like(region_order)
    position.scatter_(1, region_order, torch.arange(region_order.shape[1]).expand_as(region_order).clone())
    return position[:, region_of].argsort(dim=1, stable=True)


def ranking(maps: torch.Tensor, generator: torch.Generator, side: int = 1) -> torch.Tensor:
    """Flat pixel indices (B, H·W), most relevant first, in whole `side` x `side` regions ranked by their
    mean; equal values in a seeded random order (a rectified map is 0 on many pixels, and their order
    must not favour the top-left corner)."""
    b = maps.shape[0]
    flat = regions(maps, side).reshape(b, -1).float()
    shuffle = torch.rand(flat.shape, generator=generator).argsort(1)  # (B, N) a random order of the pixels
    shuffled = flat.gather(1, shuffle)
    order = shuffled.argsort(dim=1, descending=True, stable=True)
    return pixel_order(shuffle.gather(1, order), maps.shape[-2:], side)


def random_ranking(count: int, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded random order of the pixels (or regions) per image (B, N): the control every method must beat."""
    return torch.rand((count, pixels), generator=generator).argsort(1)


def random_pixel_order(count: int, size: Sequence[int], side: int, generator: torch.Generator) -> torch.Tensor:
    """The check's random ranking (B, H·W): its `side` x `side` regions in a seeded random order."""
    rows, columns = -(-size[0] // side), -(-size[1] // side)
    return pixel_order(random_ranking(count, rows * columns, generator), size, side)


def first_pixels(order: torch.Tensor, count: int, size: tuple[int, int]) -> torch.Tensor:
    """bool (B, 1, H, W): True on the first `count` pixels of each image's `order`."""
    b = order.shape[0]
    mask = torch.zeros((b, size[0] * size[1]), dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    return mask.view(b, 1, *size)


def scaled_batch(count: int, shape: Sequence[int]) -> int:
    """`count` images per pass on inputs of up to 32x32 pixels, proportionally fewer on larger ones, at
    least 1: activations (and those a backward pass keeps) grow with the pixels, and a count sized for
    32x32 is 49 times too many at 224x224 (the check's Grad-CAM of 50 photos in one pass took 5.6 GB)."""
    return max(1, count * 32 * 32 // max(32 * 32, shape[-1] * shape[-2]))


def forward_batch(x: torch.Tensor) -> int:
    """Perturbed images per forward pass: `FORWARD_BATCH`, scaled to the input's size (`scaled_batch`)."""
    return scaled_batch(FORWARD_BATCH, x.shape)


def target_probabilities(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor,
                         batch: int | None = None) -> torch.Tensor:
    """Softmax probability of each image's target class, (B,), `batch` images per forward pass
    (default `forward_batch`)."""
    batch = batch or forward_batch(x)
    device = next(model.parameters()).device
    parts = []
    # channels-last on the CPU: the same numbers, EfficientNet-Lite0 at 224x224 1.5x faster (as in `predict`)
    layout = torch.channels_last if device.type == "cpu" and x.dim() == 4 else torch.contiguous_format
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch):
            logits = model(x[start:start + batch].to(device).contiguous(memory_format=layout)).float()
            parts.append(logits.softmax(1).gather(1, targets[start:start + batch].view(-1, 1).to(device))[:, 0].cpu())
    return torch.cat(parts)


def perturbation_curves(model: torch.nn.Module, x: torch.Tensor, substrate: torch.Tensor, order: torch.Tensor,
                        targets: torch.Tensor, insertion: bool, steps: int = STEPS) -> torch.Tensor:
    """RISE's deletion (or insertion) curves, (B, steps + 1): the target's probability after replacing
    the first i/steps of each image's `order` by `substrate` (deletion), or after putting them back
    into the substrate (insertion), i = 0..steps."""
    b, _, h, w = x.shape
    points = []
    for i in range(steps + 1):
        mask = first_pixels(order, round(i / steps * h * w), (h, w))
        points.append(torch.where(mask, x, substrate) if insertion else torch.where(mask, substrate, x))
    stacked = torch.stack(points, 1).reshape(b * (steps + 1), *x.shape[1:])  # (B·(steps+1), C, H, W)
    return target_probabilities(model, stacked, targets.repeat_interleave(steps + 1)).view(b, steps + 1)


def area(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves sampled at evenly spaced points of [0, 1] (trapezoids): (B, P) -> (B,)."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def _neighbour_sum(values: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each pixel's 8 neighbours (ROAD's weights: 1/6 side, 1/12 diagonal), 0 outside the
    image. (N, 1, H, W). Those weights are the separable [1, 2, 1] x [1, 2, 1] / 12 less the centre's 4/12:
    shifted adds, twice as fast as a 3x3 convolution of one channel (most of the check's time on photos)."""
    padded = F.pad(values, (1, 1, 1, 1))
    rows = padded[..., :-2, :] + 2 * padded[..., 1:-1, :] + padded[..., 2:, :]
    return (rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:]) * (1 / 12) - values * (1 / 3)


def impute(x: torch.Tensor, removed: torch.Tensor, noise: float = ROAD_NOISE, generator: torch.Generator | None = None,
           iterations: int = 300, tolerance: float = 1e-4) -> torch.Tensor:
    """ROAD's noisy linear imputation, batched: every removed pixel (`removed`, bool (B, 1, H, W))
    becomes the weighted mean of its in-image neighbours (1/6 side, 1/12 diagonal), removed or not
    — one sparse linear system per image and channel, solved here by conjugate gradients on all
    of them at once — plus Gaussian noise of std `noise`. Agrees with ROAD's sparse direct solver
    (pytorch-grad-cam's `NoisyLinearImputer`) to 1e-4 (tests/test_faithfulness.py)."""
    b, c, h, w = x.shape
    if b > 1 and h * w > 64 * 64:
        # Large images one at a time (measured on 24 photos at 224x224: 2.1 s against 15 s all together): each
        # stops at its own convergence, and the solver's temporaries stay small enough for malloc to reuse
        # (all together, each iteration's 15 MB tensors were fresh pages: 60% of the CPU in the kernel).
        return torch.cat([impute(x[i:i + 1], removed[i:i + 1], noise, generator, iterations, tolerance)
                          for i in range(b)])
    hole = removed.expand(b, c, h, w).reshape(b * c, 1, h, w).to(x.dtype)  # 1 where unknown
    known = x.reshape(b * c, 1, h, w) * (1 - hole)
    weight_sum = _neighbour_sum(torch.ones((1, 1, h, w), dtype=x.dtype))  # in-image neighbours' weights

    def operator(u: torch.Tensor) -> torch.Tensor:  # the system's matrix on the unknowns (symmetric, positive)
        return hole * (weight_sum * u - _neighbour_sum(u))

    rhs = hole * _neighbour_sum(known)
    count = hole.sum((1, 2, 3), keepdim=True).clamp(min=1)
    start = (known.sum((1, 2, 3), keepdim=True) / (h * w - count + 1e-9).clamp(min=1)) * hole  # known pixels' mean
    u = start
    residual = rhs - operator(u)
    direction = residual.clone()
    norm = (residual * residual).sum((1, 2, 3), keepdim=True)
    scale = (rhs * rhs).sum((1, 2, 3), keepdim=True).clamp(min=1e-12)
    for _ in range(iterations):
        if float((norm / scale).max()) < tolerance ** 2:
            break
        product = operator(direction)
        step = norm / (direction * product).sum((1, 2, 3), keepdim=True).clamp(min=1e-30)
        u = u + step * direction
        residual = residual - step * product
        new_norm = (residual * residual).sum((1, 2, 3), keepdim=True)
        direction = residual + (new_norm / norm.clamp(min=1e-30)) * direction
        norm = new_norm
    filled = known + hole * u
    if noise:
        filled = filled + hole * noise * torch.randn(filled.shape, generator=generator, dtype=x.dtype)
    return filled.view(b, c, h, w)


def road_curves(model: torch.nn.Module, x: torch.Tensor, order: torch.Tensor, targets: torch.Tensor,
                generator: torch.Generator, fractions: Sequence[float] = ROAD_FRACTIONS,
                noise: float = ROAD_NOISE) -> tuple[torch.Tensor, torch.Tensor]:
    """ROAD: the target's probability after imputing the first (MoRF) or the last (LeRF) `fraction`
    of each image's `order`, for each fraction: two (B, len(fractions)) tensors."""
    b, _, h, w = x.shape
    pixels = h * w
    curves = []
    for most_first in (True, False):
        points = []
        for fraction in fractions:
            count = round(fraction * pixels)
            removed = first_pixels(order if most_first else order.flip(1), count, (h, w))
            points.append(impute(x, removed, noise, generator))
        stacked = torch.stack(points, 1).reshape(b * len(fractions), *x.shape[1:])
        curves.append(target_probabilities(model, stacked, targets.repeat_interleave(len(fractions)))
                      .view(b, len(fractions)))
    return curves[0], curves[1]


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

def paired_gain(gain: torch.Tensor) -> dict[str, Any]:
    """Mean, standard error and verdict of per-image gains over the random ranking (positive: better)."""
    gain = gain.double()
    n = gain.numel()
    mean = float(gain.mean())
    se = float(gain.std() / math.sqrt(n)) if n > 1 else 0.0
    return {"mean_gain": mean, "standard_error": se, "beats_random": bool(mean > 0 and mean > Z * se)}


@dataclass
class Curves:
    """Per-image scores of one ranking (a method's or the random one)."""

    deletion: torch.Tensor   # (B, STEPS + 1)
    insertion: torch.Tensor  # (B, STEPS + 1)
    morf: torch.Tensor       # (B, len(ROAD_FRACTIONS))
    lerf: torch.Tensor       # (B, len(ROAD_FRACTIONS))

    def scores(self) -> dict[str, torch.Tensor]:
        """Per image: deletion and insertion areas, ROAD's MoRF and LeRF means and their difference."""
        morf, lerf = self.morf.mean(1), self.lerf.mean(1)
        return {"deletion": area(self.deletion), "insertion": area(self.insertion), "road_morf": morf,
                "road_lerf": lerf, "road": lerf - morf}

    def summary(self) -> dict[str, Any]:
        """Mean scores and mean curves, JSON-able."""
        out: dict[str, Any] = {f"{key}_score" if key == "road" else f"{key}_auc" if key in ("deletion", "insertion")
                               else key: float(value.mean()) for key, value in self.scores().items()}
        out["curves"] = {name: [round(float(v), 5) for v in getattr(self, name).mean(0)]
                         for name in ("deletion", "insertion", "morf", "lerf")}
        return out


def images_at_once(x: torch.Tensor) -> int:
    """How many images `measure` perturbs together: all of them while their `STEPS + 1` perturbed
    copies fit in `PERTURBED_BYTES` (200 MNIST digits: 11 MB), fewer for large inputs (200 photos at
    224x224 would need 2 GB per curve, and ROAD's solver several times that)."""
    per_image = (STEPS + 1) * x[0].numel() * x.element_size()
    return max(1, PERTURBED_BYTES // per_image)


def measure(model: torch.nn.Module, x: torch.Tensor, order: torch.Tensor, targets: torch.Tensor,
            seed: int) -> Curves:
    """Deletion, insertion and ROAD curves of one pixel ranking on normalised images `x`, `images_at_once`
    images at a time (one seeded generator for ROAD's noise across them: the same curves every run)."""
    generator = torch.Generator().manual_seed(seed)
    step = images_at_once(x)
    parts = []
    for i in range(0, x.shape[0], step):
        part, ranked, wanted = x[i:i + step], order[i:i + step], targets[i:i + step]
        substrate = blurred(part)
        morf, lerf = road_curves(model, part, ranked, wanted, generator)
        parts.append((perturbation_curves(model, part, substrate, ranked, wanted, insertion=False),
                      perturbation_curves(model, part, substrate, ranked, wanted, insertion=True), morf, lerf))
    return Curves(*(torch.cat(column) for column in zip(*parts)))


def compare(method: Curves, random: Curves) -> dict[str, dict[str, Any]]:
    """Each test's paired gain of a method's ranking over the random one (deletion: lower is better)."""
    mine, theirs = method.scores(), random.scores()
    return {"deletion": paired_gain(theirs["deletion"] - mine["deletion"]),
            "insertion": paired_gain(mine["insertion"] - theirs["insertion"]),
            "road": paired_gain(mine["road"] - theirs["road"])}


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, float64) of a 1-D tensor, ties given their average rank."""
    order = values.argsort()
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() + 1) / 2
    ranks = torch.empty(values.shape[0], dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps of the same shape (NaN when either is constant)."""
    ra, rb = _ranks(a.flatten().double()), _ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def _mean_correlation(a: torch.Tensor, b: torch.Tensor) -> tuple[float | None, int]:
    """Mean Spearman correlation of |a[i]| and |b[i]| over the images where it is defined; and how many were not."""
    values = torch.tensor([spearman(x.abs(), y.abs()) for x, y in zip(a, b)])
    kept = values[~values.isnan()]
    return (float(kept.mean()) if kept.numel() else None), int(values.isnan().sum())


def parameterised_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's top-level spec modules that have weights or statistics, input side first."""
    modules = list(model.features) + list(model.head)
    return [m for m in modules if any(True for _ in m.parameters()) or any(True for _ in m.buffers())]


def randomised_from_top(model: torch.nn.Module, count: int, seed: int) -> torch.nn.Module:
    """A copy of `model` whose top `count` parameterised layers are re-initialised (PyTorch's defaults)."""
    copied = copy.deepcopy(model)
    torch.manual_seed(seed)
    for layer in parameterised_layers(copied)[::-1][:count]:
        for module in layer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return copied.eval()


def cascade_counts(layers: int, stages: int = RANDOMISATION_STAGES) -> list[int]:
    """How many layers (from the top) each stage of the cascade re-initialises, ending with all."""
    return sorted({max(1, round(layers * k / stages)) for k in range(1, stages + 1)})


def model_randomisation(bundle: Any, images: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor,
                        attribute: MapFunction, seed: int) -> dict[str, Any]:
    """Adebayo et al.'s cascading model randomisation: per stage, the mean rank correlation of the
    maps' absolute values with the trained model's `maps` (same images and targets)."""
    total = len(parameterised_layers(bundle.model))
    stages = []
    for count in cascade_counts(total):
        random_bundle = bundle.with_model(randomised_from_top(bundle.model, count, seed + count))
        correlation, undefined = _mean_correlation(maps, attribute(random_bundle, images, targets))
        stages.append({"layers_randomised": count, "of": total, "spearman_abs": correlation, "undefined": undefined})
    final = stages[-1]["spearman_abs"]
    return {"stages": stages, "final": final, "images": int(images.shape[0]),
            "passes": final is None or final < RANDOMISATION_LIMIT}


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------

def sample(count: int, seed: int, available: int) -> torch.Tensor:
    """The seeded choice of `count` test images (the same every run for the same seed)."""
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]


def check(bundle: Any, images: torch.Tensor, variants: Mapping[str, MapFunction], seed: int = 0,
          labels: torch.Tensor | None = None, details: Mapping[str, dict[str, Any]] | None = None,
          randomisation_images: int = RANDOMISATION_IMAGES, progress: Callable[[str], None] | None = None
          ) -> dict[str, Any]:
    """Score every variant's maps of uint8 `images` (B, C, H, W) for their predicted classes against a
    random ranking (deletion, insertion, ROAD) and under model randomisation; a JSON-able dict.
    `details[name]` adds fields to a variant's row (e.g. its title or layer)."""
    model = bundle.model.eval()
    x = bundle.preprocessing.normalize(images.to(next(model.parameters()).device)).float().cpu()
    with torch.inference_mode():
        step = forward_batch(x)
        probabilities = torch.cat([model(x[i:i + step]).float().softmax(1) for i in range(0, len(x), step)])
    targets = probabilities.argmax(1)
    b, _, h, w = x.shape
    side = region_side((h, w))
    started = time.perf_counter()
    random = measure(model, x, random_pixel_order(b, (h, w), side, torch.Generator().manual_seed(seed)), targets,
                     seed + 1)
    result: dict[str, Any] = {
        "format": FORMAT, "model": str(getattr(bundle, "path", "")), "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "images": b, "seed": seed, "input_shape": list(images.shape[1:]), "target": "predicted class",
        "settings": {"steps": STEPS, "region_side": side, "blur_sigma": blur_sigma((h, w)),
                     "road_fractions": list(ROAD_FRACTIONS),
                     "road_noise": ROAD_NOISE, "z": Z, "randomisation_images": min(randomisation_images, b),
                     "randomisation_limit": RANDOMISATION_LIMIT},
        "mean_probability": float(probabilities.max(1).values.mean()),
        "random": random.summary(), "methods": []}
    if progress:
        progress(f"random ranking: measured in {time.perf_counter() - started:.0f} s")
    if labels is not None:
        result["accuracy_on_sample"] = float((targets == labels.cpu()).double().mean())
    for name, attribute in variants.items():
        started = time.perf_counter()
        maps = attribute(bundle, images, targets)
        seconds = time.perf_counter() - started
        curves = measure(model, x, ranking(maps, torch.Generator().manual_seed(seed + 2), side), targets, seed + 1)
        tests = compare(curves, random)
        first = min(randomisation_images, b)
        row = {"name": name, **(details or {}).get(name, {}), **curves.summary(), "tests": tests,
               "beats": sum(t["beats_random"] for t in tests.values()), "of": len(TESTS),
               "randomisation": model_randomisation(bundle, images[:first], targets[:first], maps[:first], attribute,
                                                    seed + 3),
               "seconds_per_image": seconds / b}
        row["verdict"] = verdict(row)
        result["methods"].append(row)
        if progress:
            progress(f"{name}: {row['verdict']} ({time.perf_counter() - started:.0f} s)")
    rate_against_best(result["methods"])
    return result


def rate_against_best(rows: list[dict[str, Any]]) -> None:
    """Add to each row its gain over random as a share of the best row's, per test, and `weaker_than`:
    the best method when the share is below `WEAK` on some test. Beating random is not enough for a
    map that is half right (one that also paints pixels the model ignores): it shows here."""
    for test in TESTS:
        best = max(rows, key=lambda row: row["tests"][test]["mean_gain"], default=None)
        for row in rows:
            gain, top = row["tests"][test]["mean_gain"], best["tests"][test]["mean_gain"]
            row["tests"][test]["share_of_best"] = gain / top if top > 0 else None
            row["tests"][test]["best"] = best["name"]
    for row in rows:
        weak = [t for t in TESTS if (row["tests"][t]["share_of_best"] or 0) < WEAK]
        row["weaker_than"] = {t: row["tests"][t]["best"] for t in weak}


def verdict(row: Mapping[str, Any]) -> str:
    """A method's result in words: "beats random on 3 of 3 tests; survives model randomisation"."""
    failed = [test for test in TESTS if not row["tests"][test]["beats_random"]]
    text = f"beats random on {row['beats']} of {row['of']} tests" + (f" (not {', '.join(failed)})" if failed else "")
    randomisation = row["randomisation"]
    if randomisation["passes"]:
        return text + "; changes under model randomisation"
    return text + f"; hardly changes when the weights are randomised (rank correlation {randomisation['final']:.2f})"


def passed(row: Mapping[str, Any]) -> bool:
    """Whether a method passed every test of the check for this model."""
    return row["beats"] == row["of"] and row["randomisation"]["passes"]


# ---------------------------------------------------------------------------------------------
# The file beside the model, and the caveat line
# ---------------------------------------------------------------------------------------------

def check_path(model_path: str | Path) -> Path:
    """Where the check of a model file is kept: `explain-check.json` beside it (in its run folder)."""
    from .checkpoint import MODEL_FILE

    path = Path(model_path)
    return path.parent / CHECK_FILE if path.name == MODEL_FILE else path.with_suffix(".explain-check.json")


def save_check(result: Mapping[str, Any], model_path: str | Path) -> Path:
    """Write the check as JSON beside the model; the path written."""
    from .files import atomic_write_text

    path = check_path(model_path)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path


def load_check(model_path: str | Path) -> dict[str, Any] | None:
    """The saved check of a model, or None when there is none (or it cannot be read: then it is redone)."""
    from .files import read_json

    try:  # bounded: a run folder is a user's folder, and this file may be anything (a FIFO, /dev/zero)
        data = read_json(check_path(model_path), CHECK_FILE, limit=16 << 20)
    except CnnlabError:
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("methods"), list) else None


def find_row(result: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The check's row for a method variant, if it was checked."""
    for row in (result or {}).get("methods", []):
        if row.get("name") == name:
            return row
    return None


def caveat(result: Mapping[str, Any] | None, name: str, command: str, layer: int | None = None) -> str:
    """One line to show beside a map of method variant `name`, or "" when its check passed.

    No check: how to run one (`command`). A checked CAM at another layer than the one shown: not
    checked there. A failed check: what failed, for this model."""
    if result is None:
        return f"not checked for this model: run `{command}` to see whether these maps can be trusted"
    row = find_row(result, name)
    if row is None:
        methods = "" if "--methods" in command else f" --methods {name}"
        return f"{name} was not part of this model's check (`{command}{methods}`)"
    if layer is not None and row.get("layer") not in (None, layer):
        return f"the check measured {name} at layer {row['layer']}, not at layer {layer}: this map is unchecked"
    if passed(row):
        return _weaker(row)
    return f"caveat: on this model {name} {row['verdict']} ({result['images']} test images)"


def _weaker(row: Mapping[str, Any]) -> str:
    weaker = row.get("weaker_than") or {}
    if not weaker:
        return ""
    tests = ", ".join(weaker)
    best = sorted(set(weaker.values()))
    return (f"note: on this model {row['name']} beats random but gains less than half as much as "
            f"{' / '.join(best)} on {tests}: {' / '.join(best)} maps it more faithfully")


def table(result: Mapping[str, Any]) -> str:
    """The check as a text table: areas, ROAD scores and verdicts, the random ranking first."""
    random = result["random"]
    side = result["settings"].get("region_side", 1)
    lines = [f"{result['images']} test images (seed {result['seed']}), maps of the predicted class"
             + (f", pixels ranked in {side}x{side} regions" if side > 1 else "")
             + "; deletion lower is better, insertion and ROAD (LeRF − MoRF) higher is better",
             f"{'method':28s} {'deletion':>9s} {'insertion':>9s} {'ROAD':>7s} {'rand.corr':>9s}  verdict",
             f"{'random ranking':28s} {random['deletion_auc']:9.3f} {random['insertion_auc']:9.3f} "
             f"{random['road_score']:7.3f} {'':>9s}"]
    for row in result["methods"]:
        final = row["randomisation"]["final"]
        lines.append(f"{row['name']:28s} {row['deletion_auc']:9.3f} {row['insertion_auc']:9.3f} {row['road_score']:7.3f} "
                     f"{'—' if final is None else f'{final:.2f}':>9s}  {row['verdict']}")
    return "\n".join(lines)


def check_figure(result: Mapping[str, Any]) -> Any:
    """The mean deletion, insertion and ROAD (MoRF, LeRF) curves of every method and of the random
    ranking, as a matplotlib figure (one panel per test)."""
    from .visualize import new_figure

    fig = new_figure(13.0, 3.6)
    axes = fig.subplots(1, 4)
    steps = [i / result["settings"]["steps"] for i in range(result["settings"]["steps"] + 1)]
    fractions = result["settings"]["road_fractions"]
    panels = [("deletion", steps, "deletion (lower is better)"), ("insertion", steps, "insertion (higher is better)"),
              ("morf", fractions, "ROAD, most relevant removed first"), ("lerf", fractions, "ROAD, least relevant first")]
    for axis, (key, xs, title) in zip(axes, panels):
        axis.plot(xs, result["random"]["curves"][key], color="black", linestyle="--", label="random ranking")
        for row in result["methods"]:
            axis.plot(xs, row["curves"][key], label=row["name"])
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("fraction of pixels", fontsize=8)
        axis.set_ylim(0, 1)
    axes[0].set_ylabel("probability of the predicted class", fontsize=8)
    axes[-1].legend(fontsize=7)
    return fig


def default_methods(input_shape: Sequence[int]) -> tuple[str, ...] | None:
    """The methods the check measures when none are named: all (None) up to 64x64 pixels; on larger inputs
    only the map `cnnlab explain` shows by default (`LARGE_METHODS`): a 224x224 photo costs 64 times a
    28x28 digit in every perturbed forward pass: Grad-CAM alone on 200 photos takes about 9 minutes on 2
    cores, and occlusion's maps are 169 forward passes per photo (benchmarks/NOTES.md §21)."""
    return None if math.prod(input_shape[-2:]) <= 64 * 64 else LARGE_METHODS


def merged(result: dict[str, Any], previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """`result` with the rows of `previous` (the saved check) for methods it did not measure, when both
    measured the same model on the same images: same images, seed and settings, and the same random
    ranking's scores (a retrained model scores it differently). So a check of one more method adds its row."""
    keys = ("images", "seed", "settings", "random")
    same = previous is not None and all(previous.get(key) == result[key] for key in keys)
    if not same:
        return result
    mine = {row["name"] for row in result["methods"]}
    rows = [row for row in previous["methods"] if row.get("name") not in mine] + result["methods"]
    rate_against_best(rows)
    return {**result, "methods": rows}


def require_images(count: int) -> None:
    """--images must be a positive count."""
    if count < 2:
        raise CnnlabError(f"--images must be at least 2 (a standard error needs two), got {count}")
