"""Datasets held in memory as uint8 tensors; batches are index slices; augmentation on whole batches.

This is what makes CPU training fast: no per-sample Python, no DataLoader workers, no PIL in
the hot loop. A batch is `images[idx]`, converted to float and normalised in one go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from dataclasses import dataclass
from typing import Iterator

import torch

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class ImageTensors:
    """Images (N, C, H, W) uint8 and labels (N,) int64, on any device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> "ImageTensors":
        return ImageTensors(self.images[index], self.labels[index])


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale.

    From each channel's histogram of the 256 values (exact, in float64): 40x faster than summing the
    pixels as floats (30 ms against 1.2 s for MNIST's 47 million pixels), with the same six digits."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).cpu().to(torch.float64)
        mean = (counts * values).sum() / counts.sum()
        variance = (counts * values * values).sum() / counts.sum() - mean * mean
        means.append(round(float(mean), 6))
        stds.append(round(float(variance.clamp_min(1e-12).sqrt()), 6))
    return means, stds


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised; `mean`/`std` are (1, C, 1, 1) on the 0..1 scale."""
    x = images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)  # never the caller's tensor
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def stats_tensors(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator, padding: str = "zeros") -> torch.Tensor:
    """Translate every image by its own random (dy, dx) in [-shift, shift], filling with zeros or a reflection.

    One gather for the whole batch: pad, then pick each image's window with index arithmetic.
    """
    if shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift), mode="reflect" if padding == "reflect" else "constant")
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device="cpu").to(images.device)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device="cpu").to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device)[None, :])          # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=images.device)[None, :])          # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # (B, C, H+2s, W+2s) -> (B, H, W, C) via advanced indexing, then back to (B, C, H, W)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def random_rotate(images: torch.Tensor, degrees: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate every uint8 image by its own random angle in [-degrees, degrees] and zoom it by a factor in
    [1 - scale, 1 + scale] about its centre: one bilinear resampling for the batch, zeros outside."""
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator, device="cpu") * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(b, generator=generator, device="cpu") * 2 - 1) * scale
    # affine_grid maps output to input coordinates: the inverse transform, so divide by the zoom
    cos, sin, zero = torch.cos(angle) / zoom, torch.sin(angle) / zoom, torch.zeros(b)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    return mirror_where(images, torch.rand(images.shape[0], generator=generator, device="cpu") < 0.5)


def mirror_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose entry in the (N,) bool mask is set."""
    return torch.where(mask.to(images.device).view(-1, 1, 1, 1), images.flip(3), images)


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of n images to mirror in this epoch: a fixed random half, and the other half next epoch.

    airbench's scheme: over two epochs every image is seen both ways, where independent coin flips
    show a quarter of the images the same way twice.
    """
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return first if epoch % 2 == 1 else ~first


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True,
                     weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Index batches for one epoch (the last, incomplete one dropped). With per-image `weights`, the epoch's
    n images are drawn with replacement in proportion to them (class-balanced sampling)."""
    order = (torch.multinomial(weights, n, replacement=True, generator=generator) if weights is not None
             else torch.randperm(n, generator=generator))
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def rank_share(batch_size: int, world_size: int) -> int:
    """The images each of `world_size` processes takes of a global batch of `batch_size`."""
    if batch_size % world_size:
        from ..errors import CnnlabError

        raise CnnlabError(f"train.batch_size {batch_size} is the global batch, shared by {world_size} processes: "
                          f"it must divide evenly (e.g. {batch_size - batch_size % world_size or world_size})")
    return batch_size // world_size


class EpochBatches:
    """One epoch of training batches for this rank: shuffled, augmented as whole batches, normalised.

    `batch_size` is the global batch. With several processes (torchrun) every rank draws the same
    global batches and the same augmentation, and takes its own equal share of each: together the
    ranks train on exactly the batches one process would, so 1, 2 or 4 processes learn the same.

    Iterating yields (x, y): float (B, C, H, W) normalised images and their labels, one index slice
    of `data` at a time. All randomness comes from (seed, epoch): the order, the rotations and zooms, the
    shifts and the random flips draw from one generator, in that order, batch by batch (alternating flips from the
    seed alone), so the same epoch is the same batches every time. `done` counts the batches served;
    `resume` continues a stopped epoch exactly, `limit` ends it early.
    """

    def __init__(self, data: ImageTensors, batch_size: int, mean: torch.Tensor, std: torch.Tensor, *, seed: int,
                 epoch: int, shift: int = 0, shift_padding: str = "zeros", flip: bool = False,
                 flip_alternate: bool = False, rotate: float = 0.0, scale: float = 0.0, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, weights: torch.Tensor | None = None):
        self.data, self.mean, self.std, self.epoch = data, mean, std, epoch
        self.rotate, self.scale = rotate, scale
        self.shift, self.shift_padding, self.flip, self.channels_last = shift, shift_padding, flip, channels_last
        self.device = data.images.device
        self.generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        self.batches = shuffled_batches(len(data), batch_size, self.generator, weights=weights)
        share = rank_share(batch_size, world_size)
        self.share = slice(rank * share, (rank + 1) * share) if world_size > 1 else slice(None)
        # alternating flips imply flip: each image's flip is fixed by the seed, mirrored every other epoch
        self.flips = alternating_flips(len(data), seed, epoch).to(self.device) if flip_alternate else None
        self.done = 0

    @classmethod
    def for_training(cls, data: ImageTensors, cfg: "TrainConfig", mean: torch.Tensor, std: torch.Tensor, epoch: int,
                     rank: int = 0, world_size: int = 1, weights: torch.Tensor | None = None) -> "EpochBatches":
        """Epoch `epoch`'s batches with the batch size and augmentation of the training config `cfg`
        (`weights`: per-image sampling weights, for class-balanced epochs)."""
        return cls(data, cfg.batch_size, mean, std, seed=cfg.seed, epoch=epoch, shift=cfg.shift,
                   shift_padding=cfg.shift_padding, flip=cfg.flip, flip_alternate=cfg.flip_alternate,
                   rotate=cfg.rotate, scale=cfg.scale, channels_last=cfg.channels_last, rank=rank,
                   world_size=world_size, weights=weights)

    def __len__(self) -> int:
        return len(self.batches)

    def resume(self, batches_done: int, generator_state: torch.Tensor) -> None:
        """Continue after `batches_done` batches, with the generator state they left."""
        self.done = batches_done
        self.generator.set_state(generator_state)

    def limit(self, steps: int) -> None:
        """Serve at most `steps` more batches (a fractional last epoch)."""
        self.batches = self.batches[:max(0, self.done + steps)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.done < len(self.batches):
            index = self.batches[self.done].to(self.device)
            self.done += 1
            x, y = self.data.images[index], self.data.labels[index]  # (B, C, H, W) uint8, (B,)
            if self.rotate or self.scale:  # drawn first, and only when on: runs without it keep their stream
                x = random_rotate(x, self.rotate, self.scale, self.generator)
            if self.shift:
                x = random_shift(x, self.shift, self.generator, self.shift_padding)
            if self.flips is not None:
                x = mirror_where(x, self.flips[index])
            elif self.flip:
                x = random_flip(x, self.generator)
            x, y = x[self.share], y[self.share]  # this rank's part of the global batch
            yield normalize(x, self.mean, self.std, self.channels_last), y
