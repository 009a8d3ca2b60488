"""A head trained on cached features: what is frozen runs once per image, not once per epoch.

A pretrained backbone with a new head (`train.probe_epochs`, or `train.freeze: features` throughout)
would run the same frozen layers over the same images every epoch, and at 224x224 those layers are
nearly all of the work. Frozen layers compute a fixed function of the image (in eval mode: a frozen
BatchNorm keeps its statistics, `finetune.keep_statistics`), so each training image runs through them
once per view it can be seen in — itself, and its mirror image with `train.flip` — and each
validation image once (its mirror too with flip-TTA). An epoch then draws its batches from those
features, with the same order and flips an image epoch would draw: seconds for what took minutes.

The head's leading layers that have no weights and only pool or flatten (the registry's
`starts_head` layers: global pooling, flatten) are folded into the cache, so a backbone's
1280x7x7 maps are kept as 1280 numbers per view. It applies where the augmentation is views alone
(no shift, rotation or zoom) and nothing is compiled; elsewhere training runs on images as always.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data.tensors import EpochBatches, ImageTensors, normalize
from .errors import CnnlabError
from .layers import parse_layers, trace

if TYPE_CHECKING:
    from .config import Config, TrainConfig
    from .data import Dataset
    from .data.preprocess import Preprocessing
    from .runtime import Distributed

# A cache larger than this share of the machine's available memory is not made (training runs on images).
MEMORY_SHARE = 0.25


def why_not(config: "Config") -> str | None:
    """Why this run's augmentation or settings rule out cached features (None when they allow them)."""
    cfg = config.train
    if not cfg.cache_features:
        return "train.cache_features is off"
    if cfg.shift or cfg.rotate or cfg.scale:
        return "shifts, rotations and zooms change every image anew each epoch"
    if cfg.compile:
        return "train.compile compiles the whole network"
    if cfg.tta_shift:
        return "train.tta_shift evaluates shifted copies"
    return None


def head_start(config: "Config", data: "Dataset", model: nn.Module) -> int:
    """How many of the head's layers the cache takes in: the leading ones without weights that pool or flatten."""
    infos = trace(parse_layers(config.model), data.input_shape, len(data.classes))[len(model.features):]
    count = 0
    for info, module in zip(infos, model.head):
        if not info.spec.kind.starts_head or any(True for _ in module.parameters()):
            break
        count += 1
    return count


@dataclass
class FeatureCache:
    """Features of the training images (views, N, ...) and of the validation images (views, N, ...), all as the
    frozen part of the model computes them; `skip` head layers are part of that."""

    train: torch.Tensor
    labels: torch.Tensor
    val: torch.Tensor | None
    skip: int
    seconds: float

    def rest(self, model: nn.Module) -> nn.Module:
        """What trains on the cached features: `model`'s head after the layers folded into the cache."""
        return model.head[self.skip:]

    def batches(self, cfg: "TrainConfig", epoch: int, rank: int = 0, world_size: int = 1,
                weights: torch.Tensor | None = None) -> "FeatureBatches":
        return FeatureBatches(self.train, self.labels, cfg, epoch, rank, world_size, weights)

    @torch.inference_mode()
    def val_logits(self, model: nn.Module) -> torch.Tensor:
        """Logits of the validation images from `model`'s head (the views averaged, as flip-TTA averages them)."""
        head = self.rest(model)
        was_training = head.training
        head.eval()
        logits = torch.stack([head(view).float() for view in self.val]).mean(0).cpu()
        head.train(was_training)
        return logits


def build_cache(model: nn.Module, config: "Config", data: "Dataset", prep: "Preprocessing", device: torch.device,
                dist: "Distributed", amp_dtype: torch.dtype | None, log) -> FeatureCache | None:
    """Run every training (and validation) image through the frozen part of `model` once per view; None (and a
    line that says why) where the cache would take more than MEMORY_SHARE of the memory available."""
    from .evaluate import EvalSettings

    cfg = config.train
    skip = head_start(config, data, model)
    frozen = nn.Sequential(*model.features, *model.head[:skip])
    views = 2 if cfg.flip else 1
    val_views = 2 if EvalSettings.from_train(cfg).tta_flip else 1
    with torch.inference_mode():
        one = frozen.eval()(normalize(data.train.images[:1].to(device), *prep.stats(device), cfg.channels_last))
    size = one[0].numel() * 4 * (views * len(data.train) + (0 if data.val is None else val_views * len(data.val)))
    if size > MEMORY_SHARE * _available_memory():
        log(f"note: the cached features would take {size / 1e9:.1f} GB; the head trains on the images instead")
        return None
    t0 = time.perf_counter()
    train = _features(frozen, data.train.images, views, prep, cfg, device, dist, amp_dtype)
    val = None if data.val is None else _features(frozen, data.val.images, val_views, prep, cfg, device, dist, amp_dtype)
    seconds = time.perf_counter() - t0
    log(f"cached features: {len(data.train):,} training images x {views} view{'s' if views > 1 else ''}"
        + (f" and {len(data.val):,} validation images" if data.val is not None else "")
        + f" through the frozen layers ({'x'.join(map(str, train.shape[2:]))} numbers each) in {seconds:.1f} s")
    return FeatureCache(train, data.train.labels.to(device), val, skip, seconds)


def _available_memory() -> int:
    """Bytes of memory available to this process (Linux's MemAvailable; 8 GB where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@torch.inference_mode()
def _features(frozen: nn.Module, images: torch.Tensor, views: int, prep: "Preprocessing", cfg: "TrainConfig",
              device: torch.device, dist: "Distributed", amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(views, N, ...) float features; with several processes each computes every world_size-th batch and
    all of them add up the results (a sum of zeros elsewhere), so every rank holds the same cache."""
    was_training = frozen.training
    frozen.eval()
    mean, std = prep.stats(device)
    batch = max(1, min(cfg.eval_batch_size, 64))
    starts = list(range(0, images.shape[0], batch))
    out: torch.Tensor | None = None
    for number, start in enumerate(starts):
        if number % dist.world_size != dist.rank:
            continue
        x = normalize(images[start:start + batch].to(device), mean, std, cfg.channels_last)
        for view in range(views):
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                y = frozen(x.flip(3) if view else x).float()
            if out is None:
                out = torch.zeros((views, images.shape[0], *y.shape[1:]), device=device)
            out[view, start:start + y.shape[0]] = y
    frozen.train(was_training)
    if dist.world_size > 1:
        if out is None:  # this rank had no batch: the shape from one image
            shape = frozen.eval()(normalize(images[:1].to(device), mean, std, cfg.channels_last)).shape[1:]
            frozen.train(was_training)
            out = torch.zeros((views, images.shape[0], *shape), device=device)
        torch.distributed.all_reduce(out)
    return out


class FeatureBatches(EpochBatches):
    """One epoch of batches of cached features for this rank, drawn as `EpochBatches` draws images: the same
    order from (seed, epoch), each image's view (mirrored or not) from the same generator."""

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, cfg: "TrainConfig", epoch: int, rank: int,
                 world_size: int, weights: torch.Tensor | None):
        super().__init__(ImageTensors(views[0], labels), cfg.batch_size, None, None, seed=cfg.seed, epoch=epoch,
                         flip=cfg.flip, flip_alternate=cfg.flip_alternate, rank=rank, world_size=world_size,
                         weights=weights)
        self.views = views

    def __iter__(self):
        while self.done < len(self.batches):
            index = self.batches[self.done].to(self.device)
            self.done += 1
            if self.flips is not None:
                view = self.flips[index].long()
            elif self.views.shape[0] > 1:
                view = (torch.rand(index.shape[0], generator=self.generator) < 0.5).long().to(self.device)
            else:
                view = torch.zeros_like(index)
            x, y = self.views[view, index], self.data.labels[index]  # (B, ...) features, (B,)
            yield x[self.share], y[self.share]


def fit_probe(model: nn.Module, cache: FeatureCache, cfg: "TrainConfig", class_weights: torch.Tensor | None = None
              ) -> dict[str, float]:
    """Fit `model`'s head on the cached features for train.probe_epochs passes (AdamW at train.lr, cosine to 0, the
    run's weight decay and label smoothing); returns the metrics of its last pass.

    Every process runs the same whole batches (the head is small), so the head comes out the same on any number
    of processes; the passes draw from their own epochs of the seed (-1, -2, ...), not the later epochs'."""
    import math

    import torch.nn.functional as F

    head = cache.rest(model)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_pass = len(cache.batches(cfg, -1))
    total, step = cfg.probe_epochs * per_pass, 0
    t0 = time.perf_counter()
    for number in range(1, cfg.probe_epochs + 1):
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in cache.batches(cfg, -number):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = head(x).float()
            loss = F.cross_entropy(logits, y, weight=class_weights, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        if not math.isfinite(loss_sum):
            raise CnnlabError(f"training diverged: the loss became {loss_sum} in pass {number} of the head on cached "
                              f"features (lr {cfg.lr:g}); try a lower --lr", exit_code=3)
    seconds = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "images_per_second": total and seen * cfg.probe_epochs / max(seconds, 1e-9), "epoch_seconds": seconds,
            "cache_seconds": cache.seconds, "passes": cfg.probe_epochs}


def frozen_features(model: nn.Module, cfg: "TrainConfig") -> bool:
    """Whether train.freeze leaves nothing before the head to train (then every epoch can run on the cache)."""
    return bool(cfg.freeze) and not any(p.requires_grad for p in model.features.parameters())
