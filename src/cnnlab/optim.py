"""The optimiser, the learning-rate schedule and weight averaging: built here once, used by
training and by the learning-rate range test alike.

The schedule is a pure function of the step (`lr_factor`), so resuming needs no scheduler state;
each parameter group's `lr_scale` multiplies it (batchnorm weights, loaded layers when fine-tuning).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from .config import TrainConfig
from .layers import whitening_conv


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int = 0) -> "torch.optim.Optimizer | SGD":
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
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


class SGD:
    """SGD with (Nesterov) momentum and per-group weight decay, computed exactly as torch.optim.SGD
    computes it on a CPU (its single-tensor path: the same operations in the same order), without
    torch.optim.

    Why: every torch.optim optimizer wraps its methods to keep torch.compile out, and the wrapper
    imports torch._dynamo on the first call: 1.6 s of the 7 s `fast` run (benchmarks/NOTES.md §17b).
    The state dict has torch's layout (parameter indices, `momentum_buffer`, the same group keys), so
    a resume file written with either optimizer loads into the other; tests/test_optim.py checks the
    values against torch.optim.SGD step by step.
    """

    DEFAULTS = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False,
                "foreach": None, "differentiable": False, "fused": None}

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        self.defaults = {**self.DEFAULTS, "lr": lr, "momentum": momentum, "nesterov": nesterov,
                         "weight_decay": weight_decay}
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        params = list(params)
        for group in params if params and isinstance(params[0], dict) else [{"params": params}]:
            self.add_param_group(group)

    def add_param_group(self, group: dict[str, Any]) -> None:
        self.param_groups.append({**self.defaults, **group, "params": list(group["params"])})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    def step(self) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                lr, decay, momentum, dampening = group["lr"], group["weight_decay"], group["momentum"], group["dampening"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                    if momentum != 0:
                        buffer = self.state.setdefault(p, {}).get("momentum_buffer")
                        if buffer is None:
                            buffer = self.state[p]["momentum_buffer"] = grad.detach().clone()
                        else:
                            buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
                        grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                    p.add_(grad, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: groups with parameter indices (numbered across the groups in order)."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [index[id(p)] for p in group["params"]]})
        return {"state": {index[id(p)]: dict(values) for p, values in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        by_index = {i: p for s, g in zip(saved, self.param_groups) for i, p in zip(s["params"], g["params"])}
        self.param_groups = [{**s, "params": g["params"]} for s, g in zip(saved, self.param_groups)]
        self.state = {}
        for i, values in state_dict["state"].items():
            p = by_index[int(i)]
            # copies: the buffers must not be shared with whatever the state dict came from
            self.state[p] = {name: value.to(device=p.device, dtype=p.dtype, copy=True) if torch.is_tensor(value)
                             else value for name, value in values.items()}


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
        shadow = copy.deepcopy(model)
        shadow.load_state_dict(self.state)
        return shadow


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: TrainConfig) -> None:
    """Give every parameter group its learning rate for optimizer step `step` (0-based)."""
    for group in optimizer.param_groups:
        group["lr"] = group_lr(group, step, total_steps, cfg)
