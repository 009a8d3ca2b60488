#!/usr/bin/env python3
"""Small photo folders three ways: from scratch, a linear probe on ImageNet features, and the default (probe + fine-tune).

    python benchmarks/pretrained.py                               # 5x100, 10x50, 2x20; 5 draws each; 3 arms
    python benchmarks/pretrained.py --folders 5x100 --draws 0 1    # fewer
    python benchmarks/pretrained.py --quick                        # tiny folders: checks that it runs

The folders are cut from the CIFAR-10 JPEGs as benchmarks/small_folders.py cuts them (classes and training images drawn
with the draw's seed, the test images the first --test-per-class of those classes in CIFAR's test split). Each arm is
one `cnnlab train --dataset folder:PATH` process with only these flags besides --out/--seed/--no-progress/--no-tensorboard:

- scratch:  `--scratch`, the from-scratch network fitted to the folder (what a folder got before `photos`);
- probe:    `--set train.freeze=features`: `photos` with its backbone frozen throughout, a linear head on cached features;
- default:  no flag: `photos` (the head on cached features as epoch 0, then 3 epochs of fine-tuning; the best epoch
            by validation is kept).

Besides accuracy and whole-process time, the table gives the frozen phase's seconds with the feature cache (the
cache's own seconds + the head's passes over it) and, on each folder's first draw, without it: one head-only epoch
that runs the backbone over the images (`train.cache_features=false`), times the probe's passes.
Results: benchmarks/results/pretrained-<machine>-<date>[-tag].{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_folders import FOLDERS, ROOT, cut_folder, prepare, train  # noqa: E402  (the same folders and runner)

ARMS = {"scratch": "--scratch", "probe": "--set train.freeze=features", "default": ""}
NO_CACHE = "--set train.freeze=features --set train.probe_epochs=0 --set train.cache_features=false --epochs 1"
AIMS = {"5x100": "median >= 80%, worst >= 72%, <= 3 min", "10x50": "median >= 65%"}


def epoch_zero(out: Path) -> dict:
    """The probe's line of metrics.jsonl (cache and passes' seconds), or {}."""
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("epoch") == 0:
            return entry
    return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/pretrained.py", description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="/tmp/cifar", help="the unpacked CIFAR-10 JPEGs (train/ and test/)")
    parser.add_argument("--archive", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"))
    parser.add_argument("--folders", nargs="+", default=["5x100", "10x50", "2x20"], choices=list(FOLDERS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="class draws (seeds)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="tiny folders and short runs: checks that it runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--machine", default="vm-2core")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cnnlab-pretrained"),
                        help="work folder: the cut folders and every run (kept, so a second call continues)")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS.json",
                        help="write one table from the results of several calls (e.g. one per folder, run side by side)")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        runs = {}
        for run in (run for part in parts for run in part["runs"]):  # a draw run twice counts once (the first)
            runs.setdefault((run["folder"], run["draw"], run["arm"]), run)
        merged = {**parts[0], "runs": sorted(runs.values(), key=lambda r: (list(FOLDERS).index(r["folder"]), r["draw"])),
                  "load_average_after": parts[-1].get("load_average_after"), "machine": args.machine}
        write_results(merged, Path(args.out), False, args.tag)
        return 0
    folders = {name: FOLDERS[name] for name in args.folders}
    arms = {name: ARMS[name] for name in args.arms}
    no_cache = NO_CACHE
    if args.quick:
        folders = {name: (classes, 8) for name, (classes, _) in folders.items()}
        arms = {k: v + (" --epochs 0.2" if k == "scratch" else " --set train.probe_epochs=2 --epochs 1")
                for k, v in arms.items()}
        args.test_per_class, args.draws = 5, args.draws[:1]
    images, work = Path(args.images), Path(args.work) / ("quick" if args.quick else "full")
    env = prepare(images, Path(args.archive), work)
    # the one-time conversion of the packaged weights is not any run's time
    subprocess.run([sys.executable, "-c", "from cnnlab.pretrained import weights_file; "
                    "from cnnlab.layers.backbones import reference_state; weights_file('efficientnet-lite0', reference_state)"],
                   env=env, check=True)
    results = {"machine": args.machine, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "date": date.today().isoformat(), "load_average_before": os.getloadavg(),
               "test_per_class": args.test_per_class, "arms": arms, "no_cache": no_cache, "runs": []}
    for name, (classes, per_class) in folders.items():
        for draw in args.draws:
            folder = work / f"{name}-draw{draw}"
            chosen = cut_folder(images, folder, classes, per_class, args.test_per_class, draw)
            print(f"{name} (draw {draw}): {', '.join(chosen)}", flush=True)
            runs = dict(arms)
            if draw == args.draws[0] and "probe" in arms:
                runs["no-cache"] = no_cache
            for arm, flags in runs.items():
                print(f"  {arm}: cnnlab train --dataset folder:{folder.name} {flags}", flush=True)
                out = work / "runs" / f"{name}-draw{draw}-{arm}"
                result = train(folder, shlex.split(flags), out, 0, env)
                result.update({"folder": name, "draw": draw, "classes": chosen, "arm": arm, "flags": flags,
                               "probe": epoch_zero(out), "history": [json.loads(line) for line in
                                                                      (out / "metrics.jsonl").read_text().splitlines()]})
                results["runs"].append(result)
                results["load_average_after"] = os.getloadavg()
                write_results(results, Path(args.out), args.quick, args.tag)
    return 0


def write_results(results: dict, folder: Path, quick: bool, tag: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"pretrained-{results['machine']}-{results['date']}{'-' + tag if tag else ''}{'-quick' if quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    highest = max(max(r["load_1min"]) for r in results["runs"])
    lines = [f"# Small photo folders: from scratch, linear probe, default (probe + fine-tune); {results['machine']} "
             f"({results['cpus']} CPUs), {results['date']}", "",
             f"Folders cut from the CIFAR-10 JPEGs (benchmarks/pretrained.py); test: the first {results['test_per_class']} "
             "images per class of CIFAR's test split; validation: 10% of the training images, held out by cnnlab.",
             f"Load average (1 min) up to {highest:.1f} on {results['cpus']} CPUs"
             + (" (quiet: the times are the runs' own)." if highest <= results["cpus"] + 1 else
                ": the machine was shared with other work, so wall times are slower than a quiet machine's, and CPU time "
                "(user + system) is inflated too (threads that wait for each other spin: the from-scratch run took 62 CPU-s "
                "on a quiet machine on 2026-12-03, over 200 here); compare times only within one arm. Accuracies are not "
                "affected."), "",
             "| folder | arm | draws | test accuracy: each draw | median | worst | whole process (median, max) | CPU time (median) | frozen phase: cache + head passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["folder"], run["arm"]), []).append(run)
    for (name, arm), runs in groups.items():
        accs = [100 * r["test_accuracy"] for r in runs]
        seconds = [r["seconds"] for r in runs]
        probe = [r["probe"] for r in runs if r["probe"]]
        frozen = (f"{statistics.median(p['cache_seconds'] for p in probe):.1f} s + "
                  f"{statistics.median(p['epoch_seconds'] for p in probe):.1f} s" if probe else "")
        if arm == "no-cache":
            epoch = runs[0]["history"][-1]["epoch_seconds"]
            passes = next((r["probe"] for r in results["runs"] if r["folder"] == name and r["probe"]), {})
            count = passes.get("passes", 30)
            frozen = f"without the cache: {epoch:.1f} s an epoch x {count} passes = {epoch * count:.0f} s"
        lines.append(f"| {name} | {arm} | {len(runs)} | {', '.join(f'{a:.1f}' for a in accs)} | "
                     f"{statistics.median(accs):.1f}% | {min(accs):.1f}% | {statistics.median(seconds):.0f} s, "
                     f"{max(seconds):.0f} s | {statistics.median(r['cpu_seconds'] for r in runs):.0f} s | {frozen} |")
    lines += ["", "Aims (issue 30): " + "; ".join(f"{k}: {v}" for k, v in AIMS.items()) + "."]
    printed = sorted({line for r in results["runs"] for line in (r.get("recipe_line"),) if line})
    if printed:
        lines += ["", "What the from-scratch default printed:", ""] + [f"    {line}" for line in printed]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _chart(groups, stem.with_suffix(".png"), results)
    print(f"wrote {stem}.md, .json and .png", flush=True)


def _chart(groups: dict, path: Path, results: dict) -> None:
    """Accuracy against whole-process time, one point per run, a colour per arm and a marker per folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"scratch": "tab:grey", "probe": "tab:blue", "default": "tab:green"}
    markers = {"5x100": "o", "10x50": "s", "2x20": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, arm), runs in groups.items():
        if arm not in colours:
            continue
        ax.scatter([r["seconds"] for r in runs], [100 * r["test_accuracy"] for r in runs], c=colours[arm],
                   marker=markers.get(name, "o"), label=f"{name} {arm}", alpha=0.8)
    ax.set_xlabel("whole process (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Small CIFAR folders: scratch vs ImageNet features ({results['machine']}, {results['date']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
