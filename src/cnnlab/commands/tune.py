"""hyper-parameter search with Optuna over a SPACE.yaml; several processes or machines"""

from __future__ import annotations

import argparse

from .train import DATA_ROOT_HELP, LIMIT_HELP

DESCRIPTION = ("Search hyper-parameters with Optuna (TPE, median pruning on each epoch's test accuracy). Every trial "
               "is a run folder under the study folder; the storage is a journal file there (several processes or "
               "machines sharing the folder can work on one study) or a database URL. Ends with a table of trials, "
               "history and importance plots and best.yaml. "
               "Example: cnnlab tune space.yaml --trials 20 --workers 2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..tuning import HEARTBEAT_SECONDS

    parser.add_argument("space", metavar="SPACE.yaml", help="base preset or config, fixed settings and the search space")
    parser.add_argument("--trials", type=int, required=True, metavar="N",
                        help="finished (complete or pruned) trials the study should hold; every worker counts the same N")
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="worker processes on this machine (default 1)")
    parser.add_argument("--storage", metavar="URL",
                        help="a database URL (postgresql://user:password@host/db) or a journal file "
                             "(default: STUDY_DIR/journal.log)")
    parser.add_argument("--study", metavar="NAME", help="the study's name (default: the SPACE file's name)")
    parser.add_argument("--out", metavar="STUDY_DIR", help="the study folder (default: runs/NAME)")
    parser.add_argument("--data-root", help=DATA_ROOT_HELP.replace("(", "on this machine (", 1))
    parser.add_argument("--limit-per-class", type=int, metavar="N", help=LIMIT_HELP)
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: this machine's cores shared among its workers)")
    parser.add_argument("--heartbeat", type=int, default=HEARTBEAT_SECONDS, metavar="SECONDS",
                        help=f"how often a running trial says it is alive (default {HEARTBEAT_SECONDS}); "
                             "one silent for 3 beats is re-run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process started by --workers


def run(args: argparse.Namespace) -> int:
    from ..tuning import tune

    return tune(args.space, args.trials, args.workers, args.storage, args.study, args.out, args.data_root, args.threads,
                args.heartbeat, args.worker, args.limit_per_class)
