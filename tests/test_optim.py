"""optim.py: cnnlab's SGD against torch.optim.SGD, value for value; the schedule."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cnnlab.config import TrainConfig
from cnnlab.optim import SGD, lr_factor, make_optimizer


def two_models():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    twin = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))
    twin.load_state_dict(model.state_dict())
    return model, twin


def groups(model, decay=5e-4):
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": weights, "weight_decay": decay, "lr_scale": 1.0},
            {"params": others, "weight_decay": 0.0, "lr_scale": 2.0}]


def train_steps(model, optimizer, steps, first=0):
    generator = torch.Generator().manual_seed(first)
    for step in range(first, first + steps):
        x = torch.randn(8, 1, 8, 8, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        for group in optimizer.param_groups:  # as set_lr does: a new rate every step
            group["lr"] = 0.1 * (1 + step % 3) * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("momentum, nesterov", [(0.9, True), (0.9, False), (0.0, False)])
def test_sgd_computes_what_torch_sgd_computes(momentum, nesterov):
    ours, theirs = two_models()
    train_steps(ours, SGD(groups(ours), lr=0.1, momentum=momentum, nesterov=nesterov), 6)
    train_steps(theirs, torch.optim.SGD(groups(theirs), lr=0.1, momentum=momentum, nesterov=nesterov), 6)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)  # bit for bit, not approximately


def test_state_dicts_load_across_the_two_optimizers():
    """A resume file written with torch.optim.SGD continues under cnnlab's SGD, and back."""
    ours, theirs = two_models()
    torch_sgd = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9, nesterov=True)
    train_steps(theirs, torch_sgd, 3)
    ours.load_state_dict(theirs.state_dict())
    our_sgd = SGD(groups(ours), lr=0.1, momentum=0.9, nesterov=True)
    our_sgd.load_state_dict(torch_sgd.state_dict())
    saved = our_sgd.state_dict()
    assert [sorted(g) for g in saved["param_groups"]] == [sorted(g) for g in torch_sgd.state_dict()["param_groups"]]
    assert sorted(saved["state"]) == sorted(torch_sgd.state_dict()["state"])
    train_steps(theirs, torch_sgd, 3, first=3)
    train_steps(ours, our_sgd, 3, first=3)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    back = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9, nesterov=True)
    back.load_state_dict(our_sgd.state_dict())
    assert all(torch.equal(back.state[p]["momentum_buffer"], our_sgd.state[q]["momentum_buffer"])
               for p, q in zip(theirs.parameters(), ours.parameters()))


def test_a_state_dict_of_other_groups_is_refused():
    ours, _ = two_models()
    sgd = SGD(groups(ours), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="number of parameter groups"):
        sgd.load_state_dict({"state": {}, "param_groups": sgd.state_dict()["param_groups"][:1]})


def test_make_optimizer_gives_sgd_its_groups_and_adam_stays_torchs():
    model, _ = two_models()
    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-3, norm_lr_scale=4.0), model)
    assert isinstance(sgd, SGD) and all(g["nesterov"] and g["momentum"] == 0.9 for g in sgd.param_groups)
    assert sorted(g["lr_scale"] for g in sgd.param_groups) == [1.0, 1.0, 4.0]
    assert isinstance(make_optimizer(TrainConfig(optimizer="adam"), model), torch.optim.Adam)


def test_training_with_sgd_never_imports_torch_dynamo():
    """The point of cnnlab's SGD: torch.optim's first call imports torch._dynamo (1.6 s of a start-up)."""
    code = """
import sys, torch
from cnnlab.config import TrainConfig
from cnnlab.optim import make_optimizer
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9), model)
torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
sgd.step(); sgd.zero_grad()
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_schedule_warms_up_then_anneals():
    cfg = TrainConfig(schedule="onecycle", warmup=0.2, lr_start=0.0, lr_end=0.02)
    factors = [lr_factor(step, 100, cfg) for step in range(100)]
    assert factors[19] == pytest.approx(1.0) and factors[0] == pytest.approx(0.05)
    assert factors[-1] == pytest.approx(0.02 + 0.98 / 80) and all(a >= b for a, b in zip(factors[19:], factors[20:]))
    assert lr_factor(5, 100, TrainConfig(schedule="constant")) == 1.0
