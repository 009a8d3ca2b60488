#!/usr/bin/env python3
"""What TensorBoard logging costs a training run: `cnnlab train --preset fast` with and without it.

    python benchmarks/tensorboard_cost.py               # 3 runs each way, alternating (~1-2 min on a quiet CPU)
    python benchmarks/tensorboard_cost.py --repeats 5

Two measurements, because the difference is small next to the run-to-run noise of a whole process:
1. whole processes, alternating with and without `--no-tensorboard`: median wall time and CPU time;
2. inside one process: the time the training thread spends in the logger (waiting for the
   import of torch.utils.tensorboard that fit() starts in a background thread, creating the
   writer, every step/epoch/finish/close call), against that run's wall time; and, in another
   process, how long that import takes by itself (CPU the background thread uses while the data
   loads). The writer's own thread is not in (2); it is in the CPU time of (1).

The target (issue 15): at most 2% of `fast`'s wall time. Results:
benchmarks/results/tensorboard-cost-<machine>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cnnlab_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def whole_process(tensorboard: bool, out: Path) -> dict[str, float]:
    """One `cnnlab train --preset fast` process: wall and CPU seconds, test accuracy."""
    command = [sys.executable, "-m", "cnnlab", "train", "--preset", "fast", "--no-progress", "--out", str(out)]
    if not tensorboard:
        command.append("--no-tensorboard")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=_cnnlab_env())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"cnnlab train failed:\n{result.stderr}")
    if tensorboard != (out / "tb").is_dir():
        raise SystemExit(f"{out}: tb/ {'missing' if tensorboard else 'written with --no-tensorboard'}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_seconds": wall, "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "test_accuracy": history[-1]["test_accuracy"]}


def inside_one_process(out: Path) -> dict[str, float]:
    """Time spent in the logger during one `fast` run in this process (a fresh child, so the import is cold)."""
    code = r"""
import json, sys, time
start = time.perf_counter()
from cnnlab.config import resolve_config
from cnnlab.training import fit
import cnnlab.tensorboard_log as tb
import contextlib
import cnnlab.training as train
spent = {"open": 0.0, "step": 0.0, "epoch": 0.0, "finish": 0.0, "close": 0.0}
calls = {"step": 0}
opener = train.tensorboard_log
@contextlib.contextmanager
def timed_open(*a, **k):  # the wait for the import started in the background, and the writer
    t = time.perf_counter()
    manager = opener(*a, **k)
    logger = manager.__enter__()
    spent["open"] += time.perf_counter() - t
    try:
        yield logger
    finally:
        manager.__exit__(None, None, None)
train.tensorboard_log = timed_open
def timed(name, method):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return method(*a, **k)
        finally:
            spent[name] += time.perf_counter() - t
            calls[name] = calls.get(name, 0) + 1
    return wrapper
for name in ("step", "epoch", "finish", "close"):
    setattr(tb.TensorBoardLog, name, timed(name, getattr(tb.TensorBoardLog, name)))
fit_start = time.perf_counter()
result = fit(resolve_config("fast"), sys.argv[1], progress=False, log=lambda *_: None)
end = time.perf_counter()
print(json.dumps({"logger_seconds": sum(spent.values()), "parts": spent, "steps": calls["step"],
                  "fit_seconds": end - fit_start, "process_seconds": end - start,
                  "test_accuracy": result["metrics"]["test_accuracy"]}))
"""
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=_cnnlab_env())
    if result.returncode != 0:
        raise SystemExit(f"in-process measurement failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cold_import_seconds() -> float:
    """How long `import torch.utils.tensorboard` takes in a fresh process that has torch loaded."""
    code = ("import time, torch; t = time.perf_counter(); import torch.utils.tensorboard; "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes each way (default 3)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    args = parser.parse_args(argv)

    started, load_before = datetime.now(timezone.utc), load_average()
    runs: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="cnnlab-tb-cost-") as tmp:
        for i in range(args.repeats):  # alternating, so that a change in the machine's load hits both alike
            for mode in (("without", "with") if i % 2 else ("with", "without")):
                row = whole_process(mode == "with", Path(tmp) / f"{mode}-{i}")
                runs[mode].append(row)
                print(f"{mode:>7} tensorboard: {row['wall_seconds']:.2f} s wall, {row['cpu_seconds']:.2f} s CPU, "
                      f"{100 * row['test_accuracy']:.2f}%", flush=True)
        inside = [inside_one_process(Path(tmp) / f"inside-{i}") for i in range(args.repeats)]
        imports = [cold_import_seconds() for _ in range(args.repeats)]
    load_after = load_average()

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    wall_with, wall_without = median("with", "wall_seconds"), median("without", "wall_seconds")
    cpu_with, cpu_without = median("with", "cpu_seconds"), median("without", "cpu_seconds")
    logger = statistics.median(r["logger_seconds"] for r in inside)
    fit_wall = statistics.median(r["fit_seconds"] for r in inside)
    parts = {k: statistics.median(r["parts"][k] for r in inside) for k in inside[0]["parts"]}
    results = {
        "machine": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "started": started.isoformat(timespec="seconds"), "load_before": load_before, "load_after": load_after,
        "repeats": args.repeats, "runs": runs, "inside": inside,
        "median_wall_with": wall_with, "median_wall_without": wall_without,
        "wall_difference_percent": 100 * (wall_with - wall_without) / wall_without,
        "median_cpu_with": cpu_with, "median_cpu_without": cpu_without,
        "cpu_difference_percent": 100 * (cpu_with - cpu_without) / cpu_without,
        "logger_seconds": logger, "logger_percent_of_fast_wall": 100 * logger / wall_without,
        "logger_parts": parts, "background_import_seconds": statistics.median(imports),
    }
    steps = inside[0]["steps"]
    text = f"""# TensorBoard logging cost — {platform.node()}, {started:%Y-%m-%d}

`python benchmarks/tensorboard_cost.py --repeats {args.repeats}`; `cnnlab train --preset fast` ({steps} steps, 1 epoch),
{os.cpu_count()} CPUs, Python {platform.python_version()}. Load average before {load_before}, after {load_after}
(above 0: other work shared the CPU).

## Whole processes, alternating (median of {args.repeats} each)

| | wall | CPU (user+sys) | test acc |
|---|---|---|---|
| with TensorBoard | {wall_with:.2f} s | {cpu_with:.2f} s | {100 * median('with', 'test_accuracy'):.2f}% |
| `--no-tensorboard` | {wall_without:.2f} s | {cpu_without:.2f} s | {100 * median('without', 'test_accuracy'):.2f}% |
| difference | {wall_with - wall_without:+.2f} s ({results['wall_difference_percent']:+.1f}%) | {cpu_with - cpu_without:+.2f} s ({results['cpu_difference_percent']:+.1f}%) | |

Every run: """ + ", ".join(f"{m} {r['wall_seconds']:.2f} s" for m in ("with", "without") for r in runs[m]) + f"""

## Inside one process (median of {args.repeats}): time spent in the logger

| opening (import wait + writer) | {steps} x step | epoch | finish (HParams, 2 pictures) | close | total | % of `fast`'s wall ({wall_without:.2f} s) |
|---|---|---|---|---|---|---|
| {1000 * parts['open']:.0f} ms | {1000 * parts['step']:.0f} ms | {1000 * parts['epoch']:.0f} ms | {1000 * parts['finish']:.0f} ms | {1000 * parts['close']:.0f} ms | {1000 * logger:.0f} ms | {results['logger_percent_of_fast_wall']:.2f}% |

fit() itself took {fit_wall:.2f} s in those runs. The import of torch.utils.tensorboard, which fit() starts in a
background thread while the data loads, takes {1000 * results['background_import_seconds']:.0f} ms by itself (median of
{args.repeats} fresh processes): CPU time the training thread does not wait for unless the data loads faster.
Target: at most 2% of `fast`'s wall time.
"""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tensorboard-cost-{platform.node()}-{started:%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
