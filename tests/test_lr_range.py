"""`cnnlab lr-find` on a tiny synthetic folder dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cnnlab.cli import main
from cnnlab.config import DataConfig, TrainConfig, Config
from cnnlab.lr_range import RangeTest, plot, prepare, range_test, valley
from tests.support.helpers import TINY_SPEC, write_image_folder


@pytest.fixture(scope="module")
def folder_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr-find")
    data = write_image_folder(root / "patterns", n_per_class=20)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_SPEC, "data": {"dataset": f"folder:{data}", "image_size": 12},
                                      "train": {"batch_size": 8, "optimizer": "adam", "device": "cpu", "threads": 1}}))
    return root, config, data


def test_sweep_leaves_the_weights_untouched_and_suggests_a_rate_inside_it(folder_config):
    root, _, data = folder_config
    config = Config(model=list(TINY_SPEC), data=DataConfig(dataset=f"folder:{data}", image_size=12),
                    train=TrainConfig(batch_size=8, optimizer="adam", device="cpu", threads=1))
    model, make_optimizer, batches, amp, _ = prepare(config, log=lambda *_: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = range_test(model, make_optimizer, batches, start=1e-5, end=10.0, steps=120, amp_dtype=amp)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert 1e-5 <= result.suggestion <= 10.0 and result.suggestion in result.lrs
    assert result.lrs[0] == pytest.approx(1e-5)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # exponential
    assert len(result.smoothed) == len(result.losses) == 120 and result.stopped == "end"
    assert min(result.smoothed) < result.smoothed[0]  # the loss fell somewhere on the way


def test_sweep_stops_when_the_loss_diverges():
    # random labels: the loss cannot reach 0, so a large enough learning rate must blow it up
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    batches = ((x[i % 8 * 8:(i % 8 + 1) * 8], y[i % 8 * 8:(i % 8 + 1) * 8]) for i in range(10**6))
    result = range_test(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), batches, start=1e-4, end=1e6,
                        steps=150)
    assert result.stopped == "diverged" and len(result.lrs) < 150
    assert 1e-4 <= result.suggestion < result.lrs[-1]


def test_cli_json_and_plot(folder_config, tmp_path, capsys):
    root, config, _ = folder_config
    plot = tmp_path / "sweep.png"
    assert main(["lr-find", "--config", str(config), "--steps", "60", "--start", "1e-4", "--end", "1",
                 "--plot", str(plot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rule"] == "valley" and 1e-4 <= out["suggestion"] <= 1
    assert out["steps"] == len(out["lrs"]) == len(out["losses"]) <= 60
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_cli_text(folder_config, tmp_path, capsys):
    root, config, _ = folder_config
    assert main(["lr-find", "--config", str(config), "--steps", "30", "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "suggested learning rate: " in out and f"next: cnnlab train --config {config} --lr " in out


def test_the_printed_range_and_the_plot_title_agree_on_a_stopped_sweep(folder_config, tmp_path, capsys, monkeypatch):
    """A sweep that diverged before its end: the line and the title both give the last rate it ran."""
    import cnnlab.lr_range

    lrs = [10 ** (-7 + i * 0.2) for i in range(36)]  # 1e-07 .. 1e+00, where 10 was asked for
    losses = [2.3 - 0.02 * i for i in range(30)] + [2.0, 3.0, 5.0, 9.0, 20.0, 50.0]
    result = RangeTest(lrs=lrs, losses=losses, smoothed=losses, stopped="diverged", start=1e-7, end=10.0,
                       suggestion=1e-4)
    assert plot(result, "t").axes[0].get_title().splitlines()[1] == "36 steps from 1e-07 to 1 (the loss diverged)"
    root, config, _ = folder_config
    monkeypatch.setattr(cnnlab.lr_range, "range_test", lambda *args, **kwargs: result)
    assert main(["lr-find", "--config", str(config), "--plot", str(tmp_path / "p.png")]) == 0
    assert "36 steps from 1e-07 to 1 (the loss diverged), on cpu" in capsys.readouterr().out


def test_bad_sweep_settings_are_one_line_errors(folder_config, tmp_path, capsys):
    root, config, _ = folder_config
    assert main(["lr-find", "--config", str(config), "--start", "1", "--end", "0.1", "--plot", str(tmp_path / "p.png")]) == 2
    assert "expected 0 < start < end" in capsys.readouterr().err


def test_valley_picks_the_middle_of_the_longest_fall():
    lrs = [10 ** (-6 + i * 0.1) for i in range(60)]
    # flat, then falling steadily over steps 10..40, then rising
    losses = [2.3] * 10 + [2.3 - 0.05 * i for i in range(1, 31)] + [0.8 + 0.2 * i for i in range(20)]
    pick = lrs.index(valley(lrs, losses))
    assert 18 <= pick <= 30  # about half-way along the fall, well before its bottom (step 40)
    assert math.isfinite(valley(lrs[:3], [1.0, 0.9, 0.8]))


def test_valley_leaves_a_noisy_plateau_out():
    """A from-scratch network's sweep: a long flat start with tiny wobbles, then the fall. fastai's plain
    rule chains the wobbles into the valley and suggests a rate on the plateau; cnnlab's starts at the fall."""
    lrs = [10 ** (-7 + i * 0.05) for i in range(140)]                              # 1e-7 .. ~1e0
    plateau = [2.30 - 0.0001 * i + 0.0005 * ((i * 7) % 3) for i in range(80)]      # 1e-7 .. 1e-3: wobbling
    fall = [2.28 - 0.03 * i for i in range(1, 41)]                                 # 1e-3 .. 1e-1: the loss falls
    rise = [1.1 + 0.3 * i for i in range(20)]                                       # then diverges
    pick = lrs.index(valley(lrs, plateau + fall + rise))
    assert 90 <= pick <= 110, lrs[pick]  # in the fall, not on the plateau (steps < 80)
