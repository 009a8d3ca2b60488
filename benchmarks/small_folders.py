#!/usr/bin/env python3
"""Small image folders with the default recipe: what a new user gets from `cnnlab train --dataset folder:PATH`.

    python benchmarks/small_folders.py                      # every folder, every arm (~30 min on the loaded 2-core VM)
    python benchmarks/small_folders.py --folders 5x100 --arms after
    python benchmarks/small_folders.py --arm "wide=--set train.lr=0.05"   # one more arm, by hand
    python benchmarks/small_folders.py --quick              # tiny folders, a few steps: checks that it runs

Folders are cut from the CIFAR-10 JPEGs (train/<class>/*.jpg, test/<class>/*.jpg; unpacked from
--archive when --images has no train/ folder): for each shape (classes x training images per class)
the classes and the training images are drawn with a seed, and the test images are the first
--test-per-class of those classes in CIFAR's own test split. The folders hold symlinks to the JPEGs.

Arms (each one `cnnlab train` process; --out, --seed, --no-progress and --no-tensorboard are the only
flags besides the arm's own, none of which changes the recipe):
- before: `--preset rgb32`, which is what a folder got before the recipe was fitted to the data
  (commit 3cbd743: rgb32, batch 256, 10 epochs, lr 0.1).
- after:  no flag at all: the default recipe as it is now.
- best:   the best recipe found by hand for that folder (BEST below; `--best` replaces it).
- any `--arm NAME=ARGS` given.

Times are whole processes (imports, decoding the JPEGs, training, validation, the final test) on a
shared machine: the load average before and after each run is recorded beside it. Accuracy is on
the folder's test split (the best epoch by validation where there is a validation split).
Results: benchmarks/results/small-folders-<machine>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# name: (classes, training images per class)
FOLDERS = {"5x100": (5, 100), "10x50": (10, 50), "2x20": (2, 20)}
# The best recipe found by hand per folder (see the results file's notes for what was tried).
# 5x100 and 10x50: rgb32 at batch 100 for 40 epochs, the recipe that gave rgb32 73.82% on another
# 5x100 folder in benchmarks/finetune.py (results/finetune-vm-2core-2026-11-30.md).
BEST = {
    "5x100": "--preset rgb32 --batch-size 100 --epochs 40",
    "10x50": "--preset rgb32 --batch-size 100 --epochs 40",
    "2x20": "--preset rgb32 --batch-size 16 --epochs 100 --lr 0.025",
}
INTERRUPTED = (130, 143)  # cnnlab train's exit codes after SIGINT / SIGTERM: resumable


def cut_folder(images: Path, dest: Path, classes: int, per_class: int, test_per_class: int, seed: int) -> list[str]:
    """dest/train/<class>/ (per_class drawn images) and dest/test/<class>/ (the first test_per_class of CIFAR's
    test split) as symlinks, for `classes` classes drawn with `seed`; returns the class names."""
    rng = random.Random(seed)
    names = sorted(rng.sample(CIFAR, classes))
    shutil.rmtree(dest, ignore_errors=True)
    for name in names:
        train = sorted((images / "train" / name).iterdir())
        for split, files in (("train", rng.sample(train, per_class)),
                             ("test", sorted((images / "test" / name).iterdir())[:test_per_class])):
            (dest / split / name).mkdir(parents=True, exist_ok=True)
            for f in files:
                (dest / split / name / f.name).symlink_to(f)
    return names


def prepare(images: Path, archive: Path, work: Path) -> dict[str, str]:
    """Unpack the CIFAR-10 JPEGs into `images` unless they are there; the environment of the `cnnlab` processes:
    this checkout's code, offline, unbuffered, a cache of their own in `work`."""
    if not (images / "train").is_dir():
        print(f"unpacking {archive} into {images} ...", flush=True)
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(images, filter="data")
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "CNNLAB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CNNLAB_CACHE": str(work / "cache")}


def train(folder: Path, arm_args: list[str], out: Path, seed: int, env: dict[str, str], attempts: int = 5) -> dict:
    """One run of `cnnlab train` on `folder`: seconds, test accuracy, the recipe line; a finished run's recorded
    result is reused and an interrupted one is resumed."""
    done = out / "benchmark.json"
    if done.exists():
        result = json.loads(done.read_text())
        print(f"    {result['seconds']:6.1f} s  test {100 * result['test_accuracy']:.2f}%  (recorded earlier)", flush=True)
        return result
    if out.exists() and not (out / "resume.safetensors").exists():
        shutil.rmtree(out)
    args = ["--dataset", f"folder:{folder}", *arm_args, "--seed", str(seed), "--out", str(out)]
    seconds, processes, lines = 0.0, 0, []
    load = [os.getloadavg()[0]]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(attempts):
        command = ["--resume", str(out)] if (out / "resume.safetensors").exists() else args
        start = time.perf_counter()
        process = subprocess.run([sys.executable, "-m", "cnnlab", "train", *command, "--no-progress", "--no-tensorboard"],
                                 env=env, capture_output=True, text=True)
        seconds += time.perf_counter() - start
        processes += 1
        lines += process.stdout.splitlines()
        if process.returncode == 0:
            break
        if process.returncode not in INTERRUPTED:
            raise SystemExit(f"cnnlab train {shlex.join(command)} failed:\n{process.stderr[-2000:]}")
        print(f"    (stopped from outside after {seconds:.0f} s: resuming)", flush=True)
    else:
        raise SystemExit(f"{out}: interrupted {attempts} times; run the script again to continue")
    load.append(os.getloadavg()[0])
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    result = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "processes": processes, "test_accuracy": history[-1]["test_accuracy"],
              "best_epoch": history[-1].get("best_epoch"), "epochs_run": history[-1]["epoch"],
              "batch_size": config["train"]["batch_size"], "epochs": config["train"]["epochs"],
              "lr": config["train"]["lr"], "preset": config.get("preset"), "load_1min": load,
              "recipe_line": next((line for line in lines if "fitted to the data" in line), None),
              "warnings": [line for line in lines if line.startswith("warning:")]}
    (out / "benchmark-stdout.txt").write_text("\n".join(lines) + "\n")  # what the user would have seen
    done.write_text(json.dumps(result) + "\n")
    print(f"    {seconds:6.1f} s  test {100 * result['test_accuracy']:.2f}%  (load {load[0]:.1f} -> {load[1]:.1f})",
          flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/small_folders.py", description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="/tmp/cifar", help="the unpacked CIFAR-10 JPEGs (train/ and test/)")
    parser.add_argument("--archive", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"))
    parser.add_argument("--folders", nargs="+", default=["5x100", "2x20", "10x50"], choices=list(FOLDERS))
    parser.add_argument("--arms", nargs="+", default=["after", "before", "best"])
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=ARGS",
                        help="one more arm: its name and its flags (also run on every folder)")
    parser.add_argument("--best", action="append", default=[], metavar="FOLDER=ARGS", help="replace BEST for a folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="folder draws (and training seeds)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="tiny folders and a few steps: checks that it runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="", help="added to the results file name")
    parser.add_argument("--machine", default="vm-2core", help="name of this machine in the results file name")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cnnlab-small-folders"),
                        help="work folder: the cut folders and every run (kept, so a second call continues)")
    args = parser.parse_args(argv)

    arms = {"before": "--preset rgb32", "after": ""}
    arms.update(dict(a.split("=", 1) for a in args.arm))
    best = {**BEST, **dict(b.split("=", 1) for b in args.best)}
    names = list(dict.fromkeys(args.arms + [a.split("=", 1)[0] for a in args.arm]))
    folders = {name: FOLDERS[name] for name in args.folders}
    if args.quick:
        folders = {name: (classes, 6) for name, (classes, _) in folders.items()}
        arms = {k: v + " --epochs 0.2" for k, v in arms.items()}
        best = {k: v + " --epochs 0.2" for k, v in best.items()}
        args.test_per_class = 5
    images, work = Path(args.images), Path(args.work) / ("quick" if args.quick else "full")
    env = prepare(images, Path(args.archive), work)
    results = {"machine": args.machine, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "date": date.today().isoformat(), "load_average_before": os.getloadavg(),
               "test_per_class": args.test_per_class, "arms": {**arms, "best": best}, "runs": []}
    for seed in args.seeds:
        for name, (classes, per_class) in folders.items():
            folder = work / f"{name}-seed{seed}"
            chosen = cut_folder(images, folder, classes, per_class, args.test_per_class, seed)
            print(f"{name} (seed {seed}): {', '.join(chosen)}", flush=True)
            for arm in names:
                flags = best[name] if arm == "best" else arms[arm]
                print(f"  {arm}: cnnlab train --dataset folder:{folder.name} {flags}", flush=True)
                result = train(folder, shlex.split(flags), work / "runs" / f"{name}-seed{seed}-{arm}", seed, env)
                results["runs"].append({"folder": name, "seed": seed, "classes": chosen, "arm": arm, "flags": flags,
                                        **result})
                results["load_average_after"] = os.getloadavg()
                write_results(results, Path(args.out), args.quick, args.tag)  # after every run: a table so far
    results["load_average_after"] = os.getloadavg()
    write_results(results, Path(args.out), args.quick, args.tag)
    return 0


def _load_note(results: dict) -> str:
    """What the load average says about the times: a run beside other work is slower than its own cost."""
    highest = max(max(r["load_1min"]) for r in results["runs"]) if results["runs"] else 0.0
    if highest <= results["cpus"] + 1:
        return (f"The machine was quiet (1-minute load at most {highest:.1f} on {results['cpus']} CPUs, the runs' own "
                "threads included): the times are the runs' own.")
    return (f"The machine was shared with other work (1-minute load up to {highest:.1f} on {results['cpus']} CPUs): "
            "times are noisy and slower than on a quiet machine; accuracies are not affected.")


def write_results(results: dict, folder: Path, quick: bool, tag: str) -> None:
    """small-folders-<machine>-<date>[-tag].{json,md}: one row per folder and arm (median over seeds)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"small-folders-{results['machine']}-{results['date']}{'-' + tag if tag else ''}{'-quick' if quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Small folders cut from CIFAR-10, {results['machine']} ({results['cpus']} CPUs), {results['date']}", "",
             f"Test: the first {results['test_per_class']} images per class of CIFAR's test split. "
             "Validation (when the recipe has it): 10% of the training images, held out by cnnlab.",
             f"Load average (1/5/15 min) before: {', '.join(f'{v:.1f}' for v in results['load_average_before'])}; after: "
             f"{', '.join(f'{v:.1f}' for v in results['load_average_after'])}. " + _load_note(results),
             "CPU time is the process's user + system seconds: on a quiet 2-core machine the wall time is about half of it.",
             "", "| folder | arm | flags | seeds | test accuracy (median) | chance | time (median) | CPU time | load (1 min) | recipe |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["folder"], run["arm"]), []).append(run)
    for (name, arm), runs in groups.items():
        accuracy = statistics.median(r["test_accuracy"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        loads = "; ".join(f"{r['load_1min'][0]:.1f}→{r['load_1min'][1]:.1f}" for r in runs)
        recipe = (f"{runs[0]['preset'] or 'custom'}, batch {runs[0]['batch_size']}, {runs[0]['epochs']:g} epochs, "
                  f"lr {runs[0]['lr']:g}")
        accs = ", ".join(f"{100 * r['test_accuracy']:.1f}" for r in runs)
        lines.append(f"| {name} | {arm} | `{runs[0]['flags'] or '(none)'}` | {len(runs)} ({accs}) | {100 * accuracy:.2f}% | "
                     f"{100 / len(runs[0]['classes']):.0f}% | {seconds:.0f} s | "
                     f"{statistics.median(r.get('cpu_seconds', 0) for r in runs):.0f} s | {loads} | {recipe} |")
    recipe_lines = sorted({r["recipe_line"] for r in results["runs"] if r["recipe_line"]})
    if recipe_lines:
        lines += ["", "What the default printed:", ""] + [f"    {line}" for line in recipe_lines]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
