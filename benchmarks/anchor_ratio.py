#!/usr/bin/env python3
"""The speed ratio that counts: the tutorial's own program (the anchor) against `cnnlab train --preset fast`.

    python benchmarks/anchor_ratio.py --machine vm-2core [--seeds 5] [--anchor PATH] [--extra "--set ..."]

In one go on one machine, one after the other (the anchors' README says how the ratio is taken):

1. the anchor, `seed_tutorial_mnist.py DATA_ROOT EPOCHS SEED` (torchvision MNIST + ToTensor +
   DataLoader, Adam lr 0.01, batch 100, a test pass after each epoch): its `elapsed_s` (seconds after
   its imports) at the first epoch whose test accuracy is >= 98.06%; it is stopped there;
2. `cnnlab train --preset fast --seed S` for each seed, as a user types it: whole-process wall time,
   from the moment the process is started to its exit, and the test accuracy it reports.

The ratio is the anchor's time over the median of `fast`'s. The 1-minute load average is recorded
before and after every process: other work on the machine slows every number down, and not all
of them equally. Results: benchmarks/results/anchor-<machine>-<date>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR = Path("/work/shared/anchors/seed_tutorial_mnist.py")
TARGET = 0.9806  # the tutorial's published accuracy


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run_anchor(anchor: Path, data_root: str, epochs: int, seed: int, limit: float) -> dict[str, Any]:
    """Run the anchor until an epoch reaches TARGET (then stop it) or it ends."""
    before = load()
    process = subprocess.Popen([sys.executable, str(anchor), data_root, str(epochs), str(seed)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    epochs_seen: list[dict[str, float]] = []
    reached = None
    deadline = time.monotonic() + limit
    try:
        for line in process.stdout:
            match = re.search(r"epoch (\d+) .*test_acc ([\d.]+) elapsed_s ([\d.]+)", line)
            if match:
                epochs_seen.append({"epoch": int(match[1]), "test_accuracy": float(match[2]), "elapsed_s": float(match[3])})
                if float(match[2]) >= TARGET:
                    reached = epochs_seen[-1]
                    break
            if time.monotonic() > deadline:
                break
    finally:
        process.kill()
        process.wait()
    return {"epochs": epochs_seen, "reached": reached, "load_before": before, "load_after": load(),
            "error": None if epochs_seen else process.stderr.read()[-1000:]}


def run_fast(seed: int, out: Path, extra: list[str], env: dict, limit: float) -> dict[str, Any]:
    before = load()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--preset", "fast", "--seed", str(seed), "--out", str(out)]
                            + extra, env=env, capture_output=True, text=True, timeout=limit)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"cnnlab train failed ({result.returncode}): {result.stderr[-1500:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "seconds": round(wall, 2), "test_accuracy": metrics[-1]["test_accuracy"],
            "epoch_seconds": metrics[-1].get("epoch_seconds"), "load_before": before, "load_after": load()}


def markdown(r: dict[str, Any]) -> str:
    a = r["anchor"]
    rows = ["| run | test accuracy | seconds | load before/after |", "|---|---|---|---|"]
    for e in a["epochs"]:
        rows.append(f"| anchor epoch {e['epoch']} | {100 * e['test_accuracy']:.2f}% | {e['elapsed_s']:.1f} s after its imports | "
                    f"{a['load_before']} / {a['load_after']} |")
    for f in r["fast"]:
        rows.append(f"| `cnnlab train --preset fast --seed {f['seed']}` | {100 * f['test_accuracy']:.2f}% | {f['seconds']:.2f} s "
                    f"whole process | {f['load_before']} / {f['load_after']} |")
    accs = [f["test_accuracy"] for f in r["fast"]]
    lines = [f"# The anchor against `fast` ({r['machine']}, {r['date']})", "",
             f"{r['cpu']}, {r['cores']} cores; torch {r['torch']}. Command: `{r['command']}`", "", *rows, "",
             f"- `fast`: median {100 * statistics.median(accs):.2f}% (every seed {100 * min(accs):.2f}% or more) in "
             f"{r['fast_median_s']:.2f} s median whole process ({min(f['seconds'] for f in r['fast']):.2f}–"
             f"{max(f['seconds'] for f in r['fast']):.2f} s)."]
    loads = [a["load_before"], a["load_after"]] + [x for f in r["fast"] for x in (f["load_before"], f["load_after"])]
    if max(loads) > r["cores"]:
        lines.append(f"- **The machine was loaded** (1-minute load average up to {max(loads):.1f} on {r['cores']} cores): "
                     "other work slowed both sides, and not equally. The ratio below is what this run measured, "
                     "not a speed claim; the claim needs a quiet machine.")
    if a["reached"]:
        lines.append(f"- The anchor reached {100 * TARGET:.2f}% at epoch {a['reached']['epoch']}, {a['reached']['elapsed_s']:.1f} s "
                     f"after its imports: **ratio {r['ratio']:.1f}x** (aim 10x).")
    else:
        lines.append(f"- The anchor did not reach {100 * TARGET:.2f}% in the epochs run: no ratio.")
    return "\n".join(lines) + "\n"


def chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    a = r["anchor"]
    ax.plot([e["elapsed_s"] for e in a["epochs"]], [100 * e["test_accuracy"] for e in a["epochs"]], "o-", label="anchor (tutorial program)")
    ax.plot([f["seconds"] for f in r["fast"]], [100 * f["test_accuracy"] for f in r["fast"]], "s", label="cnnlab fast (whole process)")
    ax.axhline(100 * TARGET, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("seconds")
    ax.set_ylabel("test accuracy %")
    loads = [a["load_before"], a["load_after"]] + [x for f in r["fast"] for x in (f["load_before"], f["load_after"])]
    title = f"ratio {r['ratio']:.1f}x" if r["ratio"] else "no ratio"
    if max(loads) > r["cores"]:
        title += f" — machine loaded (load up to {max(loads):.1f} on {r['cores']} cores): not a speed claim"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="vm")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--anchor", default=str(DEFAULT_ANCHOR))
    parser.add_argument("--anchor-epochs", type=int, default=5, help="at most this many epochs of the anchor")
    parser.add_argument("--data", default=os.environ.get("CNNLAB_DATA", "/work/shared/datasets"),
                        help="the folder holding MNIST/raw (the anchor's DATA_ROOT, cnnlab's CNNLAB_DATA)")
    parser.add_argument("--extra", default="", help="extra flags for cnnlab train (quoted), to try a change")
    parser.add_argument("--no-anchor", action="store_true", help="only the fast runs (no ratio)")
    parser.add_argument("--limit", type=float, default=900, help="seconds allowed per process")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    import torch

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CNNLAB_DATA": args.data}
    results: dict[str, Any] = {"machine": args.machine, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                               "command": "python benchmarks/anchor_ratio.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    del torch
    if args.no_anchor:
        results["anchor"] = {"epochs": [], "reached": None, "load_before": load(), "load_after": load()}
    else:
        print("anchor ...", flush=True)
        results["anchor"] = run_anchor(Path(args.anchor), args.data, args.anchor_epochs, 0, args.limit)
        if results["anchor"]["error"]:
            raise SystemExit(f"the anchor failed: {results['anchor']['error']}")
    results["fast"] = []
    with tempfile.TemporaryDirectory(prefix="cnnlab-anchor-") as tmp:
        for seed in range(args.seeds):
            print(f"fast seed {seed} ...", flush=True)
            results["fast"].append(run_fast(seed, Path(tmp) / f"fast-{seed}", args.extra.split(), env, args.limit))
    results["fast_median_s"] = statistics.median(f["seconds"] for f in results["fast"])
    reached = results["anchor"]["reached"]
    results["ratio"] = round(reached["elapsed_s"] / results["fast_median_s"], 2) if reached else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"anchor-{args.machine}-{datetime.now(timezone.utc).strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    chart(results, stem.with_suffix(".png"))
    print(markdown(results))
    print(f"written: {stem}.{{md,json,png}}")
    return 0


def _cpu_name() -> str:
    """The CPU's name, as every results table in benchmarks/ gives it (`explain_speed.cpu_name`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.explain_speed import cpu_name

    return cpu_name()


if __name__ == "__main__":
    sys.exit(main())
