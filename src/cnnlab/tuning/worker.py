"""A tune worker: it takes trials from the study, trains each as an ordinary run, until the study
holds N finished (complete or pruned) trials.

Many workers share one study, in one process each, on one machine or several. They agree on N
without a lock of their own: a worker starts a new trial only while finished + running trials are
fewer than N (or when a failed trial's re-run is waiting), and a trial that started anyway in a
race gives way to the trials numbered before it ("surplus": marked and failed at once, before any
training, and left out of every count and table). A running trial whose worker died is found
stale by its missing heartbeat (storage.py), failed, and queued again; the workers that are waiting
for the last trials take it.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..errors import CnnlabError
from ..runtime import StopRequest
from .storage import retry_callback

SURPLUS_KEY = "cnnlab:surplus"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 1.0


def is_surplus(trial) -> bool:
    return bool(trial.system_attrs.get(SURPLUS_KEY))


def finished_trials(study) -> list:
    """The trials that count towards N: complete or pruned."""
    return [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]


def run_worker(study, space, n_trials: int, study_dir: Path, data, threads: int, log=print) -> str:
    """Run trials until the study has `n_trials` finished ones; returns "done" or "interrupted".

    The first SIGINT/SIGTERM (`runtime.StopRequest`, which nests: a stop during a trial's training,
    evaluation or save reaches this loop too) ends the worker once the running trial has stopped
    and been told to the study; no trial starts after it. A second one ends it at once (the running
    trial is failed and queued again)."""
    announced_wait = False
    with StopRequest("stopping after the running trial stops (Ctrl-C again to abort) ...") as stop:
        while not stop.requested:
            _fail_stale_trials(study)
            trials = [t for t in study.get_trials(deepcopy=False) if not is_surplus(t)]
            done = sum(t.state in FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if done >= n_trials:
                return "done"
            if not waiting and done + running >= n_trials:
                if not announced_wait:
                    log(f"waiting for the last {running} running trial(s) of other workers "
                        "(a worker that died leaves its trial to be re-run here)")
                    announced_wait = True
                time.sleep(POLL_SECONDS)
                continue
            announced_wait = False
            if stop.requested:  # checked once more just before a trial is made: none starts after a stop
                break
            with warnings.catch_warnings():  # we run the heartbeat ourselves (run_trial), as Study.optimize would
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                trial = study.ask()
            if _gives_way(study, trial, n_trials):
                study._storage.set_trial_system_attr(trial._trial_id, SURPLUS_KEY, True)
                study.tell(trial, state=TrialState.FAIL)
                continue
            if run_trial(study, trial, space, study_dir, data, threads, log) == "interrupted" or stop.requested:
                return "interrupted"
    return "interrupted"


def _fail_stale_trials(study) -> None:
    with warnings.catch_warnings():  # Optuna marks fail_stale_trials experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _gives_way(study, trial, n_trials: int) -> bool:
    """True if `n_trials` trials numbered before this one already hold the study's places."""
    ahead = [t for t in study.get_trials(deepcopy=False)
             if t.number < trial.number and not is_surplus(t)
             and t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)]
    return len(ahead) >= n_trials


def run_trial(study, trial, space, study_dir: Path, data, threads: int, log=print) -> str:
    """Train one trial as a run folder STUDY_DIR/trial-NNNN; tell the study how it ended.

    Returns "complete", "pruned" or "interrupted" (Ctrl-C / SIGTERM: the trial is failed and its
    settings queued again, so running the same command again continues with them)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    from ..training import fit

    values = space.suggest(trial)
    config = space.config(values)
    searched_or_fixed = set(space.settings) | {p.name for p in space.params}
    if "train.threads" not in searched_or_fixed:
        config.train.threads = threads  # the cores shared among this machine's workers
    if "train.eval_every" not in searched_or_fixed:
        config.train.eval_every = 1  # every epoch's accuracy feeds the pruner
    run_dir = study_dir / f"trial-{trial.number:04d}"
    for key, value in (("run_dir", str(run_dir)), ("host", socket.gethostname()), ("pid", os.getpid())):
        trial.set_user_attr(key, value)
    rerun = study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
    shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
    log(f"trial {trial.number} started: {shown}" + (f" (a re-run of trial {rerun})" if rerun is not None else ""))

    metric = study.user_attrs.get("cnnlab:metric", "test_accuracy")
    label = "validation accuracy" if metric == "val_accuracy" else "test accuracy"
    scores: list[float] = []

    def on_epoch(metrics: dict[str, Any]) -> None:
        if metric in metrics:
            scores.append(metrics[metric])
            trial.report(metrics[metric], int(metrics["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"stopped after epoch {metrics['epoch']} by the pruner ({label} "
                                         f"{100 * metrics[metric]:.2f}%, below the median of earlier trials)")

    started = time.perf_counter()
    state, value, note = TrialState.FAIL, None, ""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            result = fit(config, run_dir, progress=False, data=data, on_epoch=on_epoch,
                         log=lambda line: log(f"[trial {trial.number}] {line}"))
            # with validation, the run keeps its best epoch by it: the trial is worth that epoch's score
            final = max(scores) if metric == "val_accuracy" and scores else result["metrics"].get(metric, float("nan"))
            state, value = TrialState.COMPLETE, float(final)
        except optuna.TrialPruned as exc:
            state, note = TrialState.PRUNED, str(exc)
        except CnnlabError as exc:
            if exc.exit_code in (130, 143):  # stopped by a signal: not the settings' fault
                note = "interrupted"
            else:  # diverged, or settings that do not fit together: a bad point of the space
                state, note = TrialState.PRUNED, f"error: {exc}"
        except BaseException:
            _tell_failed(study, trial, "crashed", time.perf_counter() - started)
            raise
    seconds = time.perf_counter() - started
    trial.set_user_attr("seconds", round(seconds, 2))
    if note:
        trial.set_user_attr("note", note)
    if state == TrialState.FAIL:
        _tell_failed(study, trial, note, seconds)
        log(f"trial {trial.number} interrupted after {seconds:.1f}s; its settings are queued again")
        return "interrupted"
    if state == TrialState.COMPLETE and value == value:
        study.tell(trial, value)
        log(f"trial {trial.number} finished: {label} {100 * value:.2f}% in {seconds:.1f}s")
        return "complete"
    study.tell(trial, state=TrialState.PRUNED)
    log(f"trial {trial.number} pruned after {seconds:.1f}s: {note}")
    return "pruned"


def _tell_failed(study, trial, note: str, seconds: float) -> None:
    trial.set_user_attr("note", note)
    trial.set_user_attr("seconds", round(seconds, 2))
    frozen = study.tell(trial, state=TrialState.FAIL)
    retry_callback()(study, frozen)  # queue its settings again, as for a worker that died


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
