"""What keeps a training loop safe, step by step: a NaN/inf loss is a one-line error naming the epoch
and step, a stop request (Ctrl-C, SIGTERM) ends the epoch after the current step, and with several
processes every rank gets the same answer at the same step (a rank leaving alone would leave
DistributedDataParallel waiting forever). Also the running sums of an epoch, kept as tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .data.tensors import EpochBatches
from .errors import CnnlabError
from .runtime import Distributed, StopRequest, get_model_rng


@dataclass
class EpochTotals:
    """Running sums of one epoch on this rank (as tensors: reading them would wait for a GPU)."""

    loss_sum: torch.Tensor   # loss × images
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def start(cls, device: torch.device, position: dict[str, Any] | None = None) -> "EpochTotals":
        """Zeros, or the sums of a stopped epoch's `position`."""
        totals = cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.int64))
        if position:
            totals.loss_sum += position["loss_sum"]
            totals.correct += position["correct"]
            totals.seen = int(position["seen"])
        return totals

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)


def stop_position(batches: EpochBatches, totals: EpochTotals) -> dict[str, Any]:
    """Where a stopped epoch is, to save and resume from: batches done, running totals, random states."""
    return {"epoch": batches.epoch, "batches": batches.done, "of": len(batches), "seen": totals.seen,
            "loss_sum": float(totals.loss_sum), "correct": int(totals.correct),
            "generator": batches.generator.get_state(), "model_rng": get_model_rng(batches.device)}


class StepGuard:
    """Ends training cleanly: a NaN/inf loss is a one-line error naming the epoch and step, and a stop
    request (Ctrl-C, SIGTERM) ends the epoch after the current step. With several processes every
    rank gets the same answer at the same step (a rank leaving alone would leave DDP waiting forever).
    """

    def __init__(self, stop: StopRequest | None = None, dist: Distributed | None = None):
        self.stop = stop
        self.dist = dist or Distributed()

    def should_stop(self, loss: torch.Tensor, batches: EpochBatches, lr: float) -> bool:
        """After a step: raise if the loss is not finite; True if training should stop here."""
        # Reading the loss makes a GPU wait for the step: there it is checked every 50 steps.
        checked = batches.device.type == "cpu" or (batches.done - 1) % 50 == 0
        stopping = False
        if checked:
            value, stopping = _step_check(loss, self.stop, self.dist)
            if not math.isfinite(value):
                raise CnnlabError(f"training diverged: the loss became {value} at epoch {batches.epoch}, step "
                                  f"{batches.done} (lr {lr:.3g}); {_kept(batches.epoch)} — try a lower --lr", exit_code=3)
        if self.dist.world_size > 1:
            return checked and stopping
        return self.stop is not None and self.stop.requested

    def epoch_totals(self, totals: EpochTotals, epoch: int) -> tuple[float, float, float]:
        """(loss sum, correct, images) over all ranks; a stop request on any rank reaches every rank."""
        stop_flag = float(self.stop is not None and self.stop.requested)
        sums = torch.tensor([0.0, 0.0, float(totals.seen), stop_flag], device=totals.loss_sum.device, dtype=torch.float64)
        sums[0], sums[1] = totals.loss_sum.double(), totals.correct.double()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(sums)
            if self.stop is not None and sums[3].item() > 0:
                self.stop.requested = True
        loss_sum, correct, count = sums[:3].tolist()
        if count and not math.isfinite(loss_sum):
            raise CnnlabError(f"training diverged: the loss became {loss_sum} in epoch {epoch}; {_kept(epoch)} "
                              "— try a lower --lr", exit_code=3)
        return loss_sum, correct, count


def _kept(epoch: int) -> str:
    return f"epoch {epoch - 1} stays saved" if epoch > 1 else "no epoch was saved"


def _step_check(loss: torch.Tensor, stop, dist: Distributed) -> tuple[float, bool]:
    """(loss value, stop?) for this step; with several processes all ranks get the same answer."""
    stopping = bool(stop is not None and stop.requested)
    if dist.world_size == 1:
        return loss.item(), stopping
    # Sums: a NaN/inf loss or a stop request on any rank shows on every rank, at the same step.
    flags = torch.stack([loss.detach().double(), torch.tensor(float(stopping), device=loss.device, dtype=torch.float64)])
    torch.distributed.all_reduce(flags)
    value, votes = flags.tolist()
    return value / dist.world_size, votes > 0


def any_rank(flag: bool, dist: Distributed, device: torch.device) -> bool:
    """True on every rank if it is true on any (ranks must take the same branches, or DDP hangs)."""
    if dist.world_size == 1:
        return flag
    votes = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(votes)
    return votes.item() > 0
