"""BatchNorm over the global batch when several processes share it (torchrun), on any device.

With DistributedDataParallel each rank normalises its own share of the batch: two processes compute
BatchNorm's statistics over half batches, a different function from one process's (noisier batch
statistics in training, running statistics from rank 0's halves only). That was the measured
difference between one process and two (benchmarks/NOTES.md §20). Here every BatchNorm layer
all-reduces its per-channel sums, so each rank normalises with the statistics of the whole global
batch, and the backward pass all-reduces the gradient of those sums: the same function as one process.

torch.nn.SyncBatchNorm does this on GPUs only; this version is a few tensor operations and one
differentiable all-reduce per layer, so it runs on gloo (CPU) too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GlobalSums(torch.autograd.Function):
    """Sum a tensor over every rank; the gradient of a sum is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def _global_sums(tensor: torch.Tensor) -> torch.Tensor:
    return _GlobalSums.apply(tensor)


class _SyncedBatchNorm:
    """Mixed into nn.BatchNorm1d/2d: training-mode forward with global-batch statistics."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))              # every axis but the channels
        shape = [1, -1] + [1] * (input.dim() - 2)             # (1, C, 1, 1) for feature maps
        x = input.float()                                      # statistics in fp32, whatever autocast gives
        # One all-reduce per layer: the sums of (x - k) and (x - k)² with the count, k the running mean (the
        # same on every rank). Shifting by a value near the mean keeps E[(x-k)²] - E[x-k]² from losing digits.
        k = self.running_mean.view(shape) if self.track_running_stats else x.new_zeros(shape)
        shifted = x - k
        count = x.new_tensor([x.numel() // x.shape[1]])
        total = _global_sums(torch.cat([shifted.sum(dims), (shifted * shifted).sum(dims), count]))
        channels = x.shape[1]
        n = total[-1].detach()
        shift_mean = total[:channels] / n
        variance = (total[channels:2 * channels] / n - shift_mean * shift_mean).clamp_min(0)
        mean = shift_mean + k.view(-1)
        centred = shifted - shift_mean.view(shape)
        y = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():  # as nn.BatchNorm: the unbiased variance goes into the running average
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(variance.detach() * n / (n - 1).clamp_min(1), momentum)
        return y.to(input.dtype).contiguous(memory_format=_layout(input))


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class SyncedBatchNorm1d(_SyncedBatchNorm, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_SyncedBatchNorm, nn.BatchNorm2d):
    pass


_SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d}


def sync_batchnorm(model: nn.Module) -> int:
    """Make every plain BatchNorm layer of `model` normalise over the global batch while training with
    several processes (in place: the same parameters, buffers and state-dict keys; a saved model loads
    as plain BatchNorm). Returns how many layers were changed. Outside a process group, and in eval
    mode, the layers behave exactly as before."""
    changed = 0
    for module in model.modules():
        synced = _SYNCED.get(type(module))
        if synced is not None:
            module.__class__ = synced  # a subclass that only overrides forward: nothing else to move
            changed += 1
    return changed
