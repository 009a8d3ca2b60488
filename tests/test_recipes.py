"""Recipes fitted to a folder (recipes.py) and the small-folder warnings; then tiny synthetic folders
trained end to end: 2 images of a class, a 20:1 imbalance (balance=sampler and =weights), a val/ folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cnnlab.config import resolve_config
from cnnlab.data import Dataset
from cnnlab.data.tensors import ImageTensors
from cnnlab.recipes import MIN_STEPS, class_weights, fit_recipe, majority_note, sample_weights, warnings_for
from cnnlab.training import fit

from .support.helpers import TINY_SPEC, write_image_folder


def colour_dataset(per_class: list[int], size: int = 8) -> Dataset:
    """Random colour images, per_class[i] training images of class i (test: 2 of each)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(per_class)])
    images = torch.randint(0, 256, (len(labels), 3, size, size), dtype=torch.uint8, generator=generator)
    test_labels = torch.arange(len(per_class)).repeat(2)
    test = torch.randint(0, 256, (len(test_labels), 3, size, size), dtype=torch.uint8, generator=generator)
    return Dataset("folder", ImageTensors(images, labels), ImageTensors(test, test_labels),
                   [f"class{i}" for i in range(len(per_class))], "resize")


def folder_config(**train):
    return resolve_config(None, None, {"data": {"dataset": "folder:/photos"}, "train": train})


def test_a_folder_without_a_preset_leaves_batch_length_and_rate_to_fit():
    assert folder_config().fitted == ["batch_size", "epochs", "lr"]
    assert folder_config(batch_size=64).fitted == ["epochs", "lr"]
    assert resolve_config("rgb32", None, {"data": {"dataset": "folder:/photos"}}).fitted == []
    assert resolve_config(None, None, {"data": {"dataset": "mnist"}}).fitted == []


def test_the_fitted_recipe_keeps_the_batch_small_and_the_steps_many_and_says_so_in_one_line():
    data = colour_dataset([90] * 5)  # 450 images, as 5 classes x 100 photos less the validation tenth
    config = folder_config()
    fitted, line = fit_recipe(config, data)
    train = fitted.train
    assert train.batch_size <= len(data.train) // 8 and train.batch_size & (train.batch_size - 1) == 0
    assert math.ceil(train.epochs) * (len(data.train) // train.batch_size) >= MIN_STEPS
    assert train.lr < config.train.lr  # a smaller batch, a smaller rate
    assert "\n" not in line and line.startswith("450 images in 5 classes, 8x8 colour: rgb32, batch ")
    assert f"{train.epochs:g} epochs = " in line and f"lr {train.lr:g}" in line
    assert fit_recipe(resolve_config("rgb32", None, {"data": {"dataset": "folder:/p"}}), data)[1] is None


def test_the_fitted_batch_never_exceeds_a_tiny_folder():
    data = colour_dataset([5, 5])
    fitted, _ = fit_recipe(folder_config(), data)
    assert fitted.train.batch_size == 8
    assert not any("larger than" in line for line in warnings_for(fitted, data))


def test_a_chosen_setting_is_kept():
    data = colour_dataset([90] * 5)
    fitted, line = fit_recipe(folder_config(batch_size=128, lr=0.3), data)
    assert (fitted.train.batch_size, fitted.train.lr) == (128, 0.3) and "fitted to the data: epochs" in line


def test_a_preset_that_fits_badly_is_told_but_runs():
    data = colour_dataset([90] * 5)
    lines = warnings_for(resolve_config("rgb32", None, {"data": {"dataset": "folder:/p"}}), data)
    assert any("only 10 optimizer steps" in line and "the preset's recipe" in line for line in lines), lines
    huge = resolve_config("rgb32", None, {"data": {"dataset": "folder:/p"}, "train": {"batch_size": 1024}})
    assert any("larger than the 450 training images" in line for line in warnings_for(huge, data))


def test_a_tiny_class_and_an_imbalance_each_get_one_line():
    config = folder_config()
    lines = warnings_for(fit_recipe(config, colour_dataset([2, 30, 30]))[0], colour_dataset([2, 30, 30]))
    assert any(line.startswith("class 'class0' has 2 training image(s)") for line in lines), lines
    data = colour_dataset([100, 5])
    lines = warnings_for(fit_recipe(config, data)[0], data)
    assert any("out of balance 20:1" in line and "data.balance=sampler" in line for line in lines), lines
    balanced = resolve_config(None, None, {"data": {"dataset": "folder:/p", "balance": "sampler"}})
    assert not any("out of balance" in line for line in warnings_for(fit_recipe(balanced, data)[0], data))


def with_test(data: Dataset, per_class: list[int]) -> Dataset:
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(per_class)])
    data.test = ImageTensors(torch.zeros((len(labels), 3, 8, 8), dtype=torch.uint8), labels)
    return data


def test_a_test_split_with_a_clear_majority_says_what_always_answering_it_scores():
    note = majority_note(with_test(colour_dataset([10, 10]), [20, 1]))
    assert note.startswith("note: always answering 'class0' would score 95.24% on this test split (20 of 21 images)")
    assert "per-class recall" in note
    assert majority_note(with_test(colour_dataset([10, 10]), [10, 10])) is None      # 2 balanced classes
    assert majority_note(with_test(colour_dataset([10, 10]), [14, 6])) is None       # 70%: under 1.5x chance
    assert majority_note(with_test(colour_dataset([5] * 10), [12] + [9] * 9)) is None  # 10 classes, 12%
    assert majority_note(with_test(colour_dataset([5] * 10), [40] + [6] * 9)) is not None


def test_balance_weights_draw_and_weigh_each_class_equally():
    labels = torch.tensor([0] * 20 + [1])
    weights = sample_weights(labels)
    assert torch.isclose(weights[labels == 0].sum(), weights[labels == 1].sum())
    per_class = class_weights(labels, 2)
    assert torch.isclose(per_class[1] / per_class[0], torch.tensor(20.0))


def quiet_fit(config, run_dir):
    lines: list[str] = []
    result = fit(config, run_dir, progress=False, log=lines.append)
    return result, lines


def tiny(folder, **settings):
    data = {"dataset": f"folder:{folder}", "image_size": 12, **settings.pop("data", {})}
    config = resolve_config(None, {"model": TINY_SPEC}, {"data": data,
                                                         "train": {"device": "cpu", "threads": 1, **settings}})
    return config


@pytest.mark.slow
def test_a_class_of_two_images_warns_and_trains(tmp_path):
    root = write_image_folder(tmp_path / "photos", n_per_class=12)
    for extra in sorted((root / "square").iterdir())[2:]:
        extra.unlink()
    result, lines = quiet_fit(tiny(root, epochs=2, batch_size=8), tmp_path / "run")
    assert any(line.startswith("warning: class 'square' has") for line in lines), lines
    assert "test_accuracy" in result["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["sampler", "weights"])
def test_a_20_to_1_imbalance_warns_and_balance_trains(tmp_path, balance):
    root = write_image_folder(tmp_path / "photos", n_per_class=60)
    for name in ("vertical", "square"):
        for extra in sorted((root / name).iterdir())[3:]:
            extra.unlink()
    _, lines = quiet_fit(tiny(root, epochs=1, batch_size=16), tmp_path / "plain")
    assert any("out of balance" in line and "data.balance=sampler" in line for line in lines), lines
    result, lines = quiet_fit(tiny(root, epochs=2, batch_size=16, data={"balance": balance}), tmp_path / balance)
    assert not any("out of balance" in line for line in lines) and "test_accuracy" in result["metrics"]
    saved = json.loads((tmp_path / balance / "config.json").read_text())
    assert saved["data"]["balance"] == balance


@pytest.mark.slow
def test_a_val_folder_is_used_for_validation_and_the_best_epoch_is_kept(tmp_path):
    root = tmp_path / "photos"
    write_image_folder(root / "train", n_per_class=20)
    write_image_folder(root / "val", n_per_class=4)
    write_image_folder(root / "test", n_per_class=4)
    result, lines = quiet_fit(tiny(root, epochs=3, batch_size=16), tmp_path / "run")
    assert any(" 60 train / 12 val / 12 test images" in line for line in lines), lines
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_accuracy" in m for m in history) and "test_accuracy" not in history[0]
    best = history[-1]["best_epoch"]
    assert best == max(history, key=lambda m: (m["val_accuracy"], -m["val_loss"]))["epoch"]
    assert any(line.startswith(f"best epoch {best} by validation") for line in lines)
    from cnnlab.checkpoint import read_metadata

    assert read_metadata(tmp_path / "run" / "model.safetensors")["epoch"] == best  # the kept model is that epoch's


@pytest.mark.slow
def test_a_folder_trained_with_the_defaults_says_what_it_chose(tmp_path):
    root = write_image_folder(tmp_path / "photos", n_per_class=20, rgb=True)
    config = resolve_config(None, None, {"data": {"dataset": f"folder:{root}", "image_size": 12},
                                         "train": {"epochs": 1, "device": "cpu", "threads": 1}})
    _, lines = quiet_fit(config, tmp_path / "run")
    line = next(line for line in lines if "fitted to the data" in line)
    assert line.startswith("48 images in 3 classes, 12x12 colour: rgb32, batch 16, 1 epoch = 3 steps, lr ")
    assert "fitted to the data: batch_size, lr" in line
    assert any("only 3 optimizer steps" in other for other in lines)  # epochs was chosen: told, not changed


@pytest.mark.parametrize("sizes, expected", [
    ([30000, 1, 30000, 1], None),                # one shape only: not "1x1 to 30000x30000"
    ([60, 6, 6, 60], None),                      # as many pixels, turned: no size warning
    ([8, 8, 400, 300], "(8x8 to 400x300 pixels)"),
])
def test_the_size_warning_names_real_images(sizes, expected):
    from tests.support.helpers import pattern_dataset

    data = pattern_dataset()
    data.stats = {"sizes": sizes, "modes": {"L": 1}}
    lines = [line for line in warnings_for(resolve_config("tutorial"), data) if "differ widely in size" in line]
    assert (lines == []) if expected is None else (len(lines) == 1 and expected in lines[0])
