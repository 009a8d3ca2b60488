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


# ---------------------------------------------------------------------------------------------
# The one writer (issue 31): a lock, no silent replacement, checked resume files
# ---------------------------------------------------------------------------------------------

def _tiny_config(epochs: float = 1):
    from cnnlab.config import Config, DataConfig, TrainConfig
    from tests.support.helpers import TINY_SPEC

    return Config(model=list(TINY_SPEC), data=DataConfig(),
                  train=TrainConfig(epochs=epochs, batch_size=30, device="cpu", threads=1, tensorboard=False))


def _fit(out, **kwargs):
    from cnnlab.training import fit
    from tests.support.helpers import pattern_dataset

    return fit(_tiny_config(kwargs.pop("epochs", 1)), out, data=pattern_dataset(), progress=False,
               log=lambda *_: None, **kwargs)


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    import os

    from cnnlab.runs import RunWriter

    with RunWriter(tmp_path / "run"):
        # flock locks belong to the open file: a second open in this very process conflicts as another process would
        with pytest.raises(CnnlabError, match=rf"another cnnlab process \(process {os.getpid()}\)"):
            RunWriter(tmp_path / "run", resume=True).__enter__()
        with pytest.raises(CnnlabError, match=rf"being written by another cnnlab process \(process {os.getpid()}\)"):
            _fit(tmp_path / "run")
    with RunWriter(tmp_path / "run", resume=True):  # released on exit: free again
        pass


def test_out_naming_an_existing_run_is_refused_and_left_untouched(tmp_path):
    run = tmp_path / "run"
    _fit(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CnnlabError, match=r"already holds a run .*--resume .*--overwrite") as err:
        _fit(run, epochs=2)
    assert err.value.exit_code == 2
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_old_run_entirely(tmp_path):
    run = tmp_path / "run"
    _fit(run, epochs=2)
    (run / "tb").mkdir()
    (run / "tb" / "old-events").write_text("old")
    _fit(run, overwrite=True)
    assert len(read_history(run)) == 1 and not (run / "tb").exists()


def test_an_empty_existing_folder_is_a_fine_out(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _fit(tmp_path / "empty")["metrics"]["epoch"] == 1


def test_a_refused_new_folder_is_not_left_behind(tmp_path):
    from cnnlab.config import Config, DataConfig, TrainConfig
    from cnnlab.training import fit
    from tests.support.helpers import pattern_dataset

    bad = Config(model=[{"type": "conv", "out_channels": 4, "kernel_size": 99}, "flatten", {"type": "linear"}],
                 data=DataConfig(), train=TrainConfig(epochs=1, device="cpu", threads=1, tensorboard=False))
    with pytest.raises(CnnlabError):
        fit(bad, tmp_path / "new", data=pattern_dataset(), progress=False, log=lambda *_: None)
    assert not (tmp_path / "new").exists()


def test_flipped_bits_in_a_resume_file_are_named_as_damage(tmp_path):
    from cnnlab.runs import RESUME_FILE, read_resume

    run = tmp_path / "run"
    _fit(run)
    path = run / RESUME_FILE
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 200, len(data), 10):  # the tensor data section is at the end
        data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CnnlabError, match="damaged file: its tensors do not match the checksum"):
        read_resume(run)
    with pytest.raises(CnnlabError, match="damaged file"):
        _fit(run, resume=True, epochs=2)


def test_a_full_disk_at_the_first_save_does_not_advise_resume(tmp_path, monkeypatch):
    from cnnlab import runs

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "save_model", full)
    with pytest.raises(CnnlabError) as err:
        _fit(tmp_path / "run")
    message = str(err.value)
    assert err.value.exit_code == 4 and "--resume" not in message and "train again" in message


def test_a_full_disk_later_advises_resume_and_resume_works(tmp_path, monkeypatch):
    from cnnlab import runs

    _fit(tmp_path / "run")
    real = runs.save_model
    monkeypatch.setattr(runs, "save_model", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(CnnlabError, match=r"cannot save epoch 2 .*continue with: cnnlab train --resume") as err:
        _fit(tmp_path / "run", resume=True, epochs=2)
    assert err.value.exit_code == 4
    monkeypatch.setattr(runs, "save_model", real)
    assert _fit(tmp_path / "run", resume=True, epochs=2)["metrics"]["epoch"] == 2


def test_resume_on_a_full_disk_exits_4(tmp_path, monkeypatch):
    from pathlib import Path

    _fit(tmp_path / "run")
    real = Path.write_bytes

    def full(self, data):
        if self.name == ".write-test":
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(CnnlabError, match="not writable") as err:
        _fit(tmp_path / "run", resume=True, epochs=2)
    assert err.value.exit_code == 4


@pytest.mark.slow  # a subprocess
def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    import signal
    import subprocess
    import sys

    from cnnlab.runs import RunWriter, lock_holder
    from tests.support.run_folders import cnnlab_env

    code = ("import sys; from cnnlab.runs import RunWriter; w = RunWriter(sys.argv[1]).__enter__(); "
            "print('locked', flush=True); sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=cnnlab_env())
    try:
        assert process.stdout.readline().strip() == "locked"
        assert lock_holder(tmp_path / "run") == f"process {process.pid}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert lock_holder(tmp_path / "run") is None
    with RunWriter(tmp_path / "run", resume=True):
        pass


def test_a_run_remembers_where_its_named_data_was_found(tmp_path, monkeypatch):
    """`make demo` sets CNNLAB_DATA for itself alone: `cnnlab evaluate RUN` in the user's own shell
    must still find MNIST where training found it."""
    from cnnlab.checkpoint import save_model
    from cnnlab.data.named import found_root
    from cnnlab.layers import build_model, parse_layers
    from tests.conftest import mnist_root
    from tests.support.helpers import TINY_SPEC

    root = mnist_root()
    if root is None:
        pytest.skip("MNIST not found")
    assert found_root("mnist") == str(root.resolve()) and found_root("folder:x") is None
    model = build_model(parse_layers(TINY_SPEC), (1, 28, 28), 10)
    meta = {"layers": TINY_SPEC, "input_shape": [1, 28, 28], "classes": [str(i) for i in range(10)],
            "preprocessing": {"kind": "digit", "channels": 1, "size": [28, 28], "mean": [0.1], "std": [0.3]},
            "dataset": "mnist", "data_root": found_root("mnist"), "epoch": 1, "metrics": {}, "config": {}}
    save_model(tmp_path / "run" / "model.safetensors", model, meta)
    monkeypatch.delenv("CNNLAB_DATA")
    data = Run(tmp_path / "run").load_test_data(limit_per_class=2)
    assert len(data.test) == 20


def test_a_flipped_byte_in_a_resume_files_tensor_names_is_named_as_damage(tmp_path):
    from cnnlab.runs import RESUME_FILE, read_resume

    run = tmp_path / "run"
    _fit(run)
    path = run / RESUME_FILE
    data = path.read_bytes()
    at = data.index(b"model.features.0.weight") + len("model.features.0.weigh")
    path.write_bytes(data[:at] + b"u" + data[at + 1:])  # the name now reads "...weighu"
    with pytest.raises(CnnlabError, match="damaged file"):
        read_resume(run)


def test_training_records_where_its_named_data_was_found(tmp_path):
    from cnnlab.checkpoint import read_metadata
    from cnnlab.config import Config, DataConfig, TrainConfig
    from cnnlab.training import fit
    from tests.conftest import mnist_root
    from tests.support.helpers import TINY_SPEC, pattern_dataset

    if mnist_root() is None:
        pytest.skip("MNIST not found")
    config = Config(model=list(TINY_SPEC), data=DataConfig(dataset="mnist"),
                    train=TrainConfig(epochs=1, batch_size=30, device="cpu", threads=1, tensorboard=False))
    fit(config, tmp_path / "run", data=pattern_dataset(), progress=False, log=lambda *_: None)  # the images stand in
    assert read_metadata(tmp_path / "run")["data_root"] == str(mnist_root().resolve())
