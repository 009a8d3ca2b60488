"""a self-contained HTML report of a run"""

from __future__ import annotations

import argparse

from .train import DATA_ROOT_HELP

DESCRIPTION = ("Write one self-contained HTML file (pictures inline, no network) telling the story of a run: "
               "configuration, summary table, curves, per-class metrics, confusion matrix, mistakes, filters "
               "and feature maps. Example: cnnlab report runs/20260101-120000-tutorial")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a model .safetensors file)")
    parser.add_argument("--out", metavar="FILE.html", help="where to write the report (default: RUN_DIR/report.html)")
    parser.add_argument("--dataset", help="evaluate on this dataset instead of the run's own (same classes)")
    parser.add_argument("--data-root", help=DATA_ROOT_HELP)
    parser.add_argument("--index", type=int, default=0, help="test image whose feature maps are shown (default 0)")


def run(args: argparse.Namespace) -> int:
    from ..report import write_report

    path = write_report(args.run_dir, args.out, args.dataset, args.data_root, args.index)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, self-contained: open it in any browser)")
    return 0
