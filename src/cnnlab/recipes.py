"""Recipes that fit the data: what a folder holds decides the default batch, length and learning
rate, and anything that would waste a run is said in one warning line before it starts.

Presets count epochs, which is right for the data they were tuned on and wrong for a folder of 500
photos (batch 256 is 2 steps an epoch: 20 steps in 10 epochs, and the model stays at chance). So for a
folder trained with the default recipe (`Config.fitted` names the settings left to fit), the batch
is a small fraction of the images, the length has a floor in optimizer steps, and the learning rate
follows the batch (linear scaling from the preset's own batch and rate). A preset or a config file
still decides everything; then the warnings say when its batch or length is a poor fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import TYPE_CHECKING

from .config import Config, folder_path
from .errors import shorten

if TYPE_CHECKING:
    from .data import Dataset

MIN_STEPS = 500          # the floor: fewer optimizer steps than this rarely train a network from scratch
WARN_STEPS = 300         # fewer than this in all: a warning
BATCH_SHARE = 8          # the batch takes at most 1/8 of the training images
MIN_BATCH, MAX_EPOCHS = 16, 300
FEW_IMAGES = 5           # a class with fewer training images than this can hardly be learnt
IMBALANCE = 10           # largest class over smallest beyond this: a warning


def describe(data: "Dataset") -> str:
    """'500 images in 5 classes, 32x32 colour' (the training images)."""
    c, h, w = data.input_shape
    return f"{len(data.train):,} images in {len(data.classes)} classes, {h}x{w} {'colour' if c == 3 else 'grey'}"


def fit_recipe(config: Config, data: "Dataset", world_size: int = 1) -> tuple[Config, str | None]:
    """`config` with its `fitted` settings (batch_size, epochs, lr) chosen for `data`, and the one line
    that says what was chosen and why (None when nothing was left to fit)."""
    if not config.fitted:
        return config, None
    train = config.train
    n = len(data.train)
    changes: dict[str, object] = {}
    batch = train.batch_size
    if "batch_size" in config.fitted:
        largest = max(MIN_BATCH, n // BATCH_SHARE)
        # never more than the images there are: a tiny folder would otherwise warn about its own recipe
        batch = min(train.batch_size, 2 ** int(math.log2(largest)), 2 ** int(math.log2(max(1, n))))
        batch = max(world_size, batch - batch % world_size)  # a global batch the processes can share
        changes["batch_size"] = batch
    if "lr" in config.fitted and batch != train.batch_size:
        changes["lr"] = float(f"{train.lr * batch / train.batch_size:.3g}")  # linear scaling with the batch
    steps_per_epoch = max(1, n // batch)
    epochs = train.epochs
    if "epochs" in config.fitted:
        epochs = min(MAX_EPOCHS, max(math.ceil(train.epochs), math.ceil(MIN_STEPS / steps_per_epoch)))
        changes["epochs"] = epochs
    fitted = dataclasses.replace(config, train=dataclasses.replace(train, **changes), fitted=list(config.fitted))
    lr = fitted.train.lr
    steps = math.ceil(epochs * steps_per_epoch)
    line = (f"{describe(data)}: {config.preset or 'custom'}, batch {batch}, {_number(epochs)} "
            f"epoch{'' if epochs == 1 else 's'} = {steps:,} step{'' if steps == 1 else 's'}, lr {lr:g} (fitted to the data: "
            f"{', '.join(config.fitted)}; set them to choose yourself)")
    return fitted, line


def warnings_for(config: Config, data: "Dataset") -> list[str]:
    """One line for each thing about this data and recipe that would waste the run; none stops it."""
    train, lines = config.train, []
    n = len(data.train)
    counts = Counter(int(label) for label in data.train.labels.tolist())
    recipe = "the preset's" if config.preset and not config.fitted else "this"
    if train.batch_size > n:
        lines.append(f"train.batch_size {train.batch_size} is larger than the {n:,} training images: every epoch is "
                     f"one partial batch; try --batch-size {max(MIN_BATCH, 2 ** int(math.log2(max(2, n // BATCH_SHARE))))}")
    steps = math.ceil(train.epochs * max(1, n // train.batch_size))  # one partial batch when the data is smaller
    if steps < WARN_STEPS and not train.probe_epochs:  # a head on cached features needs few steps
        epochs = f"{_number(train.epochs)} epoch{'' if train.epochs == 1 else 's'}"
        lines.append(f"{recipe} recipe trains for only {steps:,} optimizer steps in all ({epochs} of "
                     f"{max(1, n // train.batch_size)}): too few to learn much; raise --epochs or lower --batch-size "
                     f"(leave both out with no preset and cnnlab fits them to the data)")
    for label, name in enumerate(data.classes):
        if counts.get(label, 0) < FEW_IMAGES:
            lines.append(f"class {shorten(name)} has {counts.get(label, 0)} training image(s): too few to learn it "
                         f"({FEW_IMAGES} is a bare minimum, 50 or more is better)")
    present = [counts[label] for label in range(len(data.classes)) if counts.get(label)]
    if present and max(present) > IMBALANCE * min(present) and config.data.balance == "none":
        big = max(counts, key=counts.get)
        small = min((label for label in counts if counts[label]), key=counts.get)
        lines.append(f"classes out of balance {counts[big] / counts[small]:.0f}:1 ({data.classes[big]} {counts[big]:,}, "
                     f"{data.classes[small]} {counts[small]:,}): --set data.balance=sampler draws each class equally "
                     "often (or =weights weighs the loss)")
    sizes, modes = data.stats.get("sizes"), data.stats.get("modes") or {}
    # sizes: the smallest and the largest image by pixels (folders.py); "widely" is 4 times a side, 16 in area
    if sizes and sizes[2] * sizes[3] > 16 * sizes[0] * sizes[1]:
        lines.append(f"the images differ widely in size ({sizes[0]}x{sizes[1]} to {sizes[2]}x{sizes[3]} pixels): "
                     "all are resized to the input size, so small ones are blown up and large ones lose detail")
    if len(modes) > 1:
        lines.append("the images come in different modes (" + ", ".join(f"{m} {c:,}" for m, c in sorted(modes.items()))
                     + "): all are converted to " + ("grey" if data.input_shape[0] == 1 else "RGB"))
    return lines


def majority_note(data: "Dataset") -> str | None:
    """With classes out of balance, accuracy flatters: the line that says what always answering the
    largest test class would score (None when the test split is balanced enough for accuracy to read)."""
    counts = Counter(int(label) for label in data.test.labels.tolist())
    if len(counts) < 2 or len(data.test) == 0:
        return None
    label, count = counts.most_common(1)[0]
    share = count / len(data.test)
    if share <= 1.5 / len(data.classes) or share < 0.3:  # no class holds a clear majority (2 classes: over 75%)
        return None
    return (f"note: always answering {shorten(data.classes[label])} would score {100 * share:.2f}% on this test split "
            f"({count} of {len(data.test)} images): judge the model by its per-class recall (cnnlab evaluate)")


def _number(value: float) -> str:
    return f"{value:g}"


def class_weights(labels, num_classes: int):
    """data.balance=weights: each class's loss weighed by 1 / its share of the training images (mean 1)."""
    import torch

    counts = torch.bincount(labels.cpu(), minlength=num_classes).double().clamp_min(1)
    return (len(labels) / (num_classes * counts)).float()


def sample_weights(labels):
    """data.balance=sampler: each image drawn with probability 1 / (its class's size): classes equally often."""
    import torch

    counts = torch.bincount(labels.cpu()).double()
    return (1.0 / counts[labels.cpu()]).float()


PRETRAINED_PRESET = "photos"


def folder_default(dataset: str) -> tuple[str | None, str]:
    """The preset a folder trains with when nothing is chosen, and the line that says so: `photos` (a pretrained
    backbone) for a colour folder when its packaged weights are installed, else None (the from-scratch network
    with its batch, length and rate fitted to the folder, `fit_recipe`)."""
    from .data.folders import looks_grey
    from .presets import PRESETS
    from .pretrained import WEIGHTS, available

    weights = PRESETS[PRETRAINED_PRESET]["model"][0]["pretrained"]
    path = folder_path(dataset)
    if looks_grey(path):
        return None, ""  # digits and scans: the from-scratch network, as before
    if not available(weights):
        return None, (f"training from scratch: ImageNet's {weights} weights are not installed (for photos they do far "
                      f"better: {WEIGHTS[weights].install_hint})")
    return PRETRAINED_PRESET, (f"photos: starting from ImageNet's {weights} ({WEIGHTS[weights].about}); "
                               "to train a network from scratch instead: --scratch")
