"""run the side-by-side training/inference benchmark (benchmarks/run.py of a checkout)

The benchmark lives beside the package in the checkout's `benchmarks/run.py` (the tutorial's
recipe is a baseline to measure against, not part of cnnlab).

This command finds that file next to the source tree this cnnlab runs from (an editable install or
a checkout) or in the current folder, and runs it with the same arguments: `cnnlab bench ...` is
`python benchmarks/run.py ...`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from ..errors import CnnlabError

DESCRIPTION = ("Run the side-by-side training/inference benchmark (benchmarks/run.py of a cnnlab checkout): "
               "the tutorial's recipe and cnnlab's presets, each in its own process. Example: cnnlab bench --quick")


def benchmark_script() -> Path | None:
    """benchmarks/run.py of the checkout this cnnlab runs from, else of the current folder, else None."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):  # src/cnnlab/commands/bench.py
        if (root / "benchmarks" / "run.py").is_file():
            return root / "benchmarks" / "run.py"
    return None


def _benchmark_module() -> ModuleType | None:
    script = benchmark_script()
    if script is None:
        return None
    root = str(script.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # the checkout's `benchmarks` package
    return importlib.import_module("benchmarks.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    module = _benchmark_module()
    if module is not None:
        module.add_arguments(parser)
    else:
        parser.description = f"{DESCRIPTION}\n\nNo benchmarks/run.py was found: run this from a cnnlab checkout."


def run(args: argparse.Namespace) -> int:
    module = _benchmark_module()
    if module is None:
        raise CnnlabError("the benchmark is benchmarks/run.py of a cnnlab checkout, and none was found beside this "
                          "installation or in the current folder; run it from a checkout (make bench)")
    return module.run(args)
