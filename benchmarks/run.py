#!/usr/bin/env python3
"""The side-by-side benchmark: the tutorial's recipe and cnnlab's presets, each in its own process.

    python benchmarks/run.py                      # tutorial baseline + fast + default + inference (~3 min)
    python benchmarks/run.py --presets all --seeds 3   # everything, as the issue measures it (~1.5 h)
    python benchmarks/run.py --quick              # a few steps of each: checks that it all runs

The same as `cnnlab bench`; the code lives in src/cnnlab/bench.py so an installed cnnlab has it
too. Results: benchmarks/results/<machine>-<date>.{md,json}. What was tried and why: NOTES.md.
"""

import sys
from pathlib import Path

try:
    from cnnlab.bench import add_arguments, run
except ImportError:  # run from a checkout without installing: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from cnnlab.bench import add_arguments, run


def main(argv=None) -> int:
    import argparse

    from cnnlab.errors import CnnlabError

    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(out=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
