"""runs side by side: differing settings, final metrics, times; curves overlaid (--html)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import CnnlabError

DESCRIPTION = ("Compare training runs: the settings that differ between them, their final metrics and times. "
               "Examples: cnnlab compare runs/a runs/b   |   cnnlab compare 'runs/*-tutorial' --html compare.html")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders or glob patterns (quote them: 'runs/*')")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with the curves overlaid")


def run(args: argparse.Namespace) -> int:
    from ..comparison import comparison, read_runs, table, write_html

    runs = read_runs(args.runs)
    if args.html:
        if Path(args.html).suffix.lower() not in (".html", ".htm"):
            raise CnnlabError(f"--html {Path(args.html).expanduser()}: the page is HTML; use a .html file name")
        write_html(runs, args.html)
    if args.json:
        print(json.dumps(comparison(runs), indent=2, allow_nan=False, default=str))
    else:
        print(table(runs))
        if args.html:
            print(f"wrote {args.html}")
    return 0
