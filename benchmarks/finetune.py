#!/usr/bin/env python3
"""Does fine-tuning pay on this machine? CIFAR-10 JPEGs split into two tasks, no download needed.

    python benchmarks/finetune.py                 # the whole experiment, 3 seeds (~30 min on the 2-core VM)
    python benchmarks/finetune.py --quick         # a few steps of everything: checks that it runs

1. Source: `cifar-fast` trained on airplane, automobile, bird, cat and deer (all 25,000 training
   images, 10 epochs: the preset's recipe), once.
2. Target: dog, frog, horse, ship and truck with only 100 training images per class (500, drawn per
   seed), tested on those five classes' whole test set (5,000 images). Per seed, on the same 500:
   - scratch:   `cifar-fast` from random weights;
   - fine-tune: `--init` the source model, every layer trained (a new last layer for the new classes);
   - head only: `--init` the source model with `--freeze features` (only the last layer trains);
   - rgb32:     the `rgb32` preset from random weights (the other colour preset, for the recommendation).
   Every target run has the same schedule: batch 100, `--target-epochs` epochs (5 steps each), one
   evaluation at the end, the preset's recipe otherwise.

Each run is its own `cnnlab train` process; times are those processes' wall-clock seconds (imports,
decoding the JPEGs and the final evaluation included). A run stopped by a signal from outside (a
shared machine) is continued with `cnnlab train --resume`, which gives the same weights as an
uninterrupted run; its time is then the sum of its processes'. The work folder (`--work`) keeps
finished runs, so running the script again after it was killed continues where it stopped; it is
removed once the results are written. Results: benchmarks/results/finetune-<machine>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TARGET_CLASSES = ("dog", "frog", "horse", "ship", "truck")
ARMS = ("scratch", "fine-tune", "head only", "rgb32")


def link_folder(src_root: Path, dst: Path, classes, split: str, per_class: int | None, rng: random.Random | None) -> int:
    """dst/split/<class>/ with symlinks to (a sample of) src_root/split/<class>/*; returns the count."""
    count = 0
    for name in classes:
        files = sorted((src_root / split / name).iterdir())
        if per_class is not None:
            files = rng.sample(files, per_class)
        (dst / split / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            (dst / split / name / f.name).symlink_to(f)
        count += len(files)
    return count


INTERRUPTED = (130, 143)  # cnnlab train's exit codes after SIGINT / SIGTERM: resumable


def train(args: list[str], env: dict[str, str], attempts: int = 5) -> dict:
    """One run of `cnnlab train` (its processes' wall time and the last epoch's metrics); a finished run's
    recorded result is reused, an interrupted one is resumed."""
    out = Path(args[args.index("--out") + 1])
    done = out / "benchmark.json"
    if done.exists():
        result = json.loads(done.read_text())
        print(f"  {result['seconds']:6.1f} s  test accuracy {100 * result['test_accuracy']:.2f}%  ({out.name}, "
              "recorded earlier)", flush=True)
        return result
    seconds, processes, log = 0.0, 0, []
    if out.exists() and not (out / "resume.safetensors").exists():
        shutil.rmtree(out)  # killed before its first epoch was saved: start it again
    for _ in range(attempts):
        command = (["--resume", str(out)] if (out / "resume.safetensors").exists() else args) + ["--no-progress",
                                                                                                "--no-tensorboard"]
        start = time.perf_counter()
        process = subprocess.run([sys.executable, "-m", "cnnlab", "train", *command], env=env, capture_output=True,
                                 text=True)
        seconds += time.perf_counter() - start
        processes += 1
        log += [line for line in process.stdout.splitlines() if line.startswith(("init from", "frozen", "pretrained"))]
        if process.returncode == 0:
            break
        if process.returncode not in INTERRUPTED:
            raise SystemExit(f"cnnlab train {' '.join(command)} failed:\n{process.stderr[-2000:]}")
        print(f"  (stopped from outside after {seconds:.0f} s: resuming)", flush=True)
    else:
        raise SystemExit(f"{out}: interrupted {attempts} times; run the script again to continue")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    result = {"seconds": round(seconds, 1), "processes": processes, "test_accuracy": last["test_accuracy"], "log": log}
    done.write_text(json.dumps(result) + "\n")
    print(f"  {seconds:6.1f} s  test accuracy {100 * last['test_accuracy']:.2f}%  ({out.name})", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/finetune.py", description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--source-epochs", type=float, default=10)
    parser.add_argument("--target-epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="a fraction of an epoch everywhere (checks that it runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--machine", default="vm-2core", help="name of this machine in the results file name")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cnnlab-finetune-benchmark"),
                        help="work folder: the unpacked images and every run (kept until the results are written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.source_epochs, args.target_epochs = 1, 0.05, 2

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CNNLAB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    results: dict = {"machine": args.machine, "cpu": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "date": date.today().isoformat(), "load_average_before": load_before,
                     "settings": {k: v for k, v in vars(args).items() if k not in ("out", "archive")}, "seeds": []}
    work = Path(args.work) / ("quick" if args.quick else "full")
    env["CNNLAB_CACHE"] = str(work / "cache")  # decoded images of these folders only: no stale cache
    images = work / "cifar10"
    if not (images / ".complete").exists():
        print(f"unpacking {args.archive} ...", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        with tarfile.open(args.archive) as tar:
            tar.extractall(images, filter="data")
        (images / ".complete").touch()
    source = work / "source"
    if not source.exists():
        link_folder(images, source, SOURCE_CLASSES, "train", None, None)
        link_folder(images, source, SOURCE_CLASSES, "test", None, None)
    print(f"source: cifar-fast on {', '.join(SOURCE_CLASSES)} ({args.source_epochs:g} epochs)", flush=True)
    source_run = work / "runs" / "source"
    results["source"] = train(["--preset", "cifar-fast", "--dataset", f"folder:{source}", "--epochs",
                               str(args.source_epochs), "--out", str(source_run)], env)
    common = ["--epochs", str(args.target_epochs), "--batch-size", "100", "--set",
              f"train.eval_every={args.target_epochs}"]
    for seed in range(args.seeds):
        target = work / f"target-{seed}"
        shutil.rmtree(target, ignore_errors=True)  # the same seeded sample again
        n = link_folder(images, target, TARGET_CLASSES, "train", args.per_class, random.Random(seed))
        link_folder(images, target, TARGET_CLASSES, "test", None, None)
        print(f"seed {seed}: {n} training images of {', '.join(TARGET_CLASSES)}", flush=True)
        dataset = ["--dataset", f"folder:{target}", "--seed", str(seed)]
        runs = work / "runs" / f"seed-{seed}"
        row = {"seed": seed}
        row["scratch"] = train(["--preset", "cifar-fast", *dataset, *common, "--out", str(runs / "scratch")], env)
        row["fine-tune"] = train(["--init", str(source_run), *dataset, *common, "--out", str(runs / "finetune")], env)
        row["head only"] = train(["--init", str(source_run), *dataset, *common, "--freeze", "features",
                                  "--out", str(runs / "head")], env)
        row["rgb32"] = train(["--preset", "rgb32", *dataset, *common, "--out", str(runs / "rgb32")], env)
        results["seeds"].append(row)
    results["load_average_after"] = os.getloadavg()
    write_results(results, Path(args.out), args.quick)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def write_results(results: dict, folder: Path, quick: bool) -> None:
    import statistics

    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"finetune-{results['machine']}-{results['date']}{'-quick' if quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["settings"]
    lines = [f"# Fine-tuning on {results['machine']} ({results['cpus']} CPUs), {results['date']}", "",
             f"Source: cifar-fast on {', '.join(SOURCE_CLASSES)} (25,000 training images, {s['source_epochs']:g} epochs): "
             f"{100 * results['source']['test_accuracy']:.2f}% on their 5,000 test images, {results['source']['seconds']:.0f} s.",
             f"Target: {', '.join(TARGET_CLASSES)}, {s['per_class']} training images per class (drawn per seed), "
             f"tested on their 5,000 test images; every run {s['target_epochs']} epochs of batch 100 "
             f"({5 * s['target_epochs'] * s['per_class'] // 100} steps).",
             f"Load average (1/5/15 min) before: {', '.join(f'{v:.1f}' for v in results['load_average_before'])}; "
             f"after: {', '.join(f'{v:.1f}' for v in results['load_average_after'])} (a shared machine: times are noisy).",
             "", "| run | " + " | ".join(f"seed {row['seed']}" for row in results["seeds"]) + " | median | median time |",
             "|---|" + "---|" * (len(results["seeds"]) + 2)]
    for arm in ARMS:
        accuracies = [row[arm]["test_accuracy"] for row in results["seeds"]]
        times = [row[arm]["seconds"] for row in results["seeds"]]
        cells = " | ".join(f"{100 * a:.2f}%" for a in accuracies)
        lines.append(f"| {arm} | {cells} | {100 * statistics.median(accuracies):.2f}% | {statistics.median(times):.0f} s |")
    lines += ["", "Times are whole `cnnlab train` processes (imports, JPEG decoding, training, one evaluation with "
              "flip TTA on 5,000 images). The source model's training time is not in the fine-tuning times."]
    resumed = [f"{name} (seed {row['seed']})" for row in results["seeds"] for name in ARMS if row[name]["processes"] > 1]
    resumed += ["source"] if results["source"]["processes"] > 1 else []
    if resumed:
        lines.append(f"Stopped from outside and resumed (time = the sum of its processes): {', '.join(resumed)}.")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
