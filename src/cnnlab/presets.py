"""Named architectures with their training recipes.

Each preset is a layer spec plus the `data` and `train` settings that go with it; a config file
or CLI flags can override any of them. `tutorial` is the well-known tutorial's network and
recipe exactly (published: 98.06% MNIST test accuracy after 10 epochs): our baseline.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import CnnlabError


def _conv(out: int, kernel: int = 3, **extra) -> dict[str, Any]:
    return {"type": "conv", "out_channels": out, "kernel_size": kernel, **extra}


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
        "description": "MNIST default: a small BatchNorm CNN with shifts, one-cycle SGD and EMA (>= 99.3%).",
        "model": [
            _conv(24, 5, padding=2, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(48, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(96, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            "flatten", {"type": "linear"},
        ],
        "data": {"dataset": "mnist"},
        "train": {"epochs": 4, "batch_size": 128, "lr": 0.2, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.15, "label_smoothing": 0.1, "shift": 2, "ema": 0.0,
                  "eval_every": 100},
    },
    "fast": {
        "description": "MNIST in seconds: a tiny BatchNorm CNN, one epoch of one-cycle SGD (>= 99.0%).",
        "model": [
            _conv(16, 5, padding=2, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(32, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            "flatten", {"type": "linear"},
        ],
        "data": {"dataset": "mnist"},
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.2, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.2, "label_smoothing": 0.1, "eval_every": 100},
    },
    "best": {
        "description": "MNIST best single model: a wider BatchNorm CNN, shifts, long one-cycle schedule, EMA (>= 99.6%).",
        "model": [
            _conv(32, 3, padding=1, bias=False), "batchnorm", "relu",
            _conv(32, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(64, 3, padding=1, bias=False), "batchnorm", "relu",
            _conv(64, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(128, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "global_max_pool"},
            {"type": "linear"},
        ],
        "data": {"dataset": "mnist"},
        "train": {"epochs": 12, "batch_size": 128, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.1, "label_smoothing": 0.1, "shift": 2, "ema": 0.999,
                  "eval_every": 2},
    },
    "rgb32": {
        "description": "32x32 colour images (any folder, e.g. CIFAR-10): a 6-conv BatchNorm network with flips and crops.",
        "model": [
            _conv(32, 3, padding=1, bias=False), "batchnorm", "relu",
            _conv(64, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(128, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(128, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "maxpool", "kernel_size": 2},
            _conv(256, 3, padding=1, bias=False), "batchnorm", "relu", {"type": "global_max_pool"},
            {"type": "dropout", "p": 0.1}, {"type": "linear"},
        ],
        "data": {"image_size": 32},
        "train": {"epochs": 10, "batch_size": 256, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "warmup": 0.15, "label_smoothing": 0.1, "shift": 2, "flip": True, "tta": True,
                  "eval_every": 1},
    },
}
# Folder datasets default to the RGB preset; the name `cifar-fast` is the CIFAR-10 recipe.
PRESETS["cifar-fast"] = {**copy.deepcopy(PRESETS["rgb32"]),
                         "description": "CIFAR-10 from JPEG folders on a CPU: the rgb32 network, tuned for ~85% in 15 minutes."}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of the preset (callers may change it)."""
    if name not in PRESETS:
        raise CnnlabError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
