#!/usr/bin/env python3
"""The side-by-side benchmark: the tutorial's recipe and cnnlab's presets, each in its own process.

    python benchmarks/run.py                      # tutorial baseline + fast + default + inference (~3 min)
    python benchmarks/run.py --presets all --seeds 3   # everything, as the issue measures it (~1.5 h)
    python benchmarks/run.py --quick              # a few steps of each: checks that it all runs

`make bench` and `cnnlab bench` (in a checkout) run this file. Results:
benchmarks/results/<machine>-<date>.{md,json,png} (the PNG: accuracy against seconds for every run).
What was tried and why: NOTES.md.

What runs, in this order, on the same machine in one go:

1. the machine: CPU, cores, load average (other work on the machine slows every number down),
   and its measured fp32 matrix-product rate — the ceiling that achieved GFLOP/s are compared to;
2. (a) the tutorial's recipe as it describes it (`tutorial_baseline.py`);
3. (b) each cnnlab preset through `cnnlab train`, exactly as a user would type it;
4. inference on the `default` preset's model (`inference.py`): images/s at batch 1024 and the
   latency of one image, for eager PyTorch, torch.compile and ONNX Runtime.

Times are wall-clock seconds from the moment the process was started, so interpreter start-up,
imports and data loading count. "Time to X%" pauses the clock while the tutorial baseline is
evaluated (it is evaluated several times per epoch to find the moment); cnnlab presets are
evaluated when their schedule ends, so for them it is the time of the first evaluation at or
above X%. The Markdown page is written by `report.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # `python benchmarks/run.py`: this checkout's `benchmarks`, and its cnnlab if none is installed
    sys.path.insert(0, str(HERE.parent))
    if importlib.util.find_spec("cnnlab") is None:
        sys.path.insert(0, str(HERE.parent / "src"))

from benchmarks.inference import forward_flops  # noqa: E402
from benchmarks.report import markdown, row_summary, time_to_accuracy_png  # noqa: E402
from cnnlab.data.mnist import data_root  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402
from cnnlab.layers import build_model, parse_layers  # noqa: E402
from cnnlab.presets import PRESETS, get_preset  # noqa: E402

TARGETS = (0.85, 0.9806, 0.99)  # the CIFAR-10 target; the tutorial's published figure; the usual "99% on MNIST" mark
MNIST_PRESETS = ("fast", "default", "best", "resnet-mnist")
ALL_PRESETS = ("fast", "default", "best", "resnet-mnist", "cifar-fast", "resnet32", "cifar-gpu")
# The presets that train on colour image folders: they get the CIFAR-10 folder and their own table.
CIFAR_PRESETS = tuple(name for name in ALL_PRESETS if PRESETS[name].get("colour_folders"))
# --quick: a tiny budget that only shows the pipeline works (tests use it), not a measurement.
QUICK_EPOCHS = 0.02
QUICK_TUTORIAL_EPOCHS = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="fast,default",
                        help="comma-separated cnnlab presets to run (fast, default, best, resnet-mnist, cifar-fast, resnet32, "
                             "cifar-gpu; 'all' for "
                             "every one; 'none' for only the tutorial baseline). On a 2-core CPU best and cifar-fast "
                             "take ~4 min each, cifar-gpu ~12 min")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per preset; the table shows the median (default 1)")
    parser.add_argument("--tutorial-epochs", type=float, default=2, help="epochs of the tutorial baseline (default 2)")
    parser.add_argument("--no-tutorial", action="store_true", help="skip the tutorial baseline")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference measurements")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny budget (a few steps of each) to check that everything runs; numbers mean nothing")
    parser.add_argument("--cifar", default=os.environ.get("CNNLAB_CIFAR10", "/tmp/cifar10"),
                        help="CIFAR-10 image folder for the cifar presets (train/ and test/ inside; default $CNNLAB_CIFAR10 "
                             "or /tmp/cifar10)")
    parser.add_argument("--data-root", help="folder holding MNIST/raw (default: $CNNLAB_DATA, else ~/.cache/cnnlab)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the results (default benchmarks/results)")
    parser.add_argument("--machine", help="machine name used in the file names (default: the host name)")
    parser.add_argument("--keep-runs", metavar="DIR",
                        help="keep the trained runs in DIR/<preset>-<seed> (default: a temporary folder, removed at the end)")


def run(args: argparse.Namespace) -> int:
    presets = parse_presets(args.presets)
    if args.seeds < 1:
        raise CnnlabError(f"--seeds: expected at least 1, got {args.seeds}")
    if set(presets) & set(CIFAR_PRESETS) and not (Path(args.cifar) / "train").is_dir():
        raise CnnlabError(f"the cifar presets need the CIFAR-10 folders: {args.cifar}/train not found "
                          "(unpack cifar10-jpg.tar.gz there or pass --cifar)")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    # The children inherit this environment unchanged: what a user typing the commands gets. On a busy
    # machine OMP_WAIT_POLICY=PASSIVE helps a lot, on a quiet one it costs ~20% (benchmarks/NOTES.md).
    env = dict(os.environ)
    if args.data_root:
        env["CNNLAB_DATA"] = args.data_root

    print("measuring the machine ...", flush=True)
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "started": _now(), "runs": []}
    ceiling = results["machine"]["matmul_gflops"]
    print(f"  {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"matmul {ceiling:.0f} GFLOP/s, load average {results['machine']['load_average'][0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as temporary:
        scratch = args.keep_runs or temporary  # kept runs can be inspected, explained or served afterwards
        if not args.no_tutorial:
            epochs = QUICK_TUTORIAL_EPOCHS if args.quick else args.tutorial_epochs
            print(f"tutorial baseline, {epochs:g} epoch(s) ...", flush=True)
            row = run_tutorial(epochs, env, ceiling)
            results["runs"].append(row)
            print("  " + row_summary(row), flush=True)
        default_model = None
        for preset in presets:
            seeds = []
            for seed in range(args.seeds):
                print(f"cnnlab train --preset {preset} --seed {seed} ...", flush=True)
                run_dir = Path(scratch) / f"{preset}-{seed}"
                row = run_preset(preset, seed, run_dir, env, ceiling, args.quick, args.cifar)
                seeds.append(row)
                print("  " + row_summary(row), flush=True)
                if preset == "default" and seed == 0 and row.get("ok"):
                    default_model = run_dir
            results["runs"].append(_median_row(preset, seeds))
        if not args.no_inference:
            if default_model is None:  # inference is measured on the default model: train a short one
                print("inference needs a default model: training one briefly ...", flush=True)
                default_model = Path(scratch) / "default-inference"
                run_preset("default", 0, default_model, env, ceiling, True, args.cifar)
            print("inference (eager, torch.compile, ONNX Runtime) ...", flush=True)
            results["inference"] = run_inference(default_model, env, ceiling, args.quick)
            for row in results["inference"].get("runtimes", []):
                print(f"  {row['runtime']}: " + (row.get("error") or
                      f"{row['images_per_second']:,.0f} img/s at batch 1024, {row['latency_ms']:.2f} ms at batch 1"),
                      flush=True)
    results["finished"] = _now()
    results["machine"]["load_average_end"] = list(os.getloadavg())
    stem = f"{_safe_name(args.machine or platform.node() or 'machine')}-{datetime.now().strftime('%Y-%m-%d')}"
    if args.quick:
        stem += "-quick"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    chart = time_to_accuracy_png({**results, "runs": [r for r in results["runs"] if r.get("kind") == "tutorial"
                                                      or r.get("preset") not in CIFAR_PRESETS]})
    if chart:
        (out / f"{stem}.png").write_bytes(chart)
    print(f"\n{markdown(results)}\nwritten: {out / stem}.json, .md" + (" and .png (time to accuracy)" if chart else ""))
    return 0


def parse_presets(text: str) -> list[str]:
    """`--presets`: preset names, `all` or `none`; an unknown name is a one-line error."""
    if text.strip() == "all":
        return list(ALL_PRESETS)
    if text.strip() in ("", "none"):
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_PRESETS]
    if unknown:
        raise CnnlabError(f"--presets: unknown preset {unknown[0]!r} (choose from {', '.join(ALL_PRESETS)}, or all)")
    return names


# --- the machine --------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb,
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            # `cnnlab train` picks a CUDA GPU when there is one; the tutorial baseline always runs on the CPU
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "not set"),
            "matmul_gflops": round(matmul_gflops(), 1)}


def matmul_gflops(size: int = 2048, seconds: float = 1.0) -> float:
    """Best fp32 matrix-product rate of a few timed rounds: the machine's practical ceiling."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


# --- (a) the tutorial's recipe -------------------------------------------------------------------

def run_tutorial(epochs: float, env: dict[str, str], ceiling: float) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "tutorial_baseline.py"), "--epochs", str(epochs),
               "--root", str(data_root(env.get("CNNLAB_DATA")))]
    lines, info = _run_child(command, env)
    evals = [json.loads(line[len("EVAL "):]) for line in lines if line.startswith("EVAL ")]
    done = next((json.loads(line[len("DONE "):]) for line in lines if line.startswith("DONE ")), None)
    row: dict[str, Any] = {"name": "tutorial recipe (DataLoader, batch 100, Adam)", "kind": "tutorial",
                           "command": f"benchmarks/tutorial_baseline.py --epochs {epochs:g}", **info}
    if done is None:
        row["ok"] = False
        return row
    row.update(ok=True, epochs=epochs, test_accuracy=evals[-1]["test_accuracy"] if evals else None,
               images_per_second=done["images_per_second"], curve=evals)
    for target in TARGETS:
        hit = next((e for e in evals if e["test_accuracy"] >= target), None)
        row[f"seconds_to_{target:.4f}"] = round(hit["seconds"], 2) if hit else None
    flops = forward_flops(build_model(parse_layers(get_preset("tutorial")["model"]), (1, 28, 28), 10), (1, 28, 28))
    _add_rates(row, flops, ceiling)
    return row


# --- (b) cnnlab presets --------------------------------------------------------------------------

def run_preset(preset: str, seed: int, run_dir: Path, env: dict[str, str], ceiling: float, quick: bool,
               cifar: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "cnnlab", "train", "--preset", preset, "--seed", str(seed),
               "--no-progress", "--out", str(run_dir)]
    if preset in CIFAR_PRESETS:
        command += ["--dataset", f"folder:{cifar}"]
    if quick:
        command += ["--epochs", str(QUICK_EPOCHS)]
    lines, info = _run_child(command, env)
    row: dict[str, Any] = {"name": f"cnnlab {preset}", "kind": "preset", "preset": preset, "seed": seed,
                           "command": "cnnlab " + " ".join(command[3:-2]), **info}
    history_path = run_dir / "metrics.jsonl"
    if info["returncode"] != 0 or not history_path.exists():
        row["ok"] = False
        return row
    history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    last = history[-1]
    # Each epoch's elapsed_seconds counts from the start of fit(); the process started earlier by
    # (wall - the last epoch's elapsed), which every epoch shares.
    offset = info["wall_seconds"] - last["elapsed_seconds"]
    row.update(ok=True, epochs=last["epoch"], test_accuracy=last.get("test_accuracy"),
               images_per_second=round(statistics.fmean(m["images_per_second"] for m in history), 1),
               curve=[{"epoch": m["epoch"], "test_accuracy": m.get("test_accuracy"),
                       "seconds": round(offset + m["elapsed_seconds"], 2)} for m in history])
    for target in TARGETS:
        hit = next((m for m in row["curve"] if (m["test_accuracy"] or 0) >= target), None)
        row[f"seconds_to_{target:.4f}"] = hit["seconds"] if hit else None
    config = json.loads((run_dir / "config.json").read_text())
    row["precision"] = config["train"].get("precision", "auto")
    shape = (3, 32, 32) if preset in CIFAR_PRESETS else (1, 28, 28)
    _add_rates(row, forward_flops(build_model(parse_layers(config["model"]), shape, 10), shape), ceiling)
    return row


def _add_rates(row: dict[str, Any], flops: int, ceiling: float) -> None:
    # Training costs about three forward passes: forward, and backward for inputs and for weights.
    row["forward_mflop_per_image"] = round(flops / 1e6, 2)
    achieved = 3 * flops * row["images_per_second"] / 1e9
    row["train_gflops"] = round(achieved, 1)
    row["train_gflops_of_matmul"] = round(achieved / ceiling, 3) if ceiling else None


def _median_row(preset: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per preset: the median over seeds of every number, the seeds themselves kept."""
    if len(seeds) == 1:
        return seeds[0]
    good = [s for s in seeds if s.get("ok")]
    row = {**seeds[0], "seed": "median", "ok": len(good) == len(seeds), "seeds": seeds}
    for key in ("wall_seconds", "cpu_seconds", "peak_rss_mb", "test_accuracy", "images_per_second", "train_gflops",
                "train_gflops_of_matmul", *(f"seconds_to_{t:.4f}" for t in TARGETS)):
        values = [s[key] for s in good if s.get(key) is not None]
        # a target that some seeds missed has no median time: show it as missed
        row[key] = statistics.median(values) if values and len(values) == len(good) else None
    return row


# --- inference -----------------------------------------------------------------------------------

def run_inference(model_dir: Path, env: dict[str, str], ceiling: float, quick: bool) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "inference.py"), "--model", str(model_dir)]
    if quick:
        command.append("--quick")
    lines, info = _run_child(command, env)
    done = next((json.loads(line[len("DONE "):]) for line in lines if line.startswith("DONE ")), None)
    if done is None:
        return {"ok": False, **info}
    for row in done["runtimes"]:
        if "images_per_second" in row:
            row["gflops"] = round(done["forward_flops"] * row["images_per_second"] / 1e9, 1)
            row["gflops_of_matmul"] = round(row["gflops"] / ceiling, 3) if ceiling else None
    return {"ok": True, "model": "default preset", **done, "peak_rss_mb": info["peak_rss_mb"]}


# --- processes and output ------------------------------------------------------------------------

def _run_child(command: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Run a command to the end; its output lines plus wall/CPU seconds and peak memory of that process."""
    with tempfile.TemporaryFile(mode="w+") as log:
        env = {**env, "CNNLAB_BENCH_STARTED": repr(time.time())}
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        # wait4 gives this child's own resource usage (RUSAGE_CHILDREN would mix all children's peaks)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = log.read().splitlines()
    info = {"returncode": process.returncode, "wall_seconds": round(wall, 2),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is in KiB on Linux
    if process.returncode != 0:
        info["error"] = next((line for line in reversed(lines) if line.strip()), f"exit code {process.returncode}")[:300]
        print(f"  failed: {' '.join(command)}\n  " + "\n  ".join(lines[-8:]), file=sys.stderr, flush=True)
    return lines, info


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "machine"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/run.py ...`: errors in the arguments or the data are one line, exit 2."""
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
