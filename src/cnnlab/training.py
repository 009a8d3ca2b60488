"""Training: `fit()` reads top to bottom; `train_one_epoch()` is the whole inner loop.

The data sits in memory as uint8 tensors (on the GPU when training there); a batch is an index
slice, augmented as a whole batch. All randomness of epoch e comes from (seed, e), so a run
resumed after epoch e continues exactly as if it had never stopped, and the same seed on the
same CPU gives the same final weights.

What changes as training goes is one `TrainState` (model, optimiser, weight average, step, epoch,
history); `start_state` builds it (lr-find starts there too), `save_epoch` and `restore` write and
read it, and the schedule, optimiser and averaging come from `optim.py`.

With `torchrun` (WORLD_SIZE > 1) every rank trains on its own shard of each epoch through
DistributedDataParallel (gloo on CPU, NCCL on GPU); metrics are all-reduced and only rank 0
writes files or prints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .checkpoint import plain_state
from .config import Config, TrainConfig
from .data import Dataset, load_dataset
from .data.named import found_root
from .data.preprocess import Preprocessing
from .data.tensors import EpochBatches, channel_stats, normalize, rank_share, shuffled_batches
from .formatting import progress_bar
from .errors import CnnlabError
from .evaluate import EvalSettings, compute_metrics, infer
from .feature_cache import FeatureCache, build_cache, fit_probe, frozen_features, why_not
from .finetune import Start, apply_init, scale_loaded_lr
from .guard import EpochTotals, StepGuard, any_rank, stop_position
from .layers import build_model, init_whitening, parse_layers, spec_to_list
from .optim import WeightAveraging, make_optimizer, set_lr, weight_averaging
from .recipes import class_weights, fit_recipe, majority_note, sample_weights, warnings_for
from .runs import RunWriter, check_free_space, new_run_dir, read_resume, remove_if_unused
from .runtime import (Distributed, StopRequest, autocast_dtype, init_distributed, keep_freed_memory, resolve_device,
                      set_model_rng, set_threads)
from .tensorboard_log import start_import as start_tensorboard_import, tensorboard_log


@dataclass
class TrainState:
    """Everything that changes while a run trains, and what a resume file restores."""

    model: torch.nn.Module                  # the network (a `CNN`): evaluated and saved
    optimizer: torch.optim.Optimizer
    averaging: WeightAveraging | None       # EMA or Lookahead (train.ema, train.lookahead), or None
    steps_per_epoch: int
    total_steps: int                        # ceil(epochs x steps_per_epoch): fractional epochs stop mid-way
    step: int = 0                           # optimizer steps done
    epoch: int = 0                          # epochs done and saved
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch
    partial: dict[str, Any] | None = None   # where a stopped epoch stopped (resumed mid-epoch)
    best: dict[str, Any] | None = None      # with a validation split: the best epoch so far and its scores
    trained: torch.nn.Module | None = None  # what runs the steps: the model, compiled or wrapped in DDP
    class_weights: torch.Tensor | None = None  # data.balance=weights: the loss weight of each class
    features: FeatureCache | None = None    # the frozen layers' outputs, while the epochs train on them

    def evaluated_model(self) -> torch.nn.Module:
        """The weights to evaluate and deliver: the average when one is kept."""
        return self.averaging.averaged(self.model) if self.averaging else self.model


def fit(config: Config, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
        data: Dataset | None = None, log: Callable[[str], None] = print,
        on_epoch: Callable[[dict[str, Any]], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train `config`, writing the run folder; returns the final metrics and the run path.

    `on_epoch(metrics)`, if given, is called after each epoch is saved (every rank, the same metrics);
    an exception it raises (a tuner pruning the run) ends training there, the saved epochs kept.
    An `out_dir` that already holds a run is refused unless `overwrite` (its files are then removed
    first); one that another process is training is refused always (`runs.RunWriter`).
    """
    dist, created = init_distributed()
    run_dir = Path(out_dir) if out_dir else new_run_dir(config.preset)
    new_folder = not run_dir.exists()
    try:
        # Only rank 0 writes the run folder, so only it holds the folder's lock.
        with RunWriter(run_dir, resume, overwrite) if dist.is_main else contextlib.nullcontext() as writer:
            return _fit(config, run_dir, writer, dist, resume, progress, data, log if dist.is_main else _quiet, on_epoch)
    except BaseException:
        # A mistake caught before training (missing data, a setting that does not fit the images)
        # leaves no empty run folder behind.
        if new_folder and dist.is_main:
            remove_if_unused(run_dir)
        raise
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _fit(config: Config, run_dir: Path, writer: RunWriter | None, dist: Distributed, resume: bool, progress: bool,
         data: Dataset | None, log: Callable[[str], None], on_epoch) -> dict[str, Any]:
    cfg = config.train
    if cfg.tensorboard and dist.is_main:
        start_tensorboard_import()  # while the data loads
    device = training_device(cfg, dist)
    t0 = time.perf_counter()

    data = data or load_dataset(config.data, seed=cfg.seed, progress=progress and dist.is_main)
    config, recipe = fit_recipe(config, data, dist.world_size)
    cfg = config.train
    state, prep, start = start_state(config, data, device, dist, run_dir, resume, log)
    amp_dtype = autocast_dtype(cfg.precision, device, log)
    if dist.is_main:
        check_free_space(run_dir, state.model)
        try:
            writer.write_config(config.to_dict())
            if data.split:
                writer.write_split(data.split)
        except OSError as exc:
            raise _cannot_write(writer, "the run's config", exc) from None
        if start is not None and not resume:
            try:
                writer.write_init(start.to_dict())
            except OSError as exc:
                raise _cannot_write(writer, "how the run started", exc) from None
    state.trained = _wrapped(state.model, cfg, data, prep, device, dist, log)
    log(_start_line(config, data, state, device, amp_dtype, dist))
    if recipe:
        log(recipe)
    for line in warnings_for(config, data):
        log(f"warning: {line}")

    cache = start_cache(state, config, data, prep, device, dist, amp_dtype, log)
    if cache is not None and cfg.probe_epochs and not state.history:
        probe_epoch(writer, state, cache, config, data, prep, dist, t0, log)
    state.features = cache if cache is not None and frozen_features(state.model, cfg) else None
    if state.features is not None:  # only the head trains: on the cached features
        state.trained = _wrapped(state.features.rest(state.model), dataclasses.replace(cfg, compile=False), data, prep,
                                 device, dist, log)
    epochs = math.ceil(cfg.epochs)
    train_images, (mean, std) = data.train.to(device), prep.stats(device)
    sampling = sample_weights(data.train.labels) if config.data.balance == "sampler" else None
    if config.data.balance == "weights":
        state.class_weights = class_weights(data.train.labels, len(data.classes)).to(device)
    with StopRequest() as stop, tensorboard_log(run_dir, config, state.step, cfg.tensorboard and dist.is_main, log) as tb:
        guard = StepGuard(stop, dist)
        for epoch in range(state.epoch + 1, epochs + 1):
            bar = None
            if progress and dist.is_main:  # a bar in a terminal or a notebook, else only the epoch lines
                bar = progress_bar(min(state.steps_per_epoch, state.total_steps - state.step), f"epoch {epoch}/{epochs}", "step")
            batches = (state.features.batches(cfg, epoch, dist.rank, dist.world_size, sampling) if state.features
                       else EpochBatches.for_training(train_images, cfg, mean, std, epoch, dist.rank, dist.world_size, sampling))
            train_metrics = train_one_epoch(state, batches, cfg, guard, bar, tb.step if tb else None)
            if bar is not None:
                bar.close()
            if stop.position is not None:
                break  # stopped inside the epoch: that step is saved below
            test, test_logits = end_epoch(state, epoch, train_metrics, data, prep, cfg, t0)
            patience_out = _out_of_patience(state, cfg, epochs)
            if dist.is_main:
                save_epoch(writer, state, config, data, prep)
                log(_epoch_line(state.history[-1], cfg.epochs))
                if tb is not None:
                    tb.epoch(state.history[-1])
                    if test is not None and epoch == epochs:  # always evaluated
                        tb.finish(state.history[-1], test, data.test.images, data.test.labels, test_logits, data.classes)
            if on_epoch is not None:
                on_epoch(dict(state.history[-1]))
            if patience_out:
                log(patience_out)
                break
            if any_rank(stop.requested, dist, device):
                stop.requested = True
                break  # the signal came after the epoch's last step, or while it was evaluated and saved
        if state.best is not None and dist.is_main and not (stop.requested and stop.position is not None):
            final_test(writer, state, config, data, prep, tb, log)
        note = majority_note(data) if dist.is_main and not stop.requested else None
        if note:
            log(note)
    if stop.requested and not (state.history and state.history[-1]["epoch"] >= epochs):
        raise _interrupted(stop, state, writer, run_dir, dist)  # (a signal while the last epoch was saved ends normally)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return {"run_dir": str(run_dir), "metrics": state.history[-1] if state.history else {},
            "epochs": epochs_done(state.epoch, cfg.epochs), "seconds": time.perf_counter() - t0}


def epochs_done(epoch: int, epochs: float) -> float:
    """Epochs trained when `epoch` (a count of epochs run, the last one maybe partial) of `epochs` are done:
    0.5 when a run of 0.5 epochs ends, not 1."""
    return epochs if epoch >= math.ceil(epochs) else epoch


def training_device(cfg: TrainConfig, dist: Distributed) -> torch.device:
    """The device this process trains on (its own GPU under torchrun), with threads and memory set up."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    set_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()
    return device


def start_state(config: Config, data: Dataset, device: torch.device, dist: Distributed | None = None,
                run_dir: Path | None = None, resume: bool = False,
                log: Callable[[str], None] = print) -> tuple[TrainState, Preprocessing, Start | None]:
    """(state, preprocessing, start) as a run begins, or resumes from `run_dir`: the model as
    `initial_model` makes it, on `device`, with its optimiser, schedule length and weight average.
    `fit` and `lr-find` both start here, so they train the same thing."""
    cfg, dist = config.train, dist or Distributed()
    model, prep, start = initial_model(config, data, run_dir, resume, log)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rank_share(cfg.batch_size, dist.world_size)  # the global batch must split evenly among the processes
    steps_per_epoch = len(shuffled_batches(len(data.train), cfg.batch_size, torch.Generator().manual_seed(0)))
    if steps_per_epoch == 0:
        raise CnnlabError(f"the training set has {len(data.train)} images, fewer than one batch of {cfg.batch_size}")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    optimizer = scale_loaded_lr(make_optimizer(cfg, model, steps_per_epoch), model, start, cfg.init_lr_scale)
    state = TrainState(model, optimizer, weight_averaging(cfg, model, total_steps), steps_per_epoch, total_steps)
    if resume:
        restore(run_dir, state)
        where = (f"in epoch {state.partial['epoch']}/{math.ceil(cfg.epochs)}, after its step {state.partial['batches']}"
                 if state.partial else f"after epoch {state.epoch} of {math.ceil(cfg.epochs)}")
        log(f"resuming {run_dir} {where}")
    return state, prep, start


def initial_model(config: Config, data: Dataset, run_dir: Path | None = None, resume: bool = False,
                  log=print) -> tuple[torch.nn.Module, Preprocessing, Any]:
    """(model, preprocessing, start) as a run begins: the spec built with the run's seed (validated on the
    data's shape), `train.init`'s or a backbone's weights loaded and `train.freeze` applied (`start`:
    what was loaded, or None), inputs normalised with the data's statistics (or the loaded model's), and
    a whitening first layer computed from a seeded sample. `fit` and `lr-find` both start here."""
    cfg = config.train
    layers = parse_layers(config.model)
    torch.manual_seed(cfg.seed)
    model = build_model(layers, data.input_shape, len(data.classes), cfg.batch_size)  # validates (shapes, memory) first
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


def train_one_epoch(state: TrainState, batches: EpochBatches, cfg: TrainConfig, guard: StepGuard | None = None,
                    progress=None, on_step: Callable[[int, torch.Tensor, float], None] | None = None) -> dict[str, float]:
    """One pass over `batches` (this rank's shard of one epoch), advancing `state`; returns its metrics.

    `on_step(step, loss, lr)`, if given, gets each step's detached loss tensor and learning rate (TensorBoard).
    A stopped epoch (`state.partial`, from `restore`) continues after the batches already done, with the
    random state and running totals they left, so it ends exactly as if never stopped.
    """
    guard = guard or StepGuard()
    device = batches.device
    amp_dtype = autocast_dtype(cfg.precision, device, log=_quiet)  # fit() has said why, if it matters
    model = state.trained or state.model
    model.train()
    torch.manual_seed(cfg.seed * 100_003 + batches.epoch + 1)  # dropout and other in-model randomness
    resume_from = state.partial if state.partial and state.partial["epoch"] == batches.epoch else None
    totals = EpochTotals.start(device, resume_from)
    if resume_from:
        batches.resume(resume_from["batches"], resume_from["generator"])
        set_model_rng(resume_from["model_rng"], device)
    batches.limit(state.total_steps - state.step)
    start = time.perf_counter()
    for x, y in batches:  # x: (B, C, H, W) float, augmented and normalised
        set_lr(state.optimizer, state.step, state.total_steps, cfg)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=state.class_weights, label_smoothing=cfg.label_smoothing)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        if on_step is not None:
            on_step(state.step, loss.detach(), state.optimizer.param_groups[0]["lr"])
        if state.averaging is not None:
            state.averaging.update(state.model, state.step)
        totals.add(loss, logits, y)
        if guard.should_stop(loss, batches, state.optimizer.param_groups[-1]["lr"]):
            guard.stop.position = stop_position(batches, totals)
            break
        if progress is not None:
            _show_progress(progress, batches.done, totals, time.perf_counter() - start, guard.dist.world_size)
    loss_sum, correct, count = guard.epoch_totals(totals, batches.epoch)
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
            "images_per_second": count / max(elapsed, 1e-9), "epoch_seconds": elapsed}


def end_epoch(state: TrainState, epoch: int, train_metrics: dict[str, float], data: Dataset, prep: Preprocessing,
              cfg: TrainConfig, t0: float) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
    """Close epoch `epoch`: the weight average's end-of-epoch step, the test evaluation when due, its
    metrics appended to the history. Returns the test metrics and logits (None when not evaluated)."""
    if state.averaging is not None:
        state.averaging.end_epoch(state.model)
    state.epoch = epoch
    metrics = {"epoch": epoch, "step": state.step, **{k: round(v, 6) for k, v in train_metrics.items()}}
    test = logits = None
    if epoch % cfg.eval_every == 0 or epoch == math.ceil(cfg.epochs):
        device = next(state.model.parameters()).device
        # With a validation split it picks the best epoch and the test split waits for the end (final_test).
        split, name = (data.val, "val") if data.val is not None else (data.test, "test")
        if data.val is not None and state.features is not None and state.features.val is not None:
            logits = state.features.val_logits(state.evaluated_model())
        else:
            logits = infer(state.evaluated_model(), split.images, prep, EvalSettings.from_train(cfg), device)
        scores = compute_metrics(logits, split.labels, data.classes)
        metrics.update({f"{name}_loss": scores["loss"], f"{name}_accuracy": scores["accuracy"]})
        if data.val is None:
            test = scores
        elif state.best is None or (scores["accuracy"], -scores["loss"]) > (state.best["val_accuracy"], -state.best["val_loss"]):
            state.best = {"epoch": epoch, "val_accuracy": scores["accuracy"], "val_loss": scores["loss"]}
    metrics["elapsed_seconds"] = round(time.perf_counter() - t0, 3)
    state.history.append(metrics)
    return test, logits


def start_cache(state: TrainState, config: Config, data: Dataset, prep: Preprocessing, device: torch.device,
                dist: Distributed, amp_dtype, log) -> FeatureCache | None:
    """The frozen layers' cached features where this run uses them (feature_cache.py): for the probe (epoch 0, not
    yet done), and for every epoch when train.freeze leaves only the head to train."""
    cfg = config.train
    probe = cfg.probe_epochs > 0 and not state.history
    if not (probe or frozen_features(state.model, cfg)):
        return None
    reason = why_not(config)
    if reason and probe:
        raise CnnlabError(f"train.probe_epochs: the head cannot train on cached features ({reason}); "
                          "set train.probe_epochs: 0 or leave that setting out")
    return None if reason else build_cache(state.model, config, data, prep, device, dist, amp_dtype, log)


def probe_epoch(writer: RunWriter | None, state: TrainState, cache: FeatureCache, config: Config, data: Dataset,
                prep: Preprocessing, dist: Distributed, t0: float, log) -> None:
    """Epoch 0: the head fitted alone on the cached features (train.probe_epochs passes), scored on the validation
    split and saved like any epoch, so the later epochs must beat it to replace it."""
    cfg = config.train
    metrics = fit_probe(state.model, cache, cfg, state.class_weights)
    state.features = cache  # epoch 0 is scored on the cached validation features
    end_epoch(state, 0, metrics, data, prep, cfg, t0)
    if state.averaging is not None:  # the average starts from the fitted head, not the random one
        state.averaging = weight_averaging(cfg, state.model, state.total_steps)
    if dist.is_main:
        save_epoch(writer, state, config, data, prep)
        log(f"epoch 0 (the head alone on the cached features, {cfg.probe_epochs} passes in "
            f"{metrics['epoch_seconds']:.1f} s): " + _epoch_line(state.history[-1], cfg.epochs).split("  ", 1)[1])


def final_test(writer: RunWriter, state: TrainState, config: Config, data: Dataset, prep: Preprocessing, tb,
               log: Callable[[str], None]) -> None:
    """With a validation split: the best epoch's model (the one saved) on the test split, once. Its scores
    go into the last line of metrics.jsonl and into the model file's metadata."""
    best = copy.deepcopy(state.model)
    best.load_state_dict(writer.read_model_weights(best))  # read back through the checks every model file gets
    device = next(state.model.parameters()).device
    logits = infer(best, data.test.images, prep, EvalSettings.from_train(config.train), device)
    test = compute_metrics(logits, data.test.labels, data.classes)
    final = {"best_epoch": state.best["epoch"], "test_loss": test["loss"], "test_accuracy": test["accuracy"]}
    state.history[-1].update(final)
    best_line = next(m for m in state.history if m["epoch"] == state.best["epoch"])
    try:
        _save_model_file(writer, best, config, data, prep, state.best["epoch"], {**best_line, **final})
        writer.write_history(state.history)
    except OSError as exc:
        raise _cannot_write(writer, "the final test's scores", exc) from None
    log(f"best epoch {state.best['epoch']} by validation ({100 * state.best['val_accuracy']:.2f}%): its model is the "
        f"one saved, and the only one tested (test accuracy {100 * test['accuracy']:.2f}%)")
    if tb is not None:
        tb.finish(state.history[-1], test, data.test.images, data.test.labels, logits, data.classes)


def _out_of_patience(state: TrainState, cfg: TrainConfig, epochs: int) -> str | None:
    """The line that ends a run early: validation accuracy not improved for train.patience epochs."""
    if not cfg.patience or state.best is None or state.epoch >= epochs:
        return None
    if state.epoch - state.best["epoch"] >= cfg.patience:
        return (f"stopping early: validation accuracy has not improved for {cfg.patience} epoch(s) "
                f"(best: epoch {state.best['epoch']}, {100 * state.best['val_accuracy']:.2f}%)")
    return None


# ---------------------------------------------------------------------------------------------
# The run folder: what an epoch leaves, and reading it back
# ---------------------------------------------------------------------------------------------

def save_epoch(writer: RunWriter, state: TrainState, config: Config, data: Dataset, prep: Preprocessing) -> None:
    """Write the deliverable model, metrics.jsonl and the resume file for the epoch just ended."""
    # The resume file is the source of truth (weights + optimizer of one epoch, one atomic file) and
    # is written last: if it says epoch e, every other file already holds epoch e; a kill before it
    # makes --resume redo epoch e, which gives the same result. model.safetensors is the deliverable;
    # the weights used for evaluation are the EMA ones when on.
    # With a validation split the model file holds the best epoch so far (by validation accuracy).
    try:
        if state.best is None or state.best["epoch"] == state.epoch:
            _save_model_file(writer, state.evaluated_model(), config, data, prep, state.epoch, state.history[-1])
        writer.write_history(state.history)
        _save_resume(writer, state, {"epoch": state.epoch, "step": state.step, "history": state.history,
                                     "best": state.best})
    except OSError as exc:  # disk full, quota, folder removed: every file there is still whole
        raise _cannot_write(writer, f"epoch {state.epoch}", exc) from None


def _cannot_write(writer: RunWriter, what: str, exc: OSError) -> CnnlabError:
    """The one line for a failed save (exit 4), with advice that is true: resume only when there is a
    resume file to continue from."""
    run_dir = writer.root
    if writer.has_resume():
        advice = f"nothing saved before is lost — free some space and continue with: cnnlab train --resume {run_dir}"
    else:
        advice = f"no epoch is saved yet — free some space and train again (--out {run_dir} --overwrite)"
    return CnnlabError(f"cannot save {what} to {run_dir} ({exc.strerror or exc}); {advice}", exit_code=4)


def _save_model_file(writer: RunWriter, model: torch.nn.Module, config: Config, data: Dataset, prep: Preprocessing,
                     epoch: int, metrics: dict[str, Any]) -> None:
    writer.write_model(model, {
        "layers": spec_to_list(parse_layers(config.model)),
        "input_shape": list(data.input_shape),
        "classes": data.classes,
        "preprocessing": prep.to_dict(),
        "dataset": data.name,
        "data_root": found_root(config.data.dataset, config.data.root),  # where evaluate finds it again
        "epoch": epoch,
        "metrics": metrics,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),  # processes that trained it (one global batch)
        "config": config.to_dict(),
    })


def _save_resume(writer: RunWriter, state: TrainState, info: dict[str, Any], rng: dict[str, torch.Tensor] | None = None) -> None:
    writer.write_resume(state.optimizer, state.averaging.state if state.averaging else None, info,
                        plain_state(state.model), rng)


def restore(run_dir: Path, state: TrainState) -> None:
    """Load the resume file into `state`: weights, optimiser, weight average, step, epoch, history and,
    after a stop inside an epoch, where it stopped."""
    path, (optimizer_state, ema_state, model_state, info) = read_resume(run_dir)  # checked (checksum)
    saved_keys = [sorted(group) for group in optimizer_state["param_groups"]]
    if saved_keys != [sorted(group) for group in state.optimizer.param_groups]:
        # load_state_dict accepts another optimizer's settings and step() then fails with a KeyError
        raise CnnlabError(f"{path}: the saved optimizer state is not for train.optimizer "
                          f"{state.optimizer.__class__.__name__.lower()} (was config.json edited?)")
    try:
        state.model.load_state_dict(model_state)
        state.optimizer.load_state_dict(optimizer_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        # load_state_dict puts the details on the lines after "Error(s) in loading state_dict for CNN:"
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise CnnlabError(f"{path}: the saved state does not fit this model ({detail[:200]})") from None
    if state.averaging is not None and ema_state:
        device = next(state.model.parameters()).device
        state.averaging.state = {k: v.to(device) for k, v in ema_state.items()}
    state.epoch, state.step, state.history = int(info["epoch"]), int(info["step"]), list(info.get("history", []))
    state.best = info.get("best") if isinstance(info.get("best"), dict) else None
    partial = info.get("partial")
    if partial:  # stopped by a signal inside epoch partial["epoch"]
        rng = info.get("rng", {})
        try:
            state.partial = {"epoch": int(partial["epoch"]), "batches": int(partial["batches"]), "of": int(partial["of"]),
                             "seen": int(partial["seen"]), "loss_sum": float(partial["loss_sum"]),
                             "correct": int(partial["correct"]), "generator": rng["generator"],
                             "model_rng": rng["model_rng"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise CnnlabError(f"{path}: the mid-epoch state is malformed ({exc!r:.80})") from None


def _interrupted(stop: StopRequest, state: TrainState, writer: RunWriter | None, run_dir: Path,
                 dist: Distributed) -> CnnlabError:
    """Save where a stopped run stopped (mid-epoch: this very step, so resuming is exact) and say how to go on."""
    code, done, position = stop.exit_code(), state.epoch, stop.position
    if position is not None:
        if dist.is_main:
            partial = {k: v for k, v in position.items() if not torch.is_tensor(v)}
            rng = {"generator": position["generator"], "model_rng": position["model_rng"].cpu()}
            try:
                _save_resume(writer, state, {"epoch": done, "step": state.step, "history": state.history,
                                              "best": state.best, "partial": partial}, rng)
            except OSError as exc:
                after = (f"--resume continues after epoch {done}" if writer.has_resume()
                         else "nothing is saved that --resume could continue")
                return CnnlabError(f"interrupted, and cannot save to {run_dir} ({exc.strerror or exc}); {after}",
                                   exit_code=4)
        return CnnlabError(f"interrupted at epoch {position['epoch']}, step {position['batches']} of "
                           f"{position['of']}; saved — continue with: cnnlab train --resume {run_dir}", exit_code=code)
    if not done and not (writer is not None and writer.has_resume()):  # (epoch 0, the probe, is resumable)
        return CnnlabError(f"interrupted during epoch 1, before any epoch was saved; nothing to resume in {run_dir}",
                           exit_code=code)
    return CnnlabError(f"interrupted during epoch {done + 1}; {run_dir} holds epoch {done}: "
                       f"continue with: cnnlab train --resume {run_dir}", exit_code=code)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _quiet(*_) -> None:
    pass


def _wrapped(model: torch.nn.Module, cfg: TrainConfig, data: Dataset, prep: Preprocessing, device: torch.device,
             dist: Distributed, log) -> torch.nn.Module:
    """What runs the training steps: the model, compiled (train.compile) and/or in DistributedDataParallel."""
    trained = model
    if dist.world_size > 1:  # BatchNorm over the global batch, as one process computes it (NOTES.md §20)
        from .sync_batchnorm import sync_batchnorm

        sync_batchnorm(model)
    if cfg.compile:
        mean, std = prep.stats(device)
        trained = _compile(model, normalize(data.train.images[:2].to(device), mean, std), log)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    return trained


def _compile(model: torch.nn.Module, sample: torch.Tensor, log) -> torch.nn.Module:
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(sample)
        return compiled
    except Exception as exc:  # compilers fail in many ways (no C compiler, unsupported op): eager still works
        log(f"warning: torch.compile failed ({str(exc).splitlines()[0][:120]}); training in eager mode")
        return model


def _start_line(config: Config, data: Dataset, state: TrainState, device: torch.device, amp_dtype, dist: Distributed) -> str:
    shape = "x".join(map(str, data.input_shape))
    val = f"{len(data.val):,} val / " if data.val is not None else ""
    return (f"training {config.preset or 'custom'} on {data.name}: {len(data.train):,} train / {val}{len(data.test):,} test "
            f"images, {shape}, {len(data.classes)} classes, {sum(p.numel() for p in state.model.parameters()):,} "
            f"parameters, {device}" + (", bf16" if amp_dtype is not None else "")
            + (f", {dist.world_size} processes sharing each batch of {config.train.batch_size}" if dist.world_size > 1 else ""))


def _epoch_line(m: dict[str, Any], epochs: float) -> str:
    # a fractional length shows as such: "epoch 0.5/0.5", "epoch 2.5/2.5" for the last, partial epoch
    text = (f"epoch {epochs_done(m['epoch'], epochs):g}/{epochs:g}  loss {m['train_loss']:.4f}  train acc {100 * m['train_accuracy']:.2f}%")
    if "val_accuracy" in m:
        text += f"  val acc {100 * m['val_accuracy']:.2f}%  val loss {m['val_loss']:.4f}"
    if "test_accuracy" in m:
        text += f"  test acc {100 * m['test_accuracy']:.2f}%"
    return text + f"  {m['images_per_second']:,.0f} img/s  {m['elapsed_seconds']:.1f}s"


def _show_progress(progress, batches_done: int, totals: EpochTotals, elapsed: float, world_size: int) -> None:
    progress.update(1)
    if (batches_done - 1) % 20 == 0:
        seen = max(totals.seen, 1)
        progress.set_postfix_str(f"loss {totals.loss_sum.item() / seen:.4f} acc {100 * totals.correct.item() / seen:.2f}% "
                                 f"{totals.seen * world_size / max(elapsed, 1e-9):,.0f} img/s")
