"""Where a study lives: a journal file (default) or a database, both with a heartbeat.

Every running trial records a heartbeat every `interval` seconds. A trial whose worker stopped
beating (killed with `kill -9`, its machine lost) for `grace` seconds is failed by the next
worker that looks, and Optuna's retry callback queues its settings again as a new trial.

- Journal file (`STUDY_DIR/journal.log`, Optuna's JournalFileBackend): append-only, locked with
  a symlink, so several processes, or machines sharing the folder (NFS), can use it at once.
  Optuna's journal storage has no heartbeat of its own; `HeartbeatJournalStorage` adds one,
  kept as a trial system attribute, exactly as Optuna's database storage does it.
- A database URL (`postgresql://user:password@host/db`, `sqlite:///study.db`): Optuna's
  RDBStorage with its own heartbeat, for many machines.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..errors import CnnlabError

try:
    from optuna.storages import RetryHeartbeatStaleTrialCallback as RetryCallback
except ImportError:  # Optuna before 4.9 names it RetryFailedTrialCallback
    from optuna.storages import RetryFailedTrialCallback as RetryCallback

JOURNAL_FILE = "journal.log"
HEARTBEAT_KEY = "cnnlab:heartbeat"
MAX_RETRY = 2          # a trial that keeps killing its worker (out of memory, say) is not retried forever


def retry_callback() -> Callable:
    """Queue a failed trial's settings again as a new trial (Optuna's retry callback)."""
    with warnings.catch_warnings():  # Optuna calls it experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryCallback(max_retry=MAX_RETRY)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage plus a heartbeat: the time of each running trial's last beat is a
    system attribute; a running trial without a beat for `grace` seconds is stale."""

    def __init__(self, backend, interval: int, grace: int):
        super().__init__(backend)
        self.interval, self.grace = interval, grace

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial carries its predecessor's last beat: it is alive from its own start.
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            last = max(float(trial.system_attrs.get(HEARTBEAT_KEY, 0.0)), started)
            if now - last > self.grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.interval

    def get_heartbeat_stale_trial_callback(self):
        return retry_callback()

    def get_failed_trial_callback(self):  # the name before Optuna 4.9
        return retry_callback()


def open_storage(url: str | None, study_dir: Path, interval: int) -> optuna.storages.BaseStorage:
    """The study's storage: `url` a database URL or a journal file path; default STUDY_DIR/journal.log."""
    grace = max(3 * interval, interval + 2)
    if url and "://" in url:
        return _database(url, interval, grace)
    path = Path(url).expanduser() if url else study_dir / JOURNAL_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_journal_file(path)
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), interval, grace)
    except OSError as exc:
        raise CnnlabError(f"--storage {path}: cannot open the journal file ({exc.strerror or exc})") from None


def _check_journal_file(path: Path) -> None:
    """A journal must be a regular file this process can read and append to (not /dev/null, a folder
    or a read-only file), in a folder where it can make its lock file; checked before any trial."""
    if path.exists() and not path.is_file():
        raise CnnlabError(f"--storage {path}: not a regular file (a folder, device or pipe); give a journal file path "
                          "or a database URL")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise CnnlabError(f"--storage {path}: the journal file is not writable (permission denied)")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CnnlabError(f"--storage {path}: its folder {path.parent} is not writable (the journal needs a lock file "
                          "beside it)")


def _database(url: str, interval: int, grace: int) -> RDBStorage:
    shown = hide_password(url)
    try:
        with warnings.catch_warnings():  # Optuna calls the heartbeat experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(url, heartbeat_interval=interval, grace_period=grace,
                                  heartbeat_stale_trial_callback=retry_callback())
            except TypeError:  # Optuna before 4.9
                return RDBStorage(url, heartbeat_interval=interval, grace_period=grace,
                                  failed_trial_callback=retry_callback())
    except ImportError:  # SQLAlchemy found no driver for the URL's database
        raise CnnlabError(f"--storage {shown}: no Python driver for this database is installed (PostgreSQL: "
                          "pip install 'psycopg[binary]' for postgresql://, or psycopg2-binary for "
                          "postgresql+psycopg2://)") from None
    except Exception as exc:  # SQLAlchemy's errors for a bad URL, a refused connection, bad credentials
        message = " ".join(str(exc).split())
        message = message.replace(url, shown)
        raise CnnlabError(f"--storage {shown}: cannot open the database ({message[:200]})") from None


def hide_password(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
