"""Training on tiny synthetic data: learning, determinism, exact resume, schedules, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.config import Config, DataConfig, TrainConfig
from cnnlab.errors import CnnlabError
from cnnlab.optim import lr_factor
from cnnlab.training import fit

from tests.support.helpers import TINY_SPEC, pattern_dataset


def tiny_config(**train) -> Config:
    settings = {"epochs": 3, "batch_size": 16, "lr": 0.05, "optimizer": "sgd", "device": "cpu", "threads": 1}
    settings.update(train)
    return Config(preset=None, model=list(TINY_SPEC), data=DataConfig(), train=TrainConfig(**settings))


def test_fit_learns_and_writes_the_run_folder(tmp_path):
    result = fit(tiny_config(), tmp_path / "run", data=pattern_dataset(), progress=False, log=lambda *_: None)
    assert result["metrics"]["test_accuracy"] >= 0.9
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"model.safetensors", "model.json", "resume.safetensors", "config.json", "metrics.jsonl"} <= names
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_same_seed_same_weights(tmp_path):
    data = pattern_dataset()
    fit(tiny_config(shift=1, ema=0.9), tmp_path / "a", data=data, progress=False, log=lambda *_: None)
    fit(tiny_config(shift=1, ema=0.9), tmp_path / "b", data=data, progress=False, log=lambda *_: None)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly(tmp_path):
    """1 epoch, then --resume to 3, gives the very weights of 3 epochs straight (constant schedule: an annealing
    one would have planned the first run for 1 epoch)."""
    data = pattern_dataset()
    cfg = dict(shift=1, optimizer="adam", lr=0.01, ema=0.5, schedule="constant")
    fit(tiny_config(**cfg), tmp_path / "straight", data=data, progress=False, log=lambda *_: None)
    run = tmp_path / "partial"
    fit(tiny_config(**{**cfg, "epochs": 1}), run, data=data, progress=False, log=lambda *_: None)
    result = fit(tiny_config(**cfg), run, resume=True, data=data, progress=False, log=lambda *_: None)
    assert result["metrics"]["epoch"] == 3
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_resume_without_a_finished_epoch_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnnlabError, match="nothing to resume"):
        fit(tiny_config(), tmp_path / "empty", resume=True, data=pattern_dataset(), progress=False, log=lambda *_: None)


def test_lr_schedules():
    cfg = TrainConfig(schedule="onecycle", warmup=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(99, 100, cfg) < 0.05
    assert lr_factor(50, 100, TrainConfig(schedule="constant")) == 1.0
    assert lr_factor(50, 100, TrainConfig(schedule="cosine", warmup=0.0)) == pytest.approx(0.5)


def test_a_shift_too_large_to_reflect_fails_before_training(tmp_path):
    with pytest.raises(CnnlabError, match="train.shift: 12 pixels cannot be reflect-padded on 12x12 images"):
        fit(tiny_config(shift=12, shift_padding="reflect"), tmp_path / "bad", data=pattern_dataset(), progress=False,
            log=lambda *_: None)
    assert not (tmp_path / "bad").exists()  # no empty run folder left behind
    (tmp_path / "mine").mkdir()
    with pytest.raises(CnnlabError, match="reflect-padded"):
        fit(tiny_config(shift=12, shift_padding="reflect"), tmp_path / "mine", data=pattern_dataset(), progress=False,
            log=lambda *_: None)
    assert (tmp_path / "mine").is_dir()  # a folder the user made stays


def test_divergence_is_reported_with_epoch_and_step(tmp_path):
    with pytest.raises(CnnlabError) as err:
        fit(tiny_config(lr=900, optimizer="sgd", epochs=1), tmp_path / "nan", data=pattern_dataset(), progress=False,
            log=lambda *_: None)
    assert "epoch 1, step" in str(err.value) and err.value.exit_code == 3


def test_spec_that_cannot_fit_the_data_fails_before_training(tmp_path):
    config = tiny_config()
    config.model = [{"type": "conv", "out_channels": 4, "kernel_size": 20}, "flatten", {"type": "linear"}]
    with pytest.raises(CnnlabError, match="layer 1"):
        fit(config, tmp_path / "bad", data=pattern_dataset(), progress=False, log=lambda *_: None)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_bf16_training_with_a_whitening_layer_learns_and_keeps_the_filters_fixed(tmp_path, monkeypatch):
    from cnnlab import runtime

    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: True)  # emulated where the CPU lacks it: slow, still right
    config = tiny_config(precision="bf16")
    config.model = [{"type": "conv", "out_channels": 8, "kernel_size": 2, "whiten": True}, "relu", *TINY_SPEC]
    lines = []
    result = fit(config, tmp_path / "run", data=pattern_dataset(), progress=False, log=lines.append)
    assert result["metrics"]["test_accuracy"] >= 0.9
    assert ", bf16" in lines[0]
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    filters = weights["features.0.weight"]  # the whitening ones, not the random init: ± pairs
    assert torch.equal(filters[4:], -filters[:4])
    config.train.epochs = 1
    fit(config, tmp_path / "again", data=pattern_dataset(), progress=False, log=lambda *_: None)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert torch.equal(weights["features.0.weight"], again["features.0.weight"])  # fixed while training
    assert not torch.equal(weights["features.0.bias"], again["features.0.bias"])  # its bias still learns


def test_onecycle_start_and_end_fractions():
    """airbench's triangle: from 0.2 of the peak, up to it at 23%, down to 0.07 at the end."""
    cfg = TrainConfig(schedule="onecycle", warmup=0.23, lr_start=0.2, lr_end=0.07)
    assert lr_factor(0, 1000, cfg) == pytest.approx(0.2 + 0.8 / 230)
    assert lr_factor(229, 1000, cfg) == pytest.approx(1.0)
    assert lr_factor(615, 1000, cfg) == pytest.approx(0.07 + 0.93 * 0.5, abs=2e-3)
    assert lr_factor(1000, 1000, cfg) == pytest.approx(0.07)


def test_parameter_groups_scale_norm_lr_keep_decay_and_freeze_the_whitening_bias():
    from cnnlab.layers import build_model, parse_layers
    from cnnlab.optim import group_lr, make_optimizer

    model = build_model(parse_layers([{"type": "conv", "out_channels": 8, "kernel_size": 2, "whiten": True},
                                      {"type": "conv", "out_channels": 4, "kernel_size": 3, "bias": False},
                                      {"type": "batchnorm", "scale": False}, "relu", "flatten", {"type": "linear"}]),
                        (1, 6, 6), 3)
    cfg = TrainConfig(optimizer="sgd", lr=0.5, weight_decay=0.01, weight_decay_all=True, norm_lr_scale=64, schedule="constant",
                      whiten_bias_epochs=2)
    optimizer = make_optimizer(cfg, model, steps_per_epoch=10)
    bn, whiten = model.features[2], model.features[0]
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert not any(p is bn.weight or p is whiten.weight for p in in_groups)  # frozen: not trained at all
    norm_group = next(g for g in optimizer.param_groups if any(p is bn.bias for p in g["params"]))
    bias_group = next(g for g in optimizer.param_groups if any(p is whiten.bias for p in g["params"]))
    assert group_lr(norm_group, 0, 100, cfg) == pytest.approx(32.0)
    # PyTorch decays by lr × weight_decay: the same per step as for the other weights
    assert group_lr(norm_group, 0, 100, cfg) * norm_group["weight_decay"] == pytest.approx(group_lr(norm_group, 0, 100, cfg) / 64 * 0.01)
    assert group_lr(bias_group, 19, 100, cfg) == 0.5 and group_lr(bias_group, 20, 100, cfg) == 0.0


def test_lookahead_pulls_the_weights_to_its_average_and_ends_the_epochs_on_it(tmp_path):
    from cnnlab.optim import Lookahead

    layer = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    lookahead = Lookahead(total_steps=100)
    layer.weight.data.fill_(1.0)
    lookahead.update(layer, 29)  # before 30% of training: nothing
    assert lookahead.state is None
    lookahead.update(layer, 30)  # starts from the weights as they are
    layer.weight.data.fill_(2.0)
    lookahead.update(layer, 35)  # every 5 steps: slow = lerp(slow, fast, 1 - decay); fast = slow
    decay = 0.95 ** 5 * 0.35 ** 3
    assert layer.weight[0, 0].item() == pytest.approx(1.0 + (1 - decay))
    assert torch.equal(lookahead.state["weight"], layer.weight.data)

    data = pattern_dataset()
    cfg = dict(lookahead=True, epochs=3)
    fit(tiny_config(**cfg), tmp_path / "straight", data=data, progress=False, log=lambda *_: None)

    def stop_after_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise KeyboardInterrupt  # epoch 2 is saved by then

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(**cfg), tmp_path / "part", data=data, progress=False, log=stop_after_epoch_2)
    result = fit(tiny_config(**cfg), tmp_path / "part", resume=True, data=data, progress=False, log=lambda *_: None)
    assert result["metrics"]["test_accuracy"] >= 0.9
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the slow weights travel in the resume file
    with pytest.raises(CnnlabError, match="choose one"):
        TrainConfig(lookahead=True, ema=0.9)


def test_weight_averaging_gives_the_model_to_evaluate_and_save():
    from cnnlab.optim import EMA, Lookahead, weight_averaging

    assert weight_averaging(TrainConfig(), torch.nn.Linear(2, 1), 100) is None
    layer = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(layer.weight)
    ema = weight_averaging(TrainConfig(ema=0.5), layer, 100)
    assert isinstance(ema, EMA)
    layer.weight.data.fill_(2.0)
    ema.update(layer, 100)  # past the warm-up: the configured decay 0.5
    ema.end_epoch(layer)  # an EMA leaves the trained weights alone ...
    assert torch.equal(layer.weight.data, torch.full((1, 2), 2.0))
    averaged = ema.averaged(layer)  # ... and evaluates a copy holding the average
    assert averaged is not layer and torch.equal(averaged.weight.data, torch.full((1, 2), 1.0))
    early = weight_averaging(TrainConfig(ema=0.999), torch.nn.Linear(2, 1, bias=False), 100)
    early.state["weight"].zero_()
    early.update(layer, 1)  # the decay warms up: (1 + 1)/(10 + 1) at step 1, not 0.999
    assert torch.allclose(early.state["weight"], torch.full((1, 2), 2.0 * (1 - 2 / 11)))
    lookahead = weight_averaging(TrainConfig(lookahead=True), layer, 100)
    assert isinstance(lookahead, Lookahead) and lookahead.averaged(layer) is layer  # it trains on its average
    lookahead.update(layer, 30)
    layer.weight.data.fill_(5.0)
    lookahead.end_epoch(layer)  # the epoch ends on the slow weights
    assert torch.equal(layer.weight.data, torch.full((1, 2), 2.0))


def test_alternating_flips_mirror_every_training_image_on_the_next_epoch():
    from cnnlab.data.tensors import EpochBatches, ImageTensors
    from cnnlab.training import TrainState, train_one_epoch

    n = 16
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(1, n + 1, dtype=torch.uint8)  # image i marks its left edge with i + 1
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 2)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    model = Recorder()
    cfg = TrainConfig(batch_size=8, flip=True, flip_alternate=True, lr=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = ImageTensors(images, torch.zeros(n, dtype=torch.int64))
    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    mirrored = []
    for epoch in (1, 2):
        seen.clear()
        batches = EpochBatches(data, cfg.batch_size, zero, one, seed=cfg.seed, epoch=epoch, flip=True, flip_alternate=True)
        train_one_epoch(TrainState(model, optimizer, None, steps_per_epoch=2, total_steps=100), batches, cfg)
        x = torch.cat(seen) * 255
        marks = x[:, 0, 0].amax(1)  # row 0 holds the mark at column 0 or, mirrored, column 3
        order = marks.round().long() - 1
        assert sorted(order.tolist()) == list(range(n))
        flipped = torch.zeros(n, dtype=torch.bool)
        flipped[order] = x[:, 0, 0, 3] > 0
        mirrored.append(flipped)
    assert 0 < int(mirrored[0].sum()) < n
    assert torch.equal(mirrored[1], ~mirrored[0])
