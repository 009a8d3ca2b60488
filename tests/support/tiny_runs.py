"""A tiny run folder for picture and report tests: random weights, a few synthetic images on disk.

Real training is not needed to draw pictures; what matters is that the run folder looks exactly
like one `cnnlab train` writes (model.safetensors with metadata, config.json, metrics.jsonl) and
that its dataset can be loaded, so every code path of `show` and `report` runs in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab.checkpoint import save_model
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.layers import build_model, parse_layers

CLASSES = ["horizontal", "square", "vertical"]  # sorted, as the folder loader orders class folders
SIZE = 12
SPEC = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, "relu",
        {"type": "maxpool", "kernel_size": 2},
        {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1}, "relu",
        {"type": "maxpool", "kernel_size": 2}, "flatten", {"type": "linear"}]


def pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    """Horizontal bars, vertical bars or a bright square on noise: (SIZE, SIZE) uint8."""
    image = rng.integers(0, 40, (SIZE, SIZE)).astype(np.uint8)
    offset = int(rng.integers(0, 2))
    if CLASSES[label] == "horizontal":
        image[offset::3, :] = 220
    elif CLASSES[label] == "vertical":
        image[:, offset::3] = 220
    else:
        image[4:8, 4:8] = 250
    return image


def write_dataset(root: Path, rgb: bool = False, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                grey = pattern(label, rng)
                array = np.stack([grey, grey // 2, 255 - grey], -1) if rgb else grey
                Image.fromarray(array).save(folder / f"{i}.png")
    return root


def make_tiny_run(folder: Path, rgb: bool = False, epochs: int = 3, seed: int = 0, spec: list | None = None) -> Path:
    """Write a run folder with a random-weight model over a synthetic folder dataset; returns it."""
    data_root = write_dataset(folder / "data", rgb)
    run = folder / "run"
    channels = 3 if rgb else 1
    torch.manual_seed(seed)
    spec = spec or SPEC
    layers = parse_layers(spec)
    model = build_model(layers, (channels, SIZE, SIZE), len(CLASSES))
    dataset = f"folder:{data_root}"
    config = {"preset": None, "model": spec,
              "data": {**DataConfig(dataset=dataset, image_size=SIZE, channels=channels).__dict__},
              "train": {**TrainConfig(epochs=epochs).__dict__}}
    history = [{"epoch": e, "step": 10 * e, "train_loss": 1.2 / e, "train_accuracy": 0.3 + 0.2 * e,
                "test_loss": 1.3 / e, "test_accuracy": 0.3 + 0.15 * e, "elapsed_seconds": float(e)}
               for e in range(1, epochs + 1)]
    save_model(run / "model.safetensors", model, {
        "layers": spec, "input_shape": [channels, SIZE, SIZE], "classes": CLASSES,
        "preprocessing": {"kind": "resize", "channels": channels, "size": [SIZE, SIZE],
                          "mean": [0.3] * channels, "std": [0.3] * channels},
        "dataset": dataset, "epoch": epochs, "metrics": history[-1], "config": config,
    })
    (run / "config.json").write_text(json.dumps(config, indent=2))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    return run
