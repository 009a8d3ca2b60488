"""TensorBoard logs of a training run, read back with tensorboard's own event reader."""

from __future__ import annotations

import sys

import pytest
import torch

from cnnlab.tensorboard_log import confusion_picture, mistakes_picture
from cnnlab.training import fit
from tests.support.helpers import pattern_dataset
from tests.test_training import tiny_config

pytest.importorskip("tensorboard", reason="tensorboard is not installed (the experiments extra)")


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def hparams_of(events) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {}
    for name, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        values[name] = getattr(value, kind)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    return {"hparams": values, "metrics": [m.name.tag for m in experiment.metric_infos]}


def test_a_run_logs_steps_epochs_hparams_and_pictures(tmp_path):
    data = pattern_dataset()
    result = fit(tiny_config(epochs=2, schedule="constant"), tmp_path / "run", data=data, progress=False, log=lambda *_: None)
    events = read_events(tmp_path / "run")
    tags = events.Tags()

    loss = events.Scalars("step/loss")
    assert [e.step for e in loss] == list(range(1, result["metrics"]["step"] + 1))
    assert all(0 < e.value < 10 for e in loss)
    assert all(e.value == pytest.approx(0.05) for e in events.Scalars("step/lr"))  # constant schedule

    history = result["metrics"]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second"):
        points = events.Scalars(f"epoch/{key}")
        assert [e.step for e in points] == [1, 2], key
    assert events.Scalars("epoch/test_accuracy")[-1].value == pytest.approx(history["test_accuracy"])
    assert events.Scalars("hparam/test_accuracy")[-1].value == pytest.approx(history["test_accuracy"])

    hp = hparams_of(events)
    assert hp["hparams"]["train.lr"] == pytest.approx(0.05)
    assert hp["hparams"]["train.optimizer"] == "sgd"
    assert hp["hparams"]["train.batch_size"] == 16
    assert "hparam/test_accuracy" in hp["metrics"]

    assert {"test/confusion_matrix", "test/most_confident_mistakes"} <= set(tags["images"])
    picture = events.Images("test/confusion_matrix")[-1]
    assert picture.width > 50 and picture.height > 50 and picture.encoded_image_string.startswith(b"\x89PNG")


def test_no_tensorboard_setting_writes_nothing(tmp_path):
    fit(tiny_config(epochs=1, tensorboard=False), tmp_path / "run", data=pattern_dataset(), progress=False,
        log=lambda *_: None)
    assert not (tmp_path / "run" / "tb").exists()


def test_missing_tensorboard_warns_once_and_trains(tmp_path, monkeypatch):
    import cnnlab.tensorboard_log as tensorboard_log

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(tensorboard_log, "_warned", False)
    lines: list[str] = []
    for name in ("a", "b"):
        result = fit(tiny_config(epochs=1), tmp_path / name, data=pattern_dataset(), progress=False, log=lines.append)
        assert result["metrics"]["test_accuracy"] > 0
        assert not (tmp_path / name / "tb").exists()
    warnings = [line for line in lines if "tensorboard" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "--no-tensorboard" in warnings[0], lines


def test_resume_purges_the_steps_it_redoes(tmp_path):
    """A run killed in epoch 2 after logging some of its steps: resuming after epoch 1 logs those steps again,
    and TensorBoard shows each step once."""
    data = pattern_dataset()
    run = tmp_path / "run"
    steps_per_epoch = fit(tiny_config(epochs=1), run, data=data, progress=False, log=lambda *_: None)["metrics"]["step"]
    from cnnlab.tensorboard_log import tensorboard_log
    from cnnlab.runs import load_run_config

    config = load_run_config(run)
    with tensorboard_log(run, config, steps_per_epoch) as tb:  # what the killed epoch 2 had written
        for step in range(steps_per_epoch + 1, steps_per_epoch + 4):
            tb.step(step, torch.tensor(99.0), 0.05)
    config.train.epochs = 2
    fit(config, run, resume=True, data=data, progress=False, log=lambda *_: None)
    loss = read_events(run).Scalars("step/loss")
    assert [e.step for e in loss] == list(range(1, 2 * steps_per_epoch + 1))
    assert max(e.value for e in loss) < 99


def test_pictures_are_images():
    confusion = confusion_picture([[5, 1, 0], [0, 6, 0], [2, 0, 4]], ["horizontal", "vertical", "square"])
    assert confusion.dtype.name == "uint8" and confusion.ndim == 3 and confusion.shape[2] == 3
    images = torch.randint(0, 255, (6, 1, 12, 12), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = torch.tensor([[0.0, 5, 0], [0, 5, 0], [9, 0, 0], [5, 0, 0], [0, 0, 3], [0, 0, 2]])
    picture = mistakes_picture(images, labels, logits, ["a", "b", "c"])
    assert picture.shape[1] >= 2 * 56  # two mistakes, side by side
    assert mistakes_picture(images[:1], labels[:1], logits[3:4], ["a", "b", "c"]).shape[2] == 3  # none: a note


def test_no_tensorboard_flag_sets_the_config():
    from cnnlab.cli import build_parser
    from cnnlab.commands.train import overrides

    args = build_parser("train").parse_args(["train", "--no-tensorboard"])
    assert overrides(args)["train"]["tensorboard"] is False
    assert overrides(build_parser("train").parse_args(["train"]))["train"]["tensorboard"] is None  # the default: on


@pytest.mark.parametrize("errno_code, text", [(28, "No space left on device"), (30, "Read-only file system")])
def test_a_failing_event_write_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, errno_code, text):
    """The writer thread's ENOSPC/EROFS surfaces on the next add or flush: one warning, the run finishes."""
    from torch.utils.tensorboard import SummaryWriter

    def fails(*_args, **_kwargs):
        raise OSError(errno_code, text)

    monkeypatch.setattr(SummaryWriter, "add_scalar", fails)
    monkeypatch.setattr(SummaryWriter, "flush", fails)
    lines: list[str] = []
    result = fit(tiny_config(epochs=2), tmp_path / "run", data=pattern_dataset(), progress=False, log=lines.append)
    warnings = [line for line in lines if "TensorBoard" in line]
    assert len(warnings) == 1 and text in warnings[0] and "training goes on" in warnings[0]
    assert result["metrics"]["epoch"] == 2 and (tmp_path / "run" / "model.safetensors").exists()


def test_a_tensorboard_folder_that_cannot_be_made_is_one_warning(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(SummaryWriter, "__init__", read_only)
    lines: list[str] = []
    fit(tiny_config(epochs=1), tmp_path / "run", data=pattern_dataset(), progress=False, log=lines.append)
    warnings = [line for line in lines if "TensorBoard" in line]
    assert len(warnings) == 1 and "Read-only file system" in warnings[0]
