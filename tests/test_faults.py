"""Faults during training: kill -9, Ctrl-C/SIGTERM, a diverging loss, an unwritable or full disk.

Every test runs the real `cnnlab train` command in a subprocess on a tiny folder of synthetic
images, so an epoch takes a fraction of a second. "Nothing lost" is checked the strict way: a run
that was killed and resumed ends with exactly the weights of a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.run_folders import (check_run_folder, cnnlab_env, final_weights, one_error_line, pattern_folder,
                               run_cnnlab, same_weights, start_cnnlab, write_config)

EPOCHS = 12


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """The pattern folder, a config, and the reference: the same run, never interrupted."""
    root = tmp_path_factory.mktemp("faults")
    env = cnnlab_env(CNNLAB_CACHE=str(root / "cache"))
    folder = pattern_folder(root / "patterns")
    config = write_config(root / "config.json", f"folder:{folder}", EPOCHS, batch_size=2)  # 81 steps an epoch
    reference = root / "reference"
    result = run_cnnlab("train", "--config", str(config), "--no-progress", "--out", str(reference), env=env)
    assert result.returncode == 0, result.stderr
    history = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    epoch_seconds = (history[-1]["elapsed_seconds"] - history[0]["elapsed_seconds"]) / (len(history) - 1)
    return {"root": root, "env": env, "config": config, "reference": final_weights(reference),
            "epoch_seconds": epoch_seconds}


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if text in line:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"cnnlab exited ({process.returncode}) before printing {text!r}: {process.stderr.read()}")
    raise AssertionError(f"no {text!r} within {timeout}s")


@pytest.mark.slow  # `cnnlab train` processes
def test_kill_9_at_random_moments_then_resume_loses_nothing(workspace):
    """kill -9 a real training process at random moments, several times; every file always loads;
    --resume continues after the last saved epoch and ends with the uninterrupted run's weights."""
    rng = random.Random(int(os.environ.get("CNNLAB_FAULT_SEED", "6")))
    run_dir = workspace["root"] / "killed"
    kills, epochs_seen, temp_files_seen = 0, [], 0
    for attempt in range(10):
        if epochs_seen and epochs_seen[-1] == EPOCHS:
            break
        resuming = (run_dir / "resume.safetensors").exists()
        args = ["--resume", str(run_dir)] if resuming else ["--config", str(workspace["config"]), "--out", str(run_dir)]
        process = start_cnnlab("train", *args, "--no-progress", env=workspace["env"])
        try:
            _wait_for_line(process, "training ")  # imports and data loading done: the loop is starting
            # up to 4 epochs (training and saving) after the loop starts: kills land in steps and in writes
            time.sleep(rng.uniform(0.0, 4.0 * workspace["epoch_seconds"]))
            if process.poll() is not None:
                break  # finished before the kill landed
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            kills += 1
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()
        state = check_run_folder(run_dir)  # raises on any file that does not load
        epochs_seen.append(state["epoch"])
        temp_files_seen += len(state["temp_files"])
    assert kills >= 4 and sum(e < EPOCHS for e in epochs_seen) >= 4, f"too few kills landed mid-run: {epochs_seen}"
    assert epochs_seen == sorted(epochs_seen), f"a resume went backwards: {epochs_seen}"

    result = run_cnnlab("train", "--resume", str(run_dir), "--no-progress", env=workspace["env"])
    assert result.returncode == 0, result.stderr
    if epochs_seen[-1] < EPOCHS:
        assert f"resuming {run_dir} after epoch {epochs_seen[-1]} of {EPOCHS}" in result.stdout
    state = check_run_folder(run_dir)
    assert state["epoch"] == EPOCHS and state["temp_files"] == [], state
    assert same_weights(final_weights(run_dir), workspace["reference"]), "the resumed run differs from the uninterrupted one"
    print(f"\nkill -9 x{kills}: saved epochs after each kill {epochs_seen}, leftover temporaries seen {temp_files_seen}; "
          f"resumed to epoch {EPOCHS} with identical weights")


@pytest.mark.slow  # writer processes killed with kill -9
def test_atomic_writes_survive_kill_9_mid_write(tmp_path):
    """A process rewriting a 1 MiB file in a loop, killed at random moments: the file is always whole."""
    target = tmp_path / "weights.bin"
    script = (
        "import sys, itertools\n"
        "from cnnlab.files import atomic_write_bytes\n"
        f"target = {str(target)!r}\n"
        "for i in itertools.count():\n"
        "    atomic_write_bytes(target, bytes([i % 256]) * (1 << 20))\n"
        "    if i == 0: print('ready', flush=True)\n")
    rng = random.Random(6)
    for _ in range(8):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=cnnlab_env())
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.2))
        process.kill()
        process.wait()
        process.stdout.close()
        data = target.read_bytes()
        assert len(data) == 1 << 20 and data.count(data[:1]) == len(data), "a torn write"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "weights.bin"]
    assert all(name.startswith(".weights.bin.") and name.endswith(".tmp") for name in leftovers), leftovers


@pytest.mark.slow  # `cnnlab train` processes
@pytest.mark.parametrize("signum, code, when", [(signal.SIGINT, 130, "epoch 2/"), (signal.SIGTERM, 143, "epoch 3/"),
                                                (signal.SIGINT, 130, "training ")])
def test_ctrl_c_and_sigterm_save_where_they_stopped_and_resume_exactly(workspace, signum, code, when):
    """The signal lands mid-epoch (also in epoch 1, before any epoch was saved): exit 130/143 with one
    line, a checkpoint of that very step, and --resume ends with the uninterrupted run's weights."""
    run_dir = workspace["root"] / f"signal-{code}-{when.split()[0]}"
    process = start_cnnlab("train", "--config", str(workspace["config"]), "--out", str(run_dir), "--no-progress",
                           env=workspace["env"])
    try:
        _wait_for_line(process, when)
        time.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == code, stderr
    line = one_error_line(stderr)
    assert line.startswith("error: interrupted ") and f"cnnlab train --resume {run_dir}" in line, line
    state = check_run_folder(run_dir)
    assert state["temp_files"] == [], state
    assert (run_dir / "resume.safetensors").exists(), "nothing saved on the signal"

    result = run_cnnlab("train", "--resume", str(run_dir), "--no-progress", env=workspace["env"])
    assert result.returncode == 0, result.stderr
    assert f"resuming {run_dir} " in result.stdout
    assert same_weights(final_weights(run_dir), workspace["reference"])
    print(f"\n{signal.Signals(signum).name} after {when!r}: {line}")


def _digests(run_dir: Path) -> dict[str, str]:
    """The run's files by content; the writer's lock file holds the pid of whoever trained last, not the run."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.mark.slow  # `cnnlab train` processes
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(workspace):
    """Epoch 1 trains well; then the run is resumed with a learning rate that makes the loss NaN."""
    run_dir = workspace["root"] / "diverging"
    config = write_config(workspace["root"] / "sgd.json", json.loads(workspace["config"].read_text())["data"]["dataset"], 1,
                          optimizer="sgd", lr=0.05, label_smoothing=0.2)  # gradients never vanish
    result = run_cnnlab("train", "--config", str(config), "--out", str(run_dir), "--no-progress", env=workspace["env"])
    assert result.returncode == 0, result.stderr
    saved = json.loads((run_dir / "config.json").read_text())
    saved["train"]["lr"] = 900.0  # a learning rate that blows up
    (run_dir / "config.json").write_text(json.dumps(saved))
    before = {k: v for k, v in _digests(run_dir).items() if k != "config.json"}

    result = run_cnnlab("train", "--resume", str(run_dir), "--epochs", "3", "--no-progress", env=workspace["env"])
    assert result.returncode == 3, result.stderr
    line = one_error_line(result.stderr)
    assert "training diverged" in line and "at epoch 2, step " in line and "epoch 1 stays saved" in line, line
    after = {k: v for k, v in _digests(run_dir).items() if k != "config.json"}
    assert after == before, "a file of the last good epoch changed"
    assert check_run_folder(run_dir)["epoch"] == 1


@pytest.mark.slow  # `cnnlab train` processes
def test_nan_loss_in_first_epoch(workspace):
    config = write_config(workspace["root"] / "nan.json", json.loads(workspace["config"].read_text())["data"]["dataset"],
                          2, lr=900.0, optimizer="sgd")
    result = run_cnnlab("train", "--config", str(config), "--out", str(workspace["root"] / "nan"), "--no-progress",
                        env=workspace["env"])
    assert result.returncode == 3
    line = one_error_line(result.stderr)
    assert "at epoch 1, step " in line and "no epoch was saved" in line, line


@pytest.mark.slow  # `cnnlab train` processes
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_run_folder_fails_before_any_work(workspace, where):
    if where == "under-a-file":
        blocker = workspace["root"] / "a-file"
        blocker.write_text("not a folder")
        out = blocker / "run"
    else:
        out = Path("/proc/cnnlab-cannot-write-here")
    result = run_cnnlab("train", "--config", str(workspace["config"]), "--out", str(out), "--no-progress",
                        env=workspace["env"])
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"run folder {out} is not writable" in line, line
    assert "training " not in result.stdout  # refused before loading data or building the model


def _limit_file_size(limit: int):
    def apply():  # in the child: files may not grow past `limit` bytes, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow  # `cnnlab train` processes
def test_disk_full_while_saving_is_a_clear_error_and_loses_nothing(workspace):
    """Epoch 1 is saved; then the disk 'fills up' (RLIMIT_FSIZE): the save of epoch 2 fails cleanly."""
    run_dir = workspace["root"] / "full-disk"
    config = write_config(workspace["root"] / "one-epoch.json", json.loads(workspace["config"].read_text())["data"]["dataset"], 1)
    result = run_cnnlab("train", "--config", str(config), "--out", str(run_dir), "--no-progress", env=workspace["env"])
    assert result.returncode == 0, result.stderr
    before = {k: v for k, v in _digests(run_dir).items() if k != "config.json"}
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--resume", str(run_dir), "--epochs", "2",
                             "--no-progress"], capture_output=True, text=True, env=workspace["env"], timeout=300,
                            preexec_fn=_limit_file_size(8_000))
    assert result.returncode == 4, result.stderr
    line = one_error_line(result.stderr)
    assert "cannot save epoch 2" in line and "File too large" in line and "--resume" in line, line
    # the resume point is untouched (model.safetensors may already hold epoch 2: it is written first, whole)
    assert _digests(run_dir)["resume.safetensors"] == before["resume.safetensors"]
    state = check_run_folder(run_dir)
    assert state["epoch"] == 1 and state["temp_files"] == [], state
    # with space again, the run continues
    result = run_cnnlab("train", "--resume", str(run_dir), "--epochs", "2", "--no-progress", env=workspace["env"])
    assert result.returncode == 0, result.stderr
    assert check_run_folder(run_dir)["epoch"] == 2


@pytest.mark.parametrize("stop_at_step", [1, 5, 8, 16])  # 8 steps an epoch: inside epoch 1, mid epoch, its last step
def test_a_stop_mid_epoch_resumes_bit_exactly(tmp_path, monkeypatch, stop_at_step):
    """In-process and deterministic: SIGINT arrives during global step N (dropout, shifts, EMA and
    momentum all in play); the saved step resumes to exactly the weights of a run never stopped."""
    import importlib
    from cnnlab.config import Config, DataConfig, TrainConfig
    from cnnlab.errors import CnnlabError
    from cnnlab.training import fit
    from tests.support.helpers import pattern_dataset

    model = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, "relu", {"type": "dropout", "p": 0.3},
             {"type": "maxpool", "kernel_size": 2}, "flatten", {"type": "linear"}]

    def config() -> Config:
        return Config(model=model, data=DataConfig(), train=TrainConfig(
            epochs=3, batch_size=15, lr=0.05, optimizer="sgd", shift=1, ema=0.9, device="cpu", threads=1))

    data, quiet = pattern_dataset(), (lambda *_: None)
    fit(config(), tmp_path / "straight", data=data, progress=False, log=quiet)

    train_module = importlib.import_module("cnnlab.optim")  # the schedule every step asks
    lr_factor = train_module.lr_factor

    def signal_during(step, total_steps, cfg):  # lr_factor runs once at the start of every step
        if step == stop_at_step - 1 and not signalled:
            signalled.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return lr_factor(step, total_steps, cfg)

    signalled: list[int] = []
    monkeypatch.setattr(train_module, "lr_factor", signal_during)
    with pytest.raises(CnnlabError) as stopped:
        fit(config(), tmp_path / "stopped", data=data, progress=False, log=quiet)
    monkeypatch.setattr(train_module, "lr_factor", lr_factor)
    assert stopped.value.exit_code == 130 and "saved" in str(stopped.value), stopped.value
    epoch, step = (stop_at_step - 1) // 8 + 1, (stop_at_step - 1) % 8 + 1
    assert f"interrupted at epoch {epoch}, step {step} of 8" in str(stopped.value)
    fit(config(), tmp_path / "stopped", resume=True, data=data, progress=False, log=quiet)
    assert same_weights(final_weights(tmp_path / "stopped"), final_weights(tmp_path / "straight"))
    assert check_run_folder(tmp_path / "stopped")["epoch"] == 3


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    from cnnlab.config import Config, DataConfig, TrainConfig
    from cnnlab.errors import CnnlabError
    from cnnlab.training import fit
    from tests.support.helpers import TINY_SPEC, pattern_dataset

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 50_000, 50_000))
    config = Config(model=list(TINY_SPEC), data=DataConfig(), train=TrainConfig(epochs=1, device="cpu", threads=1))
    with pytest.raises(CnnlabError, match="MB free, a checkpoint needs about") as error:
        fit(config, tmp_path / "run", data=pattern_dataset(), progress=False, log=lambda *_: None)
    assert error.value.exit_code == 4 and not (tmp_path / "run" / "resume.safetensors").exists()
