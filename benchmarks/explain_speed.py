#!/usr/bin/env python3
"""How long one explanation takes: `cnnlab.explain.explain` on one image, per method.

    python benchmarks/explain_speed.py runs/<default MNIST run>            # 50 timed rounds per method
    python benchmarks/explain_speed.py runs/<run> --rounds 200 --machine my-laptop

Each round explains one test image of the model's dataset (a different one each round) as the
CLI, the API and the page do: uint8 input -> attribution map at the input size, and for the page
the transparent overlay PNG. The first rounds (warm-up: imports, allocator) are not timed.
Results: benchmarks/results/explain-speed-<machine>-<date>.{md,json}. Other work on the machine
slows every number down: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
if (SOURCE / "cnnlab").is_dir():  # in a checkout: measure its code, not another installed copy
    sys.path.insert(0, str(SOURCE))

import torch  # noqa: E402

from cnnlab.runs import open_run  # noqa: E402
from cnnlab.explain import METHODS, explain, overlay_png  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_method(bundle, images: torch.Tensor, method: str, rounds: int, warmup: int) -> dict:
    """Milliseconds per image for `explain` alone (wall clock and this process's CPU time) and with
    the overlay PNG, over `rounds` images."""
    explain_ms, cpu_ms, overlay_ms = [], [], []
    for i in range(warmup + rounds):
        image = images[i % images.shape[0]]
        start, cpu_start = time.perf_counter(), time.process_time()
        result = explain(bundle, image, method)
        middle, cpu_end = time.perf_counter(), time.process_time()
        overlay_png(result.maps[0], result.signed)
        end = time.perf_counter()
        if i >= warmup:
            explain_ms.append(1000 * (middle - start))
            cpu_ms.append(1000 * (cpu_end - cpu_start))
            overlay_ms.append(1000 * (end - start))
    return {"method": method, "threads": torch.get_num_threads(), "rounds": rounds,
            "median_ms": statistics.median(explain_ms), "p90_ms": _quantile(explain_ms, 0.9),
            "cpu_median_ms": statistics.median(cpu_ms),
            "with_overlay_median_ms": statistics.median(overlay_ms), "with_overlay_p90_ms": _quantile(overlay_ms, 0.9)}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Explanation speed: {results['model']}", "",
             f"{m['cpu']}, {m['cores']} logical cores, "
             f"load average {m['load_average_start']:.2f} at the start and {m['load_average_end']:.2f} at the end; "
             f"{results['date']}; `python benchmarks/explain_speed.py {results['command']}`.", "",
             f"One image per call (batch 1), input {results['input_shape']}, {results['rounds']} timed rounds after "
             f"{results['warmup']} untimed ones; milliseconds. Wall clock: what a user waits; CPU: the time this "
             "process computed (threads added up), which other work on the machine does not inflate much.", "",
             "| method | torch threads | wall median | wall p90 | CPU median | with the overlay PNG: wall median | p90 |",
             "|---|---|---|---|---|---|---|"]
    for row in results["methods"]:
        lines.append(f"| {row['method']} | {row['threads']} | {row['median_ms']:.1f} | {row['p90_ms']:.1f} | "
                     f"{row['cpu_median_ms']:.1f} | {row['with_overlay_median_ms']:.1f} | {row['with_overlay_p90_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a run folder or model file (the default MNIST preset for the issue's target)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all four)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", default="default,1",
                        help="torch thread counts to measure, comma-separated ('default': torch's own choice)")
    parser.add_argument("--machine", default=platform.node() or "machine", help="name used in the file names")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results")
    args = parser.parse_args(argv)

    bundle = open_run(args.model)
    images = bundle.load_test_data().test.images[:args.warmup + args.rounds]
    load_start = os.getloadavg()[0]
    rows = []
    default_threads = torch.get_num_threads()
    for threads in args.threads.split(","):
        torch.set_num_threads(default_threads if threads == "default" else int(threads))
        for method in args.methods.split(","):
            rows.append(time_method(bundle, images, method, args.rounds, args.warmup))
            print(f"{method:22s} threads {torch.get_num_threads()}  median {rows[-1]['median_ms']:7.1f} ms   "
                  f"p90 {rows[-1]['p90_ms']:7.1f} ms   CPU {rows[-1]['cpu_median_ms']:6.1f} ms", flush=True)
    results = {"model": str(args.model), "input_shape": "x".join(map(str, bundle.input_shape)), "rounds": args.rounds,
               "warmup": args.warmup, "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
               "command": " ".join(sys.argv[1:] if argv is None else argv),
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                           "load_average_start": load_start, "load_average_end": os.getloadavg()[0]},
               "versions": {"torch": torch.__version__, "captum": _version("captum")},
               "methods": rows}
    write_results(results, markdown(results), Path(args.out), f"explain-speed-{args.machine}")
    return 0


def write_results(results: dict, page: str, out: Path, name: str) -> None:
    """results as out/<name>-<date>.json and the Markdown page beside it (shared with explain_sanity.py)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{datetime.now().strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(page)
    print(f"wrote {stem}.md and .json")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
