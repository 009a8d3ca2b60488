"""`cnnlab tune SPACE.yaml --trials N`: hyper-parameter search with Optuna.

TPE proposes the settings, a median pruner stops a trial whose accuracy after some epoch is
below the median of earlier trials at that epoch (validation accuracy where the data has a
validation split, as folders do; else test accuracy, which then flatters the best trial), and
every trial is an ordinary run folder in the study's folder (`runs/<study>/trial-0007/`), so
`compare`, `report` and TensorBoard work on it.

    space.py    SPACE.yaml: base config, fixed settings, searched settings; checked up front
    storage.py  the journal file (default) or database, with a heartbeat
    worker.py   the trial loop a worker runs; what happens on Ctrl-C, kill -9 and pruning
    results.py  the table, plots and best.yaml written at the end

`--workers K` starts K worker processes here; more workers on other machines join by running
the same command with the same study folder (shared) or `--storage` URL. Running the command
again continues the study up to N finished trials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import CnnlabError

HEARTBEAT_SECONDS = 20


def tune(space_file: str | Path, trials: int, workers: int = 1, storage: str | None = None, study: str | None = None,
         out: str | Path | None = None, data_root: str | None = None, threads: int | None = None,
         heartbeat: int = HEARTBEAT_SECONDS, worker: bool = False, limit_per_class: int | None = None) -> int:
    """Run the study of `space_file` until it holds `trials` finished trials, with `workers` processes
    here (`worker`: this process is one of them, started by another); the exit code (130: stopped
    early, run again to continue). `storage` is a database URL or journal file (default: the study
    folder's journal.log), `study` the study's name (default: the file's), `out` the study folder;
    `limit_per_class` trains every trial on at most that many images of each class (part of the study:
    another limit is another study)."""
    import importlib.util

    from .space import load_space

    if importlib.util.find_spec("optuna") is None:
        raise CnnlabError("cnnlab tune needs Optuna, which is not installed (pip install optuna, or the experiments extra)")
    if trials < 1:
        raise CnnlabError(f"--trials {trials}: expected at least 1")
    if workers < 1:
        raise CnnlabError(f"--workers {workers}: expected at least 1")
    workers = cap_workers(workers)
    if heartbeat < 1:
        raise CnnlabError(f"--heartbeat {heartbeat}: expected at least 1 second")
    space = load_space(space_file)  # every mistake in SPACE.yaml is reported here, before any trial
    name = study or Path(space_file).stem
    study_dir = Path(out).expanduser() if out else Path("runs") / name
    if data_root:
        space.base["data"]["root"] = data_root
    if limit_per_class is not None:
        space.base["data"]["limit_per_class"] = limit_per_class
        space.config({})  # checked now, with the setting's name
    threads = threads or _threads_per_worker(workers)
    opened = open_study(name, storage, heartbeat, trials, study_dir, space)
    data = _load_data(space)
    if "cnnlab:metric" not in opened.user_attrs:
        from .results import metric_for

        opened.set_user_attr("cnnlab:metric", metric_for(data))
    if worker:
        return 0 if _work(opened, space, trials, study_dir, data, threads, worker=True) == "done" else 130

    space.check_shapes(data.input_shape, len(data.classes))
    from .worker import finished_trials

    where = storage and _shown_storage(storage) or study_dir / "journal.log"
    print(f"study {name}: {len(finished_trials(opened))} of {trials} trials finished so far; storage {where}; "
          f"{workers} worker(s) here, {threads} thread(s) each; run folders in {study_dir}/")
    if workers == 1:
        status = _work(opened, space, trials, study_dir, data, threads)
    else:
        status = _run_worker_processes(space_file, trials, workers, storage, study, data_root, study_dir, threads,
                                       heartbeat, limit_per_class)
    return _finish(opened, space, study_dir, trials, status)


WORKER_MEMORY = 1 << 30  # what one worker process takes, about: measured 6.2 GB for 6 workers


def cap_workers(workers: int) -> int:
    """`workers`, at most one per core and one per GB of available memory; says so when it cuts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    available = _available_memory()
    by_memory = max(1, available // WORKER_MEMORY) if available else workers
    allowed = max(1, min(workers, cores, by_memory))
    if allowed < workers:
        memory = f" and {available / 1e9:.1f} GB of memory available" if available else ""
        print(f"--workers {workers}: this machine has {cores} core(s){memory}; starting {allowed} (each worker is a "
              "whole training process); more machines can join with the same command", file=sys.stderr)
    return allowed


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def open_study(name: str, storage: str | None, heartbeat: int, trials: int, study_dir: Path, space):
    """Create the study, or load it and check that it searches the same space."""
    import optuna

    from .storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened_storage = open_storage(storage, study_dir, heartbeat)
    sampler = optuna.samplers.TPESampler(n_startup_trials=min(10, max(3, trials // 3)), constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=space.warmup_epochs)
    study = optuna.create_study(study_name=name, storage=opened_storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    saved = study.user_attrs.get("cnnlab:space")
    if saved is None:
        study.set_user_attr("cnnlab:space", space.fingerprint())
        study.set_user_attr("cnnlab:space_file", str(space.path))
        study.set_user_attr("cnnlab:heartbeat", heartbeat)
    elif saved != space.fingerprint():
        raise CnnlabError(f"study {name}: it was started with another base, settings or space than {space.path} "
                          "now gives; run it with --study NEW_NAME, or restore the file")
    beat = study.user_attrs.get("cnnlab:heartbeat", heartbeat)
    if beat != heartbeat:  # a worker that beats slower than another expects would be taken for dead
        raise CnnlabError(f"--heartbeat {heartbeat}: study {name} uses --heartbeat {beat}; every worker must use the same")
    return study


def _load_data(space):
    from ..data import load_dataset

    config = space.config({})
    return load_dataset(config.data, seed=config.train.seed, progress=False)


def _work(study, space, trials: int, study_dir: Path, data, threads: int, worker: bool = False) -> str:
    from .worker import run_worker

    prefix = f"[worker {os.getpid()}] " if worker else ""
    return run_worker(study, space, trials, study_dir, data, threads, log=lambda line: print(prefix + line, flush=True))


def _threads_per_worker(workers: int) -> int:
    import torch

    return max(1, torch.get_num_threads() // workers)  # torch starts with one thread per physical core


def _run_worker_processes(space_file: str | Path, trials: int, count: int, storage: str | None, study: str | None,
                          data_root: str | None, study_dir: Path, threads: int, heartbeat: int,
                          limit_per_class: int | None = None) -> str:
    """Start `count` worker processes (`cnnlab tune ... --worker`) and wait for them. Ctrl-C reaches them
    too (same process group): each stops after its training step, fails its trial and queues it again."""
    command = [sys.executable, "-m", "cnnlab", "tune", str(space_file), "--trials", str(trials),
               "--out", str(study_dir), "--threads", str(threads), "--heartbeat", str(heartbeat), "--worker"]
    for flag, value in (("--storage", storage), ("--study", study), ("--data-root", data_root),
                        ("--limit-per-class", limit_per_class)):
        if value:
            command += [flag, str(value)]
    workers = [subprocess.Popen(command) for _ in range(count)]
    interrupted = False

    def forward(signum, frame):  # SIGTERM to this process: pass it on
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for worker in workers:
            while True:
                try:
                    worker.wait()
                    break
                except KeyboardInterrupt:  # the workers got it too; wait for them to stop cleanly
                    interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    for worker in workers:
        if worker.returncode not in (0, 130):
            how = f"signal {-worker.returncode}" if worker.returncode < 0 else f"exit code {worker.returncode}"
            print(f"warning: worker {worker.pid} ended with {how}; its running trial, if any, is re-run by another "
                  "worker once its heartbeat is missed", file=sys.stderr)
    interrupted = interrupted or any(w.returncode == 130 for w in workers)
    return "interrupted" if interrupted else "done"


def _finish(study, space, study_dir: Path, n_trials: int, status: str) -> int:
    from .results import metric_label, write_results
    from .worker import finished_trials

    written = write_results(study, space, study_dir)
    print()
    print(written["table"])
    done = len(finished_trials(study))
    print(f"\n{done} of {n_trials} trials finished. Table: {study_dir / 'trials.md'}; plots: {study_dir / 'history.png'}, "
          f"{study_dir / 'importance.png'}")
    best = written["best"]
    if best is not None:
        print(f"best: trial {best.number}, {metric_label(study)} {100 * best.value:.2f}%; settings in {study_dir / 'best.yaml'} "
              f"(cnnlab train --config {study_dir / 'best.yaml'})")
    if status == "interrupted" or done < n_trials:
        print("stopped before the end; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def _shown_storage(url: str) -> str:
    from .storage import hide_password

    return hide_password(url)
