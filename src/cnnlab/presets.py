"""Named architectures with their training recipes.

Each preset is a layer spec plus the `data` and `train` settings that go with it; a config file
or CLI flags can override any of them. `tutorial` is the well-known tutorial's network and
recipe exactly (published: 98.06% MNIST test accuracy after 10 epochs): our baseline.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import CnnlabError, shorten


def _conv(out: int, kernel: int = 3, **extra) -> dict[str, Any]:
    return {"type": "conv", "out_channels": out, "kernel_size": kernel, **extra}


# The MNIST presets are designed for a 2-core CPU (benchmarks/NOTES.md has the measurements):
# - the first conv has stride 2: a 1-channel conv at full 28x28 resolution is the least efficient
#   layer on a CPU, and this net reaches more accuracy per CPU-second than full-resolution ones;
# - channels_last: CPU max-pool and BatchNorm kernels are several times faster in that layout;
# - the later convs pool first, as airbench does: BatchNorm and ReLU then run on a quarter of the
#   pixels (a training step 30% faster, and 0.08 points more accurate: NOTES.md §19);
# - one evaluation at the end (eval_every large) for the presets that take seconds.
_SMALL_MNIST_NET = [
    _conv(16, 5, stride=2, padding=2, bias=False), "batchnorm", "relu",                               # (B, 16, 14, 14)
    _conv(32, 3, padding=1, bias=False), {"type": "maxpool", "kernel_size": 2}, "batchnorm", "relu",  # (B, 32, 7, 7)
    _conv(64, 3, padding=1, bias=False), {"type": "maxpool", "kernel_size": 2}, "batchnorm", "relu",  # (B, 64, 3, 3)
    "flatten", {"type": "linear"},
]

def _rgb_net(widths: tuple[int, int, int, int, int]) -> list:
    """The 32x32 colour network: five 3x3 BatchNorm convs, pooled 32 → 16 → 8 → 4 → global."""
    a, b, c, d, e = widths
    return [
        _conv(a, 3, padding=1, bias=False), "batchnorm", "relu",
        _conv(b, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
        _conv(c, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
        _conv(d, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
        _conv(e, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "global_max_pool"},
        {"type": "dropout", "p": 0.1}, {"type": "linear"},
    ]


def _residual(width: int, stride: int = 1) -> dict[str, Any]:
    """ResNet's basic block: two 3x3 BatchNorm convs, the first with `stride`; the shortcut follows the
    ResNet rule (identity when the shape stays, else a strided 1x1 conv + batchnorm), then ReLU."""
    return {"type": "residual", "layers": [_conv(width, 3, stride=stride, padding=1, bias=False), "batchnorm", "relu",
                                           _conv(width, 3, padding=1, bias=False), "batchnorm"]}


# The digits ResNet: the small nets' strided 5x5 stem, then two basic blocks 14 → 7 → 4. A third block
# at 14x14 (32 channels) cost 1.9x the time per epoch for no accuracy (99.65% vs 99.70%; NOTES.md §16).
# Widths 48/96/192 (650 k parameters) rather than 32/64/128: chosen on a validation split over
# 25 epochs of the narrower one in about the same time (NOTES.md §19).
_RESNET_MNIST = [
    _conv(48, 5, stride=2, padding=2, bias=False), "batchnorm", "relu",  # (B, 48, 14, 14)
    _residual(96, stride=2), _residual(192, stride=2),                   # (B, 192, 4, 4)
    "global_avg_pool", {"type": "linear"},
]


# The rgb32 recipe: one-cycle SGD, flips and shifts, flip-TTA.
_RGB_RECIPE = {"batch_size": 256, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
               "schedule": "onecycle", "warmup": 0.15, "label_smoothing": 0.1, "shift": 2, "flip": True, "tta": True,
               "channels_last": True}


def _whitened_net(widths: tuple[int, int, int], airbench: bool = False) -> list:
    """The airbench-style CIFAR network (Keller Jordan's airbench94, arXiv:2404.00498), as a layer spec.

    A fixed 2x2 whitening conv, then three groups of (conv, maxpool, batchnorm, gelu, conv, batchnorm,
    gelu), 31 → 15 → 7 → 3, a global max pool and a linear layer. Pooling right after the first conv
    of a group makes the norm and activation run on a quarter of the pixels. `airbench` adds its
    details: identity-initialised convs, BatchNorm without a learned scale (momentum 0.4, eps 1e-12),
    and logits × 1/9.
    """
    conv = {"init": "dirac"} if airbench else {}
    norm = {"type": "batchnorm", "momentum": 0.4, "eps": 1e-12, "scale": False} if airbench else "batchnorm"
    net: list = [_conv(24, 2, whiten=True), "gelu"]  # (B, 24, 31, 31)
    for width in widths:
        net += [_conv(width, 3, padding=1, bias=False, **conv), {"type": "maxpool", "kernel_size": 2}, norm, "gelu",
                _conv(width, 3, padding=1, bias=False, **conv), norm, "gelu"]
    return net + ["global_max_pool", {"type": "linear", "bias": False}] + ([{"type": "scale", "factor": 1 / 9}] if airbench else [])


# Its recipe: bf16 (on CPUs with bf16 instructions too), one-cycle Nesterov SGD with a 20% warm-up,
# label smoothing 0.2, flips and 2-pixel shifts, flip-TTA (benchmarks/NOTES.md, section 12).
_WHITENED_RECIPE = {"batch_size": 512, "lr": 0.5, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                    "schedule": "onecycle", "warmup": 0.2, "label_smoothing": 0.2, "shift": 2, "flip": True,
                    "tta": True, "channels_last": True, "precision": "bf16"}

# airbench94's optimiser, in cnnlab's terms (its loss is summed over a batch of 1024, cnnlab's is the
# mean): lr 11.5 per 1024 examples over 1 + 1/(1 − 0.85) = 1.5; decay 0.0153·1024/7850 = 0.002 of
# each weight per step = lr × 0.00133; BatchNorm shifts at 64x the lr, everything decayed; its
# triangle schedule 0.2 → 1 (23%) → 0.07; Lookahead; the whitening bias trained for 3 epochs; its
# augmentation: flips alternating by epoch, shifts reflect-padded (benchmarks/NOTES.md, sections 13–14).
_AIRBENCH_RECIPE = {**_WHITENED_RECIPE, "batch_size": 1024, "lr": 1.5, "momentum": 0.85, "weight_decay": 0.002 / 1.5,
                    "weight_decay_all": True, "norm_lr_scale": 64.0, "warmup": 0.23, "lr_start": 0.2, "lr_end": 0.07,
                    "lookahead": True, "whiten_bias_epochs": 3, "tta_shift": 1, "flip_alternate": True,
                    "shift_padding": "reflect"}

# Photos on ImageNet's features: Google's EfficientNet-Lite0 (packaged weights, cnnlab[pretrained]) at its own 224x224
# and normalisation, a new head fitted on cached features (epoch 0), then 3 epochs of the whole network with the
# BatchNorm statistics kept and the backbone at a tenth of the head's rate; the best epoch by validation is kept, so
# the fine-tune only counts where it helps. Measured on small CIFAR folders (benchmarks/pretrained.py, NOTES §21).
PHOTOS = {
    "description": "Your own photos (the default for colour folders when cnnlab[pretrained] is installed): ImageNet's "
                   "EfficientNet-Lite0 at 224x224, a head fitted on cached features, then 3 epochs of fine-tuning.",
    "model": [{"type": "timm", "name": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite0"},
              "global_avg_pool", {"type": "linear"}],
    "colour_folders": True,
    "data": {"image_size": 224},
    "train": {"probe_epochs": 30, "epochs": 3, "batch_size": 32, "lr": 0.001, "optimizer": "adamw",
              "weight_decay": 0.01, "schedule": "cosine", "warmup": 0.0, "label_smoothing": 0.1, "flip": True,
              "init_lr_scale": 0.1, "keep_norm_stats": True, "channels_last": True, "precision": "bf16",
              "eval_batch_size": 100, "eval_every": 1},
}

PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {
        "description": "The tutorial's network and recipe: 2 conv layers, Adam lr 0.01, batch 100, 10 epochs (98.06%).",
        "model": [
            _conv(16, 5, stride=1, padding=2), "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(32, 5, stride=1, padding=2), "relu", {"type": "maxpool", "kernel_size": 2},
            "flatten", {"type": "linear"},
        ],
        # The tutorial feeds ToTensor's 0..1 pixels, unstandardised.
        "data": {"dataset": "mnist", "normalize": False},
        "train": {"epochs": 10, "batch_size": 100, "lr": 0.01, "optimizer": "adam", "schedule": "constant"},
    },
    "default": {
        "description": "MNIST default: a 3-conv BatchNorm CNN, shifts, 2 epochs of one-cycle SGD (>= 99.3%, seconds on a CPU).",
        "model": copy.deepcopy(_SMALL_MNIST_NET),
        "data": {"dataset": "mnist"},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.2, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.15, "label_smoothing": 0.1, "shift": 1, "channels_last": True,
                  "eval_every": 100},
    },
    "fast": {
        "description": "MNIST in seconds: the default network, one epoch of one-cycle SGD, no augmentation, bf16 where the CPU has it (>= 99.0%).",
        "model": copy.deepcopy(_SMALL_MNIST_NET),
        "data": {"dataset": "mnist"},
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.2, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.2, "label_smoothing": 0.1, "channels_last": True,
                  # bf16 autocast: 4.4 s against about 6 s in fp32 whole process on an AMX Xeon, same accuracy
                  # (benchmarks/NOTES.md §17b, §19); a CPU without bf16 trains in fp32 and says so
                  "precision": "bf16", "eval_every": 100},
    },
    "best": {
        "description": "MNIST, the best plain CNN: a wider 3-conv BatchNorm CNN, shifts, 20 epochs of one-cycle SGD, EMA (>= 99.6%).",
        "model": [
            _conv(32, 5, stride=2, padding=2, bias=False), "batchnorm", "relu",             # (B, 32, 14, 14)
            _conv(64, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},  # 7x7
            _conv(128, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},  # 3x3
            "flatten", {"type": "dropout", "p": 0.1}, {"type": "linear"},
        ],
        "data": {"dataset": "mnist"},
        "train": {"epochs": 20, "batch_size": 128, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.1, "label_smoothing": 0.1, "shift": 2, "ema": 0.999,
                  "channels_last": True, "eval_every": 2},
    },
    "resnet-mnist": {
        "description": "MNIST's most accurate: a strided stem and two ResNet basic blocks (48/96/192), shifts, 15 "
                       "epochs of one-cycle SGD, EMA, bf16 (99.71%, in less time than best).",
        "model": copy.deepcopy(_RESNET_MNIST),
        "data": {"dataset": "mnist"},
        "train": {"epochs": 15, "precision": "bf16", "batch_size": 128, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.1, "label_smoothing": 0.1, "shift": 2, "ema": 0.999,
                  "channels_last": True, "eval_every": 100},
    },
    "rgb32": {
        "description": "32x32 colour images (any folder, e.g. CIFAR-10): a 5-conv BatchNorm network with flips and shifts.",
        "model": _rgb_net((32, 64, 128, 128, 256)),
        "data": {"image_size": 32},
        "train": {**_RGB_RECIPE, "epochs": 10, "eval_every": 1},
    },
    "resnet32": {
        "description": "CIFAR-style 32x32 colour folders with residual blocks: a stem and four ResNet basic blocks 32 → 16 → 8 → 4, bf16.",
        "model": [_conv(32, 3, padding=1, bias=False), "batchnorm", "relu",
                  _residual(32), _residual(64, stride=2), _residual(128, stride=2), _residual(256, stride=2),
                  "global_avg_pool", {"type": "linear"}],
        "colour_folders": True,
        "data": {"image_size": 32},
        "train": {**_RGB_RECIPE, "precision": "bf16", "epochs": 10, "eval_every": 2},
    },
    "cifar-fast": {
        "description": "CIFAR-10 from JPEG folders on a CPU: an airbench-style whitened net at half width, 10 epochs (>= 85%).",
        # Half of airbench's widths is a quarter of its FLOPs: 20 s per epoch on 2 cores with bf16.
        "model": _whitened_net((32, 128, 128)),
        "colour_folders": True,
        "data": {"image_size": 32},
        "train": {**_WHITENED_RECIPE, "epochs": 10, "eval_every": 2},
    },
    "cifar-gpu": {
        "description": "CIFAR-10 on a GPU: airbench94's net (64/256/256) and recipe, 10 epochs, batch 1024, shift-TTA.",
        "model": _whitened_net((64, 256, 256), airbench=True),
        "colour_folders": True,
        "data": {"image_size": 32},
        "train": {**_AIRBENCH_RECIPE, "epochs": 10, "eval_every": 2},
    },
    "photos": copy.deepcopy(PHOTOS),
    "finetune": {
        "description": "Your own photos on an ImageNet-pretrained ResNet-18 (timm): a new head on the frozen backbone, "
                       "224x224, 5 epochs (weights: timm's download, or pretrained: FILE.safetensors).",
        # The backbone's own resolution and normalisation are used (backbones.py); a second stage trains the
        # whole network from this run: cnnlab train --init RUN --dataset ... --lr 0.0003
        "model": [{"type": "timm", "name": "resnet18", "pretrained": True}, "global_avg_pool", {"type": "linear"}],
        "colour_folders": True,
        "data": {},
        "train": {"epochs": 5, "batch_size": 32, "lr": 0.001, "optimizer": "adamw", "weight_decay": 0.01,
                  "schedule": "cosine", "warmup": 0.1, "label_smoothing": 0.1, "flip": True, "freeze": "features",
                  "channels_last": True, "eval_every": 1},
    },
}


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of the preset (callers may change it)."""
    if name not in PRESETS:
        raise CnnlabError(f"unknown preset {shorten(name)} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
