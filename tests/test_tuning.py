"""`cnnlab tune`: the search space file, trials, pruning, workers killed or interrupted, storages."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("optuna", reason="optuna is not installed (the experiments extra)")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from cnnlab.cli import main  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402
from cnnlab.tuning.space import load_space  # noqa: E402
from cnnlab.tuning.worker import is_surplus, run_trial, run_worker  # noqa: E402
from tests.support.helpers import TINY_SPEC, pattern_dataset, write_image_folder  # noqa: E402
from tests.support.run_folders import cnnlab_env  # noqa: E402

SPACE = {"base": "tiny.yaml", "settings": {"train.epochs": 2},
         "space": {"train.lr": {"low": "1e-3", "high": 0.3, "log": True},
                   "model.1.out_channels": {"low": 2, "high": 8, "step": 2},
                   "train.optimizer": {"choices": ["adam", "sgd"]}}}


def write_workspace(root: Path, per_class: int = 20, space: dict | None = None, epochs: int = 2) -> Path:
    """root/data (a pattern image folder), root/tiny.yaml (base config) and root/space.yaml; returns the space file."""
    data = root / "data"
    if not data.exists():
        write_image_folder(data, n_per_class=per_class)
    (root / "tiny.yaml").write_text(yaml.safe_dump({
        "model": TINY_SPEC, "data": {"dataset": f"folder:{data}", "image_size": 12},
        "train": {"batch_size": 16, "lr": 0.05, "optimizer": "sgd", "device": "cpu", "threads": 1}}))
    space = json.loads(json.dumps(space or SPACE))
    space["settings"]["train.epochs"] = epochs
    (root / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    return root / "space.yaml"


def space_error(root: Path, space: dict) -> str:
    path = root / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    with pytest.raises(CnnlabError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# The space file
# ---------------------------------------------------------------------------------------------

def test_space_reads_ranges_choices_and_layer_settings(tmp_path):
    space = load_space(write_workspace(tmp_path))
    kinds = {p.name: p.kind for p in space.params}
    assert kinds == {"train.lr": "float", "model.1.out_channels": "int", "train.optimizer": "choice"}
    assert space.params[0].low == pytest.approx(1e-3) and space.params[0].log  # "1e-3" (YAML text) is a number
    config = space.config({"train.lr": 0.01, "model.1.out_channels": 6, "train.optimizer": "adam"})
    assert config.model[0]["out_channels"] == 6 and config.train.lr == 0.01 and config.train.epochs == 2


@pytest.mark.parametrize("change, words", [
    ({"spaces": {}}, "space.yaml: spaces: unknown key (did you mean 'space'?)"),
    ({"base": "tutorail"}, "base: 'tutorail' is neither a preset"),
    ({"base": "missing.yaml"}, "base: config file"),
    ({"settings": {"train.epohcs": 1}}, "settings.train.epohcs: unknown setting (did you mean 'epochs'?)"),
    ({"space": {"train.lr": {"low": 0.1, "high": 0.01}}}, "space.train.lr: low must be below high"),
    ({"space": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, "space.train.lr: a log scale needs low > 0"),
    ({"space": {"train.lr": {"low": 0.001, "hihg": 0.1}}}, "space.train.lr.hihg: unknown key (did you mean 'high'?)"),
    ({"space": {"train.optimizer": {"choices": []}}}, "space.train.optimizer.choices: expected a non-empty list"),
    ({"space": {"train.optimizer": {"choices": ["adam", "lion"]}}}, "space.train.optimizer: expected adam or adamw or sgd, got 'lion'"),
    ({"space": {"train.lr": {"low": 0.001, "high": 5000}}}, "space.train.lr: expected a positive number below 1000, got 5000"),
    ({"space": {"data.image_size": {"low": 8, "high": 16}}}, "space.data.image_size: data settings cannot be searched"),
    ({"space": {"model.9.out_channels": {"low": 2, "high": 4}}}, "space.model.9.out_channels: no layer '9' (the model has 5 layers"),
    ({"space": {"model.3.out_channels": {"low": 2, "high": 4}}}, "space.model.3.out_channels = 2: layer 3 (maxpool): unknown key 'out_channels'"),
    ({"space": {"train.epochs": {"low": 1, "high": 3}}}, "space.train.epochs: also fixed under settings"),
    ({"space": {"train.lr": "0.1"}}, "space.train.lr: expected {low: .., high: ..} or {choices: [..]}"),
])
def test_space_mistakes_are_one_line_errors_naming_the_key(tmp_path, change, words):
    write_workspace(tmp_path)
    space = {**SPACE, **change}
    assert words in space_error(tmp_path, space)


def test_layer_settings_that_cannot_fit_the_images_are_named_before_any_trial(tmp_path, capsys):
    space = {**SPACE, "space": {"model.1.kernel_size": {"low": 3, "high": 40}}}
    path = write_workspace(tmp_path, space=space)
    assert main(["tune", str(path), "--trials", "2", "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: space.yaml: space.model.1.kernel_size = 40: layer 1 (conv") and "\n" not in err, err
    assert not list((tmp_path / "study").glob("trial-*"))  # no trial started


def test_bad_space_file_leaves_no_study_behind(tmp_path, capsys):
    write_workspace(tmp_path)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**SPACE, "space": {"train.lr": {"low": 1, "high": 0.1}}}))
    assert main(["tune", str(tmp_path / "space.yaml"), "--trials", "2", "--out", str(tmp_path / "study")]) == 2
    assert "space.train.lr: low must be below high" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


# ---------------------------------------------------------------------------------------------
# Trials in this process (in-memory study)
# ---------------------------------------------------------------------------------------------

def test_a_pruned_trial_ends_cleanly_with_its_epochs_saved(tmp_path):
    space = load_space(write_workspace(tmp_path, epochs=3))
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # prunes all
    trial = study.ask()
    lines: list[str] = []
    assert run_trial(study, trial, space, tmp_path / "study", pattern_dataset(), 1, log=lines.append) == "pruned"
    frozen = study.trials[0]
    assert frozen.state == TrialState.PRUNED and list(frozen.intermediate_values) == [1]
    run = Path(frozen.user_attrs["run_dir"])
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "stopped after epoch 1 by the pruner" in frozen.user_attrs["note"]
    assert any(line.startswith("trial 0 pruned") for line in lines)
    assert list((run / "tb").glob("events.out.tfevents.*"))  # its TensorBoard log was closed, not lost


def test_worker_stops_at_n_finished_trials_and_a_second_run_continues(tmp_path):
    space = load_space(write_workspace(tmp_path, epochs=1))
    study = optuna.create_study(direction="maximize")
    data = pattern_dataset()
    assert run_worker(study, space, 2, tmp_path / "study", data, 1, log=lambda *_: None) == "done"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert run_worker(study, space, 3, tmp_path / "study", data, 1, log=lambda *_: None) == "done"
    assert [t.number for t in study.trials if t.state == TrialState.COMPLETE] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["trial-0000", "trial-0001", "trial-0002"]


def test_a_stop_during_a_trials_save_ends_the_worker_after_that_trial(tmp_path, monkeypatch):
    """A SIGTERM that arrives while a trial is being evaluated or saved (inside training's own
    StopRequest, which then finishes normally) still ends the worker: the trial is told to the study,
    and no new trial starts."""
    import cnnlab.training
    from cnnlab.runtime import StopRequest

    def fit_that_gets_a_signal_while_saving(config, run_dir, **kwargs):
        with StopRequest(None):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, between two bytecodes
        return {"metrics": {"test_accuracy": 0.5}}

    monkeypatch.setattr(cnnlab.training, "fit", fit_that_gets_a_signal_while_saving)
    space = load_space(write_workspace(tmp_path, epochs=1))
    study = optuna.create_study(direction="maximize")
    assert run_worker(study, space, 5, tmp_path / "study", None, 1, log=lambda *_: None) == "interrupted"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_every_worker_of_a_study_must_use_its_heartbeat(tmp_path, capsys):
    space = write_workspace(tmp_path, epochs=1)
    study_dir = str(tmp_path / "study")
    assert main(["tune", str(space), "--trials", "1", "--out", study_dir, "--heartbeat", "5", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["tune", str(space), "--trials", "1", "--out", study_dir, "--heartbeat", "7"]) == 2
    assert "--heartbeat 7: study space uses --heartbeat 5" in capsys.readouterr().err
    assert main(["tune", str(space), "--trials", "1", "--out", study_dir, "--heartbeat", "5"]) == 0  # done already
    assert "1 of 1 trials finished" in capsys.readouterr().out


def test_trials_on_a_folder_are_compared_on_validation_not_test(tmp_path, capsys):
    """A folder has a validation split, so the pruner and the objective see validation accuracy (the
    kept epoch's), and the test split is left for judging the chosen settings."""
    space = write_workspace(tmp_path, epochs=2)
    study_dir = tmp_path / "study"
    assert main(["tune", str(space), "--trials", "2", "--out", str(study_dir), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    study = open_journal(study_dir)
    assert study.user_attrs["cnnlab:metric"] == "val_accuracy"
    for trial in study.trials:
        history = [json.loads(line) for line in (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        val = [m["val_accuracy"] for m in history]
        assert list(trial.intermediate_values.values()) == val
        assert trial.value == max(val) and "test_accuracy" in history[-1]  # tested once, at the end
    assert "val acc" in (study_dir / "trials.md").read_text() and "val acc" in out
    assert "validation accuracy" in (study_dir / "best.yaml").read_text().splitlines()[0]
    assert "best: trial" in out and "validation accuracy" in out


def test_diverging_settings_are_pruned_with_the_reason(tmp_path):
    space = load_space(write_workspace(tmp_path, epochs=1, space={**SPACE, "space": {"train.lr": {"choices": [900.0]}}}))
    study = optuna.create_study(direction="maximize")
    assert run_trial(study, study.ask(), space, tmp_path / "study", pattern_dataset(), 1, log=lambda *_: None) == "pruned"
    assert study.trials[0].state == TrialState.PRUNED
    assert study.trials[0].user_attrs["note"].startswith("error: training diverged")


# ---------------------------------------------------------------------------------------------
# Workers in their own processes
# ---------------------------------------------------------------------------------------------

def open_journal(study_dir: Path, name: str = "space"):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def tune_command(space: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cnnlab", "tune", str(space), *args]


def epochs_of(run_dir: str) -> list[int]:
    return [json.loads(line)["epoch"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def check_study(study, n_trials: int) -> None:
    """N finished trials, none lost, none trained twice after finishing."""
    trials = [t for t in study.get_trials() if not is_surplus(t)]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = {t.number: t for t in trials}
    for t in trials:
        for earlier in t.system_attrs.get("retry_history", []):
            assert numbers[earlier].state == TrialState.FAIL, "a finished trial was run again"
    for t in trials:
        if t.state == TrialState.FAIL:  # its settings were run again, and that re-run finished
            assert any(t.number in r.system_attrs.get("retry_history", []) and r.state in (TrialState.COMPLETE, TrialState.PRUNED)
                       for r in trials), f"trial {t.number} was lost"
    folders = [t.user_attrs["run_dir"] for t in finished]
    assert len(set(folders)) == len(folders)
    for t in finished:  # each finished run trained its epochs once, in order
        epochs = epochs_of(t.user_attrs["run_dir"])
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 1


def wait_for_running_trial(study_dir: Path, pids: set[int] | None, process, min_epochs: int, max_epochs: int,
                           timeout: float = 240):
    """A trial running in one of `pids` (any worker if None) with min_epochs..max_epochs epochs saved."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "tune ended before a trial could be caught running"
        if (study_dir / "journal.log").exists():
            try:
                study = open_journal(study_dir)
            except KeyError:  # not created yet
                time.sleep(0.05)
                continue
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                run_dir, pid = t.user_attrs.get("run_dir"), t.user_attrs.get("pid")
                if not run_dir or (pids is not None and pid not in pids) or not (Path(run_dir) / "metrics.jsonl").exists():
                    continue
                if min_epochs <= len(epochs_of(run_dir)) <= max_epochs:
                    return t, pid
        time.sleep(0.02)
    raise AssertionError("no trial was caught running")


def worker_pids(parent: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.mark.slow
def test_two_workers_one_killed_mid_trial_the_study_still_ends_with_n_trials(tmp_path):
    """`--workers 2`; one worker gets SIGKILL in the middle of a trial. Its heartbeat stops, the other
    worker fails the trial and runs its settings again: N finished trials, none lost, none run twice."""
    space = write_workspace(tmp_path, per_class=150, epochs=8)
    study_dir = tmp_path / "study"
    env = cnnlab_env()
    parent = subprocess.Popen(tune_command(space, "--trials", "4", "--workers", "2", "--out", str(study_dir),
                                           "--heartbeat", "1", "--threads", "1"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(worker_pids(parent.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        victim_trial, victim = wait_for_running_trial(study_dir, worker_pids(parent.pid), parent, 1, 5)
        os.kill(victim, signal.SIGKILL)
        out, err = parent.communicate(timeout=600)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 0, err
    assert f"worker {victim} ended with signal 9" in err
    study = open_journal(study_dir)
    check_study(study, 4)
    killed = study.trials[victim_trial.number]
    assert killed.state == TrialState.FAIL
    rerun = [t for t in study.trials if victim_trial.number in t.system_attrs.get("retry_history", [])]
    assert len(rerun) == 1 and rerun[0].params == killed.params
    assert f"re-run of trial {killed.number}" in out
    assert (study_dir / "best.yaml").exists() and (study_dir / "history.png").exists()
    assert (study_dir / "importance.png").exists() and "| trial | state |" in (study_dir / "trials.md").read_text()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_continues(tmp_path):
    space = write_workspace(tmp_path, per_class=150, epochs=6)
    study_dir = tmp_path / "study"
    command = tune_command(space, "--trials", "3", "--out", str(study_dir), "--threads", "1")
    process = subprocess.Popen(command, env=cnnlab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        interrupted, _ = wait_for_running_trial(study_dir, None, process, 1, 3)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to continue" in err
    assert f"trial {interrupted.number} interrupted" in out
    study = open_journal(study_dir)
    assert study.trials[interrupted.number].state == TrialState.FAIL
    assert any(t.state == TrialState.WAITING for t in study.trials)  # its settings wait for the next run

    result = subprocess.run(command, env=cnnlab_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"a re-run of trial {interrupted.number}" in result.stdout
    check_study(open_journal(study_dir), 3)


@pytest.mark.slow
def test_sigterm_mid_trial_ends_tune_and_starts_no_new_trial(tmp_path):
    """SIGTERM to `cnnlab tune` (to the process alone, as a scheduler sends it) while a trial trains:
    tune ends (within the hang guard of `communicate`), the trial is failed and queued again, and no
    trial numbered after it was started."""
    space = write_workspace(tmp_path, per_class=150, epochs=8)
    study_dir = tmp_path / "study"
    process = subprocess.Popen(tune_command(space, "--trials", "3", "--out", str(study_dir), "--threads", "1"),
                               env=cnnlab_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        interrupted, _ = wait_for_running_trial(study_dir, None, process, 1, 6)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to continue" in err
    study = open_journal(study_dir)
    assert study.trials[interrupted.number].state == TrialState.FAIL
    later = [t for t in study.trials if t.number > interrupted.number]
    assert all(t.state == TrialState.WAITING for t in later)  # queued again (its settings), never started
    assert not any(t.state == TrialState.RUNNING for t in study.trials)


@pytest.mark.slow
def test_database_storage_sqlite(tmp_path):
    """The database path (RDBStorage with its own heartbeat), on SQLite: one worker, 2 trials."""
    space = write_workspace(tmp_path, epochs=1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = subprocess.run(tune_command(space, "--trials", "2", "--out", str(tmp_path / "study"), "--storage", url,
                                         "--threads", "1"), env=cnnlab_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="space", storage=url)
    check_study(study, 2)


# ---------------------------------------------------------------------------------------------
# PostgreSQL: Debian's server, started here on a loopback port
# ---------------------------------------------------------------------------------------------

def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _postgres_driver() -> str | None:
    """The URL scheme for the PostgreSQL driver that is installed (SQLAlchemy 2.1's default is psycopg 3)."""
    if importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg"
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server in a temporary folder on a free loopback port, stopped afterwards."""
    bin_dir, scheme = _postgres_bin(), _postgres_driver()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    if scheme is None:
        pytest.skip("no PostgreSQL driver for Python (pip install 'psycopg[binary]' or psycopg2-binary)")
    as_postgres: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(folder, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    try:
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "cnnlab"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"),
                        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
        try:
            subprocess.run([*as_postgres, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "cnnlab",
                            "optuna"], check=True, capture_output=True, timeout=60)
            yield f"{scheme}://cnnlab@127.0.0.1:{port}/optuna"
        finally:
            subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql(tmp_path, postgres_url):
    space = write_workspace(tmp_path, epochs=2)
    result = subprocess.run(tune_command(space, "--trials", "4", "--workers", "2", "--out", str(tmp_path / "study"),
                                         "--storage", postgres_url, "--threads", "1"),
                            env=cnnlab_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="space", storage=postgres_url)
    check_study(study, 4)
    assert len({t.user_attrs["pid"] for t in study.trials if t.state == TrialState.COMPLETE or
                t.state == TrialState.PRUNED}) >= 1
    assert "4 of 4 trials finished" in result.stdout


def test_limit_per_class_reaches_every_trial_and_is_part_of_the_study(tmp_path, monkeypatch):
    import cnnlab.tuning as tuning

    space_file = write_workspace(tmp_path)
    seen = []

    class Stop(Exception):
        pass

    def open_study(name, storage, heartbeat, trials, study_dir, space):
        seen.append((space.config({}).data.limit_per_class, space.fingerprint()))
        raise Stop

    monkeypatch.setattr(tuning, "open_study", open_study)
    for limit in (5, None):
        with pytest.raises(Stop):
            tuning.tune(space_file, 2, out=tmp_path / "study", limit_per_class=limit)
    (five, with_limit), (none, without) = seen
    assert (five, none) == (5, None) and with_limit != without  # another limit is another study
    with pytest.raises(CnnlabError, match="data.limit_per_class"):
        tuning.tune(space_file, 2, out=tmp_path / "study", limit_per_class=0)
