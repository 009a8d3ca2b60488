"""Training: `fit()` reads top to bottom; `train_one_epoch()` is the whole inner loop.

The data sits in memory as uint8 tensors (on the GPU when training there); a batch is an index
slice, augmented as a whole batch. All randomness of epoch e comes from (seed, e), so a run
resumed after epoch e continues exactly as if it had never stopped, and the same seed on the
same CPU gives the same final weights.

With `torchrun` (WORLD_SIZE > 1) every rank trains on its own shard of each epoch through
DistributedDataParallel (gloo on CPU, NCCL on GPU); metrics are all-reduced and only rank 0
writes files or prints.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import MODEL_FILE, load_resume_state, plain_state, save_model, save_resume_state
from .files import atomic_write_text, remove_stale_temp_files
from .config import Config, TrainConfig
from .data import Dataset, load_dataset
from .data.preprocess import Preprocessing
from .data.tensors import EpochBatches, channel_stats, normalize, shuffled_batches
from .display import progress_bar
from .errors import CnnlabError
from .runs import (CONFIG_FILE, METRICS_FILE, RESUME_FILE, check_free_space, check_writable, new_run_dir)
from .evaluate import EvalSettings, compute_metrics, infer
from .finetune import apply_init, scale_loaded_lr
from .layers import build_model, init_whitening, parse_layers, spec_to_list, whitening_conv
from .runtime import (Distributed, StopRequest, autocast_dtype, get_model_rng, init_distributed, keep_freed_memory,
                      resolve_device, set_model_rng, set_threads)
from .tensorboard_log import start_import as start_tensorboard_import, tensorboard_log


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int = 0) -> torch.optim.Optimizer:
    # No weight decay on biases and norm layers unless train.weight_decay_all: decaying them usually
    # only hurts. Frozen weights (a whitening layer) are not trained at all. Each group's "lr_scale"
    # multiplies the scheduled lr (train_one_epoch sets it every step).
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    whiten = whitening_conv(model)
    whiten_bias = whiten.bias if whiten is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    norms = [p for p in trainable if id(p) in norm_ids]
    rest = [p for p in trainable if id(p) not in norm_ids and p is not whiten_bias]
    small_decay = cfg.weight_decay if cfg.weight_decay_all else 0.0
    groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in rest if p.ndim <= 1], "weight_decay": small_decay, "lr_scale": 1.0},
              # PyTorch's decay is lr × weight_decay × w: divided by the scale, its strength stays the same
              {"params": norms, "weight_decay": small_decay / cfg.norm_lr_scale, "lr_scale": cfg.norm_lr_scale}]
    if whiten_bias is not None and whiten_bias.requires_grad:
        until = round(cfg.whiten_bias_epochs * steps_per_epoch) if cfg.whiten_bias_epochs else None
        groups.append({"params": [whiten_bias], "weight_decay": small_decay, "lr_scale": 1.0, "until_step": until})
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


def group_lr(group: dict[str, Any], step: int, total_steps: int, cfg: TrainConfig) -> float:
    until = group.get("until_step")
    if until is not None and step >= until:
        return 0.0
    return cfg.lr * lr_factor(step, total_steps, cfg) * group.get("lr_scale", 1.0)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The schedule as a pure function of the step: resuming needs no scheduler state."""
    if cfg.schedule == "constant" or total_steps <= 0:
        return 1.0
    warmup = int(cfg.warmup * total_steps)
    if step < warmup:
        start = cfg.lr_start if cfg.schedule == "onecycle" else 0.0
        return start + (1.0 - start) * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "onecycle":  # linear anneal to lr_end after the warm-up
        return max(0.0, 1.0 - progress) * (1.0 - cfg.lr_end) + cfg.lr_end
    return max(0.0, 1.0 - progress)  # linear


class WeightAveraging:
    """An average of the weights kept beside training: `update` after every optimizer step,
    `end_epoch` when an epoch's steps are done, `averaged` gives the model to evaluate and save.
    `state` (tensors) travels in the resume file."""

    state: dict[str, torch.Tensor] | None = None

    def update(self, model: torch.nn.Module, step: int) -> None:
        raise NotImplementedError

    def end_epoch(self, model: torch.nn.Module) -> None:
        """Called when an epoch's steps are done, before it is evaluated and saved."""

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with the averaged weights, for evaluation and the saved model."""
        return model


def weight_averaging(cfg: TrainConfig, model: torch.nn.Module, total_steps: int) -> WeightAveraging | None:
    """An EMA for evaluation (train.ema), Lookahead, which trains on its average (train.lookahead), or None."""
    if cfg.ema > 0:
        return EMA(model, cfg.ema)
    return Lookahead(total_steps) if cfg.lookahead else None


class Lookahead(WeightAveraging):
    """airbench's Lookahead: slow weights that the model is pulled back to every 5 steps.

    From 30% of training, every 5 steps: slow ← lerp(slow, model, 1 − decay), then model ← slow, with
    decay = 0.95^5 · (step/steps)^3: little averaging at first, strong at the end. At each epoch's
    end the model is put on the slow weights, so evaluation and the saved model use them.
    `state` holds the slow weights once started.
    """

    EVERY, START, DECAY = 5, 0.3, 0.95 ** 5

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.state = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step number `step` (1-based)."""
        if step < self.START * self.total_steps or (self.state is not None and step % self.EVERY):
            return
        current = model.state_dict()
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in current.items()}
        else:
            decay = self.DECAY * (step / self.total_steps) ** 3
            for k, v in current.items():
                if v.is_floating_point():
                    self.state[k].lerp_(v, 1.0 - decay)
                    v.copy_(self.state[k])

    @torch.no_grad()
    def end_epoch(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    v.copy_(self.state[k])


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and a copy of the buffers) for evaluation.

    The decay warms up as min(decay, (1 + step)/(10 + step)), as TensorFlow's moving averages do: with
    a fixed 0.999 a one-epoch run of 469 steps would still evaluate weights that are 63% the random
    initial ones (it scored 19% on MNIST where the model itself had 98%).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._float_keys = [k for k, v in self.state.items() if v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int = 0) -> None:
        """After optimizer step number `step` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        current = model.state_dict()
        torch._foreach_lerp_([self.state[k] for k in self._float_keys], [current[k] for k in self._float_keys],
                             1.0 - decay)
        for k, v in current.items():
            if not v.is_floating_point():
                self.state[k].copy_(v)

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` holding the EMA weights (training goes on with the model's own)."""
        import copy

        shadow = copy.deepcopy(model)
        shadow.load_state_dict(self.state)
        return shadow


def train_one_epoch(model, optimizer, batches: EpochBatches, cfg: TrainConfig, step: int, total_steps: int,
                    averaging: WeightAveraging | None = None, guard: StepGuard | None = None, progress=None,
                    resume_from: dict[str, Any] | None = None, on_step=None) -> tuple[dict[str, float], int]:
    """One pass over `batches` (this rank's shard of one epoch); returns (metrics, global step).

    `on_step(step, loss, lr)`, if given, gets each step's detached loss tensor and learning rate (TensorBoard).

    `resume_from` (a mid-epoch position, see `StopRequest.position`) skips the batches already done
    and restores the random state and running totals they left, so the epoch ends exactly as if
    never stopped.
    """
    guard = guard or StepGuard()
    device = batches.device
    amp_dtype = autocast_dtype(cfg.precision, device, log=_quiet)  # fit() has said why, if it matters
    model.train()
    torch.manual_seed(cfg.seed * 100_003 + batches.epoch + 1)  # dropout and other in-model randomness
    totals = EpochTotals.start(device, resume_from)
    if resume_from:
        batches.resume(resume_from["batches"], resume_from["generator"])
        set_model_rng(resume_from["model_rng"], device)
    batches.limit(total_steps - step)
    start = time.perf_counter()
    for x, y in batches:  # x: (B, C, H, W) float, augmented and normalised
        for group in optimizer.param_groups:
            group["lr"] = group_lr(group, step, total_steps, cfg)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if on_step is not None:
            on_step(step, loss.detach(), optimizer.param_groups[0]["lr"])
        if averaging is not None:
            averaging.update(getattr(model, "module", model), step)
        totals.add(loss, logits, y)
        if guard.should_stop(loss, batches, optimizer.param_groups[-1]["lr"]):
            guard.stop.position = _stop_position(batches, totals)
            break
        if progress is not None:
            _show_progress(progress, batches.done, totals, time.perf_counter() - start, guard.dist.world_size)
    loss_sum, correct, count = guard.epoch_totals(totals, batches.epoch)
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
            "images_per_second": count / max(elapsed, 1e-9), "epoch_seconds": elapsed}, step


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


def _stop_position(batches: EpochBatches, totals: EpochTotals) -> dict[str, Any]:
    """Where a stopped epoch is, to save and resume from: batches done, running totals, random states."""
    return {"epoch": batches.epoch, "batches": batches.done, "of": len(batches), "seen": totals.seen,
            "loss_sum": float(totals.loss_sum), "correct": int(totals.correct),
            "generator": batches.generator.get_state(), "model_rng": get_model_rng(batches.device)}


def _show_progress(progress, batches_done: int, totals: EpochTotals, elapsed: float, world_size: int) -> None:
    progress.update(1)
    if (batches_done - 1) % 20 == 0:
        seen = max(totals.seen, 1)
        progress.set_postfix_str(f"loss {totals.loss_sum.item() / seen:.4f} acc {100 * totals.correct.item() / seen:.2f}% "
                                 f"{totals.seen * world_size / max(elapsed, 1e-9):,.0f} img/s")


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


def _any_rank(flag: bool, dist: Distributed, device: torch.device) -> bool:
    """True on every rank if it is true on any (ranks must take the same branches, or DDP hangs)."""
    if dist.world_size == 1:
        return flag
    votes = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(votes)
    return votes.item() > 0


def fit(config: Config, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
        data: Dataset | None = None, log=print, on_epoch=None) -> dict[str, Any]:
    """Train `config`, writing the run folder; returns the final metrics and the run path.

    `on_epoch(metrics)`, if given, is called after each epoch is saved (every rank, the same metrics);
    an exception it raises (a tuner pruning the run) ends training there, the saved epochs kept.
    """
    dist, created = init_distributed()
    run_dir = Path(out_dir) if out_dir else new_run_dir(config.preset)
    new_folder = not run_dir.exists()
    try:
        return _fit(config, dist, run_dir, resume, progress, data, log, on_epoch)
    except BaseException:
        # A mistake caught before training (missing data, a setting that does not fit the images)
        # leaves no empty run folder behind.
        if new_folder and dist.is_main and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _fit(config: Config, dist: Distributed, run_dir: Path, resume: bool, progress: bool, data: Dataset | None,
         log, on_epoch=None) -> dict[str, Any]:
    cfg = config.train
    if cfg.tensorboard and dist.is_main:
        start_tensorboard_import()  # while the data loads
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    set_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()
    if dist.is_main:
        check_writable(run_dir)
        remove_stale_temp_files(run_dir)
    t0 = time.perf_counter()

    data = data or load_dataset(config.data, seed=cfg.seed, progress=progress and dist.is_main)
    model, prep, start = initial_model(config, data, run_dir, resume, log if dist.is_main else _quiet)
    layers = parse_layers(config.model)
    mean_t, std_t = prep.stats(device)
    train_data = data.train.to(device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(cfg.precision, device, log if dist.is_main else _quiet)
    steps_per_epoch = len(shuffled_batches(len(train_data), cfg.batch_size, torch.Generator().manual_seed(0),
                                           world_size=dist.world_size))
    if steps_per_epoch == 0:
        raise CnnlabError(f"the training set has {len(train_data)} images, fewer than one batch of {cfg.batch_size}")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    optimizer = scale_loaded_lr(make_optimizer(cfg, model, steps_per_epoch), model, start, cfg.init_lr_scale)
    averaging = weight_averaging(cfg, model, total_steps)  # EMA, Lookahead or None; saved in the resume file
    if dist.is_main:
        check_free_space(run_dir, model)

    epochs = math.ceil(cfg.epochs)
    start_epoch, step, history, partial = 1, 0, [], None
    if resume:
        start_epoch, step, history, partial = _restore(run_dir, model, optimizer, averaging)
        if dist.is_main:
            if partial:
                log(f"resuming {run_dir} in epoch {partial['epoch']}/{epochs}, after its step {partial['batches']}")
            else:
                log(f"resuming {run_dir} after epoch {start_epoch - 1} of {epochs}")
    if dist.is_main:
        atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
        if start is not None and not resume:
            start.save(run_dir)

    train_model = model
    if cfg.compile:
        train_model = _compile(model, train_data, mean_t, std_t, log)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    if dist.is_main:
        log(f"training {config.preset or 'custom'} on {data.name}: {len(data.train):,} train / {len(data.test):,} test images, "
            f"{data.input_shape[0]}x{data.input_shape[1]}x{data.input_shape[2]}, {len(data.classes)} classes, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, {device}"
            + (", bf16" if amp_dtype is not None else "")
            + (f", {dist.world_size} processes" if dist.world_size > 1 else ""))
    metrics: dict[str, Any] = history[-1] if history else {}
    with StopRequest() as stop, tensorboard_log(run_dir, config, step, cfg.tensorboard and dist.is_main, log) as tb:
        guard = StepGuard(stop, dist)
        for epoch in range(start_epoch, epochs + 1):
            bar = None
            if progress and dist.is_main:  # a bar in a terminal or a notebook, else only the epoch lines
                bar = progress_bar(min(steps_per_epoch, total_steps - step), f"epoch {epoch}/{epochs}", "step")
            batches = EpochBatches(train_data, cfg.batch_size, mean_t, std_t, seed=cfg.seed, epoch=epoch, shift=cfg.shift,
                                   shift_padding=cfg.shift_padding, flip=cfg.flip, flip_alternate=cfg.flip_alternate,
                                   rotate=cfg.rotate, scale=cfg.scale, channels_last=cfg.channels_last, rank=dist.rank, world_size=dist.world_size)
            train_metrics, step = train_one_epoch(train_model, optimizer, batches, cfg, step, total_steps, averaging,
                                                  guard, bar, resume_from=partial if partial and partial["epoch"] == epoch else None,
                                                  on_step=tb.step if tb else None)
            if bar is not None:
                bar.close()
            if stop.position is not None:
                break  # stopped inside the epoch: that step is saved below
            if averaging is not None:
                averaging.end_epoch(model)
            metrics = {"epoch": epoch, "step": step, **{k: round(v, 6) for k, v in train_metrics.items()}}
            if epoch % cfg.eval_every == 0 or epoch == epochs:
                test, test_logits = _evaluate(averaging.averaged(model) if averaging else model, data, prep, cfg, device)
                metrics.update({"test_loss": test["loss"], "test_accuracy": test["accuracy"]})
            metrics["elapsed_seconds"] = round(time.perf_counter() - t0, 3)
            history.append(metrics)
            if dist.is_main:
                _save_epoch(run_dir, model, optimizer, averaging, config, data, prep, layers, epoch, step, history)
                log(_epoch_line(metrics, epochs))
                if tb is not None:
                    tb.epoch(metrics)
                    if epoch == epochs:  # always evaluated
                        tb.finish(metrics, test, data.test.images, data.test.labels, test_logits, data.classes)
            if on_epoch is not None:
                on_epoch(dict(metrics))
            if _any_rank(stop.requested, dist, device):
                stop.requested = True
                break  # the signal came after the epoch's last step, or while it was evaluated and saved
    finished = bool(history) and history[-1]["epoch"] >= epochs  # the signal came while the last epoch was saved
    if stop.requested and not finished:
        code = stop.exit_code()
        done = history[-1]["epoch"] if history else 0
        position = stop.position
        if position is not None:
            if dist.is_main:  # the optimizer, EMA and random state of this very step: resuming is exact
                _save_stop_position(run_dir, model, optimizer, averaging, done, step, history, position)
            raise CnnlabError(f"interrupted at epoch {position['epoch']}, step {position['batches']} of "
                              f"{position['of']}; saved — continue with: cnnlab train --resume {run_dir}", exit_code=code)
        if not done:
            raise CnnlabError(f"interrupted during epoch 1, before any epoch was saved; nothing to resume in {run_dir}",
                              exit_code=code)
        raise CnnlabError(f"interrupted during epoch {done + 1}; {run_dir} holds epoch {done}: "
                          f"continue with: cnnlab train --resume {run_dir}", exit_code=code)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return {"run_dir": str(run_dir), "metrics": metrics, "seconds": time.perf_counter() - t0}


def initial_model(config: Config, data: Dataset, run_dir: Path | None = None, resume: bool = False,
                  log=print) -> tuple[torch.nn.Module, Preprocessing, Any]:
    """(model, preprocessing, start) as a run begins: the spec built with the run's seed (validated on the
    data's shape), `train.init`'s or a backbone's weights loaded and `train.freeze` applied (`start`:
    what was loaded, or None), inputs normalised with the data's statistics (or the loaded model's), and
    a whitening first layer computed from a seeded sample. `fit` and `lr-find` both start here."""
    cfg = config.train
    layers = parse_layers(config.model)
    torch.manual_seed(cfg.seed)
    model = build_model(layers, data.input_shape, len(data.classes))  # validates before any training
    start = apply_init(model, config, data, run_dir, resume, log)  # train.init, train.freeze
    if cfg.shift_padding == "reflect" and cfg.shift >= min(data.input_shape[1:]):
        raise CnnlabError(f"train.shift: {cfg.shift} pixels cannot be reflect-padded on {data.input_shape[1]}x"
                          f"{data.input_shape[2]} images; use a smaller shift or shift_padding: zeros")
    if start is not None and start.mean:  # the loaded layers were trained on inputs normalised their way
        mean, std = start.mean, start.std
    elif config.data.normalize:
        mean, std = channel_stats(data.train.images)
    else:
        mean, std = [0.0] * data.input_shape[0], [1.0] * data.input_shape[0]
    prep = Preprocessing(kind=data.preprocess_kind, channels=data.input_shape[0], size=data.input_shape[1:],
                         mean=mean, std=std)
    if layers[0].params.get("whiten") and not resume and start is None:  # on a seeded sample: folder datasets are stored class by class
        sample = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed))[:5000]
        init_whitening(model, prep.normalize(data.train.images[sample]))
    return model, prep, start


def _quiet(*_) -> None:
    pass


def _evaluate(model, data: Dataset, prep: Preprocessing, cfg: TrainConfig, device) -> tuple[dict[str, Any], torch.Tensor]:
    """Test metrics and the logits they come from."""
    logits = infer(model, data.test.images, prep, EvalSettings.from_train(cfg), device)
    return compute_metrics(logits, data.test.labels, data.classes), logits


def _epoch_line(m: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.4f}  train acc {100 * m['train_accuracy']:.2f}%")
    if "test_accuracy" in m:
        text += f"  test acc {100 * m['test_accuracy']:.2f}%"
    return text + f"  {m['images_per_second']:,.0f} img/s  {m['elapsed_seconds']:.1f}s"


def _save_epoch(run_dir: Path, model, optimizer, averaging: WeightAveraging | None, config: Config, data: Dataset, prep: Preprocessing, layers,
                epoch: int, step: int, history: list[dict]) -> None:
    # The resume file is the source of truth (weights + optimizer of one epoch, one atomic file) and
    # is written last: if it says epoch e, every other file already holds epoch e; a kill before it
    # makes --resume redo epoch e, which gives the same result. model.safetensors is the deliverable;
    # the weights used for evaluation are the EMA ones when on.
    try:
        deliverable = averaging.averaged(model) if averaging else model
        save_model(run_dir / MODEL_FILE, deliverable, {
            "layers": spec_to_list(layers),
            "input_shape": list(data.input_shape),
            "classes": data.classes,
            "preprocessing": prep.to_dict(),
            "dataset": data.name,
            "epoch": epoch,
            "metrics": history[-1],
            "config": config.to_dict(),
        })
        atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history))
        save_resume_state(run_dir / RESUME_FILE, optimizer, averaging.state if averaging else None,
                          {"epoch": epoch, "step": step, "history": history}, model_state=plain_state(model))
    except OSError as exc:  # disk full, quota, folder removed: every file there is still whole
        raise CnnlabError(f"cannot save epoch {epoch} to {run_dir} ({exc.strerror or exc}); nothing saved before is lost "
                          f"— free some space and continue with: cnnlab train --resume {run_dir}", exit_code=4) from None


def _save_stop_position(run_dir: Path, model, optimizer, averaging: WeightAveraging | None, done: int, step: int, history: list[dict],
                        position: dict[str, Any]) -> None:
    partial = {k: v for k, v in position.items() if not torch.is_tensor(v)}
    rng = {"generator": position["generator"], "model_rng": position["model_rng"].cpu()}
    try:
        save_resume_state(run_dir / RESUME_FILE, optimizer, averaging.state if averaging else None,
                          {"epoch": done, "step": step, "history": history, "partial": partial},
                          model_state=plain_state(model), rng_state=rng)
    except OSError as exc:
        raise CnnlabError(f"interrupted, and cannot save to {run_dir} ({exc.strerror or exc}); "
                          f"--resume continues after epoch {done}") from None


def _restore(run_dir: Path, model, optimizer, averaging: WeightAveraging | None) -> tuple[int, int, list[dict], dict[str, Any] | None]:
    path = run_dir / RESUME_FILE
    if not path.exists():
        raise CnnlabError(f"{run_dir}: nothing to resume (no {RESUME_FILE}; did the first epoch finish?)")
    optimizer_state, ema_state, model_state, info = load_resume_state(path)
    saved_keys = [sorted(group) for group in optimizer_state["param_groups"]]
    if saved_keys != [sorted(group) for group in optimizer.param_groups]:
        # load_state_dict accepts another optimizer's settings and step() then fails with a KeyError
        raise CnnlabError(f"{path}: the saved optimizer state is not for train.optimizer "
                          f"{optimizer.__class__.__name__.lower()} (was config.json edited?)")
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CnnlabError(f"{path}: the saved state does not fit this model ({str(exc).splitlines()[0][:160]})") from None
    if averaging is not None and ema_state:
        device = next(model.parameters()).device
        averaging.state = {k: v.to(device) for k, v in ema_state.items()}
    partial = info.get("partial")
    if partial:  # stopped by a signal inside epoch partial["epoch"]
        rng = info.get("rng", {})
        try:
            partial = {"epoch": int(partial["epoch"]), "batches": int(partial["batches"]), "of": int(partial["of"]),
                       "seen": int(partial["seen"]), "loss_sum": float(partial["loss_sum"]),
                       "correct": int(partial["correct"]), "generator": rng["generator"], "model_rng": rng["model_rng"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise CnnlabError(f"{path}: the mid-epoch state is malformed ({exc!r:.80})") from None
    return int(info["epoch"]) + 1, int(info["step"]), list(info.get("history", [])), partial


def _compile(model, train_data, mean_t, std_t, log):
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            sample = normalize(train_data.images[:2], mean_t, std_t)
            compiled(sample)
        return compiled
    except Exception as exc:  # compilers fail in many ways (no C compiler, unsupported op): eager still works
        log(f"warning: torch.compile failed ({str(exc).splitlines()[0][:120]}); training in eager mode")
        return model
