"""One opened run (`cnnlab.runs`): its files, history, settings and final metrics, the model loaded
once, `with_model`, and the run that stopped before its first epoch."""

from __future__ import annotations

import json

import pytest
import torch

from cnnlab.errors import CnnlabError
from cnnlab.runs import CONFIG_FILE, METRICS_FILE, Run, open_run, read_history

from tests.support.tiny_runs import CLASSES, SIZE, make_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("runs"), epochs=3)


def test_history_and_final_metrics_come_from_metrics_jsonl_without_the_model(tiny_run):
    run = Run(tiny_run)
    assert [m["epoch"] for m in run.history()] == [1, 2, 3]
    assert run.final_metrics()["test_accuracy"] == pytest.approx(0.75)
    assert "_loaded" not in run.__dict__  # compare needs no weights


def test_final_metrics_take_the_test_values_of_the_last_evaluated_epoch(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"epoch": 1, "test_accuracy": 0.5, "test_loss": 1.0}) + "\n"
                                         + json.dumps({"epoch": 2, "train_loss": 0.3}) + "\n{torn line")
    assert len(read_history(tmp_path)) == 2  # a torn last line does not hide the rest
    assert Run(tmp_path).final_metrics() == {"epoch": 2, "train_loss": 0.3, "test_accuracy": 0.5, "test_loss": 1.0}
    assert Run(tmp_path / "empty").final_metrics() == {}


def test_settings_flatten_config_json(tiny_run):
    settings = Run(tiny_run).settings()
    assert settings["train.epochs"] == 3 and settings["data.image_size"] == SIZE


def test_open_run_loads_the_model_once_with_everything_it_needs(tiny_run):
    run = open_run(tiny_run)
    assert run.classes == CLASSES and tuple(run.input_shape) == (1, SIZE, SIZE)
    assert run.model is run.model and not run.model.training
    assert run.file(CONFIG_FILE) == tiny_run / CONFIG_FILE
    assert open_run(tiny_run / "model.safetensors").classes == CLASSES  # the model file opens the same way


def test_with_model_swaps_only_the_module(tiny_run):
    run = open_run(tiny_run)
    copy = torch.nn.Sequential(run.model.features, run.model.head)
    other = run.with_model(copy)
    assert other.model is copy and run.model is not copy
    assert other.classes == run.classes and other.history() == run.history()


def test_a_run_stopped_before_its_first_epoch_says_so(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(CnnlabError, match="interrupted before its first epoch.*train it again") as error:
        open_run(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "resume.safetensors").write_bytes(b"")  # stopped inside the epoch, where it was saved
    with pytest.raises(CnnlabError, match="interrupted before its first epoch.*cnnlab train --resume"):
        open_run(tmp_path)
    with pytest.raises(CnnlabError, match="no such model file or run folder"):
        open_run(tmp_path / "missing")
