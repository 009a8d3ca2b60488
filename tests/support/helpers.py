"""Tiny synthetic data for fast unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab.data import Dataset
from cnnlab.data.tensors import ImageTensors


def pattern_images(n_per_class: int = 40, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three easy classes: horizontal bars, vertical bars, a bright centre square; uint8 (N, 1, S, S)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            img = rng.integers(0, 40, (size, size)).astype(np.uint8)
            offset = rng.integers(0, 2)
            if label == 0:
                img[offset::3, :] = 220
            elif label == 1:
                img[:, offset::3] = 220
            else:
                img[size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 250
            images.append(img)
            labels.append(label)
    return torch.from_numpy(np.stack(images)).unsqueeze(1), torch.tensor(labels)


def pattern_dataset(n_per_class: int = 40, size: int = 12) -> Dataset:
    images, labels = pattern_images(n_per_class, size, seed=0)
    test_images, test_labels = pattern_images(max(4, n_per_class // 4), size, seed=1)
    return Dataset("patterns", ImageTensors(images, labels), ImageTensors(test_images, test_labels),
                   ["horizontal", "vertical", "square"], "resize")


def write_image_folder(root: Path, n_per_class: int = 12, size: int = 12, rgb: bool = False) -> Path:
    """The pattern classes written as PNG/JPEG files in class folders."""
    images, labels = pattern_images(n_per_class, size)
    names = ["horizontal", "vertical", "square"]
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        array = img[0].numpy()
        pil = Image.fromarray(np.stack([array, array // 2, 255 - array], -1) if rgb else array)
        pil.save(folder / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


TINY_SPEC = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, "relu",
             {"type": "maxpool", "kernel_size": 2}, "flatten", {"type": "linear"}]


def save_random_colour_model(run_dir: Path) -> Path:
    """A random-weight TINY_SPEC model for 16x16 RGB inputs, saved as run_dir/model.safetensors (seed 0)."""
    from cnnlab.checkpoint import save_model
    from cnnlab.layers import build_model, parse_layers

    torch.manual_seed(0)
    meta = {"layers": TINY_SPEC, "input_shape": [3, 16, 16], "classes": ["a", "b", "c"],
            "preprocessing": {"kind": "resize", "channels": 3, "size": [16, 16], "mean": [0.5] * 3, "std": [0.25] * 3},
            "dataset": "patterns", "epoch": 1, "metrics": {}, "config": {}}
    save_model(run_dir / "model.safetensors", build_model(parse_layers(TINY_SPEC), (3, 16, 16), 3), meta)
    return run_dir
