"""`cnnlab lr-find`: the learning-rate range test (Leslie Smith, 2015; as fastai does it).

Train a copy of the network for a few hundred steps while the learning rate rises exponentially
from `start` to `end`; record the loss of each step, smooth it (an exponential moving average,
bias-corrected), and stop once the smoothed loss exceeds 4x its minimum (divergence). The
suggestion is fastai's "valley": the longest stretch over which the smoothed loss keeps falling,
and the learning rate half-way along it — before the minimum, where the loss still falls fast
(cnnlab leaves the flat start out of the valley, see `valley`).

The network, its initial weights, its data normalisation and its optimizer are built from the
configuration exactly as `cnnlab train` builds them; the sweep trains a copy, so the model passed
to `range_test` is left untouched. Batches are plain shuffled training batches, without
augmentation: the sweep measures how the loss answers the learning rate, not generalisation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CnnlabError
from .runtime import Distributed, StopRequest

SMOOTHING = 0.98       # weight of the running average (fastai, Smith)
DIVERGENCE = 4.0       # stop once the smoothed loss is this many times its minimum
PLATEAU = 0.01         # the flat start: within 1% of the loss's whole fall from its highest level


@dataclass
class RangeTest:
    """The sweep: per step its learning rate, raw and smoothed loss; the suggestion and why it stopped."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = "end"           # "end": all steps ran; "diverged": the smoothed loss blew up
    suggestion: float = math.nan
    start: float = 0.0
    end: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"suggestion": self.suggestion, "rule": "valley", "stopped": self.stopped, "start": self.start,
                "end": self.end, "steps": len(self.lrs), "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed}


def range_test(model: torch.nn.Module, make_optimizer, batches, start: float = 1e-7, end: float = 10.0,
               steps: int = 200, amp_dtype: torch.dtype | None = None) -> RangeTest:
    """Sweep the learning rate from `start` to `end` over `steps` steps on a copy of `model`.

    `make_optimizer(model)` builds the optimizer for the copy (its groups' "lr_scale" is honoured);
    `batches` yields (x, y) training batches, normalised, at least `steps` of them (it may cycle).
    """
    check_sweep(start, end, steps)
    work = copy.deepcopy(model)  # the caller's weights stay as they are
    work.train()
    optimizer = make_optimizer(work)
    result = RangeTest(start=start, end=end)
    with StopRequest("stopping the sweep after this step (Ctrl-C again to abort) ...") as stop:
        result = _sweep(work, optimizer, batches, start, end, steps, amp_dtype, result, stop)
    if stop.requested:
        raise CnnlabError("interrupted: the range test was stopped before its end; nothing was written",
                          stop.exit_code())
    result.suggestion = valley(result.lrs[:len(result.smoothed)], result.smoothed)
    return result


def check_sweep(start: float, end: float, steps: int) -> None:
    """--start, --end and --steps of a range test: finite, 0 < start < end, at least 10 steps."""
    if not (math.isfinite(start) and math.isfinite(end) and 0 < start < end <= 1e6):
        raise CnnlabError(f"--start {start:g} / --end {end:g}: expected 0 < start < end, both finite and end at most 1e6")
    if steps < 10:
        raise CnnlabError(f"--steps {steps}: a range test needs at least 10 steps (a few hundred is usual)")


def _sweep(work, optimizer, batches, start: float, end: float, steps: int, amp_dtype, result: RangeTest,
           stop: StopRequest) -> RangeTest:
    average, best = 0.0, math.inf
    for step, (x, y) in zip(range(steps), batches):
        if stop.requested:
            break
        lr = start * (end / start) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        device_type = x.device.type
        with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = F.cross_entropy(work(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        result.lrs.append(lr)
        result.losses.append(value)
        if not math.isfinite(value):
            result.stopped = "diverged"
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smooth = average / (1 - SMOOTHING ** (step + 1))  # bias correction: the average starts at 0
        result.smoothed.append(smooth)
        best = min(best, smooth)
        if step > 10 and smooth > DIVERGENCE * best:
            result.stopped = "diverged"
            break
    return result


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's valley rule: the longest run of steps along which the loss keeps falling (the longest
    decreasing subsequence), and the learning rate half-way along it; the flat start left out.

    A network trained from scratch first sits on a plateau for several decades of learning rate,
    where the smoothed loss wobbles by thousandths. fastai's rule counts those wobbles as part of
    the valley, which drags the suggestion down: the tutorial network with Adam got 7.2e-4 where
    one epoch at 3e-3 trains best (benchmarks/NOTES.md, section 15). So the valley starts at the
    plateau's last step: the last one before the minimum within PLATEAU of the whole fall of the
    loss from its highest level.
    """
    # the last steps before a stop are where the loss turns up: leave them out, as fastai does
    n = max(2, len(losses) - 5) if len(losses) > 15 else len(losses)
    if n == 0:
        raise CnnlabError("the range test recorded no finite loss (is the start learning rate far too high?)")
    lowest = min(range(n), key=lambda i: losses[i])
    high = max(losses[:lowest + 1])
    plateau = [i for i in range(lowest) if losses[i] >= high - PLATEAU * (high - losses[lowest])]
    first = plateau[-1] if plateau else 0
    lrs, losses, n = lrs[first:], losses[first:], n - first
    longest = [1] * n
    best_end, best_start = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[best_end]:
            best_end = i
            best_start = best_end - longest[best_end]
    third = (best_end - best_start) / 3
    index = min(n - 1, best_start + int(third) + int(third / 2))
    return float(lrs[index])


# ---------------------------------------------------------------------------------------------
# Building the network as `cnnlab train` does
# ---------------------------------------------------------------------------------------------

def prepare(config, data=None, log=print):
    """(model, make_optimizer, batch iterator, amp dtype, device) for `config`, set up by
    `training.start_state` as `fit` sets a run up: same seed, same initial weights, same normalisation
    (whitening included), same optimizer groups."""
    from .data import load_dataset
    from .data.tensors import normalize, shuffled_batches
    from .optim import make_optimizer
    from .runtime import autocast_dtype
    from .training import start_state, training_device

    cfg = config.train
    device = training_device(cfg, Distributed())
    data = data or load_dataset(config.data, seed=cfg.seed, progress=False)
    state, prep, _ = start_state(config, data, device, log=log)
    mean_t, std_t = prep.stats(device)
    train = data.train.to(device)

    def batches():
        generator = torch.Generator().manual_seed(cfg.seed)
        while True:  # as many epochs as the sweep needs
            for index in shuffled_batches(len(train), cfg.batch_size, generator):
                index = index.to(device)
                yield normalize(train.images[index], mean_t, std_t, cfg.channels_last), train.labels[index]

    amp = autocast_dtype(cfg.precision, device, log)
    return state.model, (lambda m: make_optimizer(cfg, m, state.steps_per_epoch)), batches(), amp, device


def plot(result: RangeTest, title: str):
    """Loss against learning rate (log scale): each step faint, smoothed bold, the suggestion marked."""
    from .visualize import new_figure

    fig = new_figure(8, 4.8)
    ax = fig.subplots()
    finite = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if math.isfinite(loss)]
    if finite:
        ax.plot(*zip(*finite), color="0.75", linewidth=0.8, label="loss of each step")
    ax.plot(result.lrs[:len(result.smoothed)], result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    index = min(range(len(result.smoothed)), key=lambda i: abs(math.log(result.lrs[i] / result.suggestion)))
    ax.axvline(result.suggestion, color="C3", linestyle="--", linewidth=1)
    ax.plot([result.suggestion], [result.smoothed[index]], "o", color="C3", markersize=8,
            label=f"suggestion (valley): {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    smooth = [v for v in result.smoothed if math.isfinite(v)]
    if smooth:  # the diverging tail would squash the interesting part
        low, high = min(smooth), max(smooth[0], min(max(smooth), 2 * smooth[0]))
        ax.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}\n{sweep_line(result)}", fontsize=10)
    return fig


def sweep_line(result) -> str:
    """'179 steps from 1e-07 to 1.43 (the loss diverged)': the rates the sweep really ran, as the
    command prints them and the plot's title shows them."""
    stop = "the loss diverged" if result.stopped == "diverged" else "all steps ran"
    return f"{len(result.lrs)} steps from {result.start:g} to {result.lrs[-1]:.3g} ({stop})"


def find_lr(config, start: float = 1e-7, end: float = 10.0, steps: int = 200, plot_file: str | Path | None = None,
            name: str | None = None, log=print) -> tuple[RangeTest, torch.device]:
    """The range test of the network and recipe of `config` (a resolved `Config`): the sweep and its
    suggestion, and the device it ran on; the plot is written to `plot_file` when given, titled
    with `name` (default: the preset's)."""
    check_sweep(start, end, steps)  # before any data is loaded
    from .data import load_dataset
    from .recipes import fit_recipe

    data = load_dataset(config.data, seed=config.train.seed, progress=False)
    config, recipe = fit_recipe(config, data)  # the batch training would take (a folder without a preset)
    if recipe:
        log(recipe)
    model, make_opt, batches, amp, device = prepare(config, data, log=log)
    result = range_test(model, make_opt, batches, start, end, steps, amp)
    if plot_file is not None:
        from .visualize import save_figure

        title = (f"Learning-rate range test: {name or config.preset or 'custom'}, {config.train.optimizer}, "
                 f"batch {config.train.batch_size}")
        save_figure(plot(result, title), plot_file)
    return result, device

