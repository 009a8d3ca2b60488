#!/usr/bin/env python3
"""Does `cnnlab lr-find` pick a good learning rate? The tutorial network with Adam, one epoch each.

    python benchmarks/lr_find_check.py              # 1 seed: a range test + 6 one-epoch trainings (~2-4 min, quiet CPU)
    python benchmarks/lr_find_check.py --seeds 2

For each seed: the range test (defaults of `cnnlab lr-find`) on the `tutorial` preset, then one
epoch of `cnnlab train --preset tutorial` at the suggested rate and at each of 1e-4, 3e-4, 1e-3,
3e-3 and 1e-2. The claim (issue 15): the suggested rate's test accuracy is within 0.5 points of
the best of the five. Results: benchmarks/results/lr-find-<machine>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import cnnlab  # noqa: F401
except ImportError:  # a checkout without installing: use the source tree
    sys.path.insert(0, str(ROOT / "src"))

GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
TOLERANCE = 0.005  # 0.5 points of accuracy


def one_seed(seed: int, tmp: Path) -> dict:
    from cnnlab.config import resolve_config
    from cnnlab.data import load_dataset
    from cnnlab.lr_range import prepare, range_test
    from cnnlab.training import fit

    config = resolve_config("tutorial", overrides={"train": {"seed": seed, "epochs": 1, "tensorboard": False}})
    data = load_dataset(config.data, seed=seed, progress=False)
    start = time.perf_counter()
    model, make_optimizer, batches, amp, _ = prepare(config, data=data, log=lambda *_: None)
    sweep = range_test(model, make_optimizer, batches, amp_dtype=amp)  # lr-find's defaults
    sweep_seconds = time.perf_counter() - start
    print(f"seed {seed}: suggestion {sweep.suggestion:.3g} ({len(sweep.lrs)} steps, {sweep.stopped}, "
          f"{sweep_seconds:.1f} s)", flush=True)
    rows = []
    for label, lr in [("suggested", sweep.suggestion)] + [("grid", lr) for lr in GRID]:
        config.train.lr = lr
        started = time.perf_counter()
        result = fit(config, tmp / f"seed{seed}-{label}-{lr:.3g}", progress=False, data=data, log=lambda *_: None)
        rows.append({"kind": label, "lr": lr, "test_accuracy": result["metrics"]["test_accuracy"],
                     "seconds": time.perf_counter() - started})
        print(f"  {label:>9} lr {lr:.3g}: {100 * rows[-1]['test_accuracy']:.2f}% ({rows[-1]['seconds']:.1f} s)", flush=True)
    best = max(r["test_accuracy"] for r in rows if r["kind"] == "grid")
    suggested = rows[0]["test_accuracy"]
    return {"seed": seed, "suggestion": sweep.suggestion, "sweep_steps": len(sweep.lrs), "stopped": sweep.stopped,
            "sweep_seconds": sweep_seconds, "rows": rows, "best_grid_accuracy": best,
            "gap_points": 100 * (best - suggested), "within_tolerance": suggested >= best - TOLERANCE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc)
    load_before = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="cnnlab-lr-find-") as tmp:
        seeds = [one_seed(seed, Path(tmp)) for seed in range(args.seeds)]
    load_after = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [f"# lr-find check — {platform.node()}, {started:%Y-%m-%d}", "",
             f"`python benchmarks/lr_find_check.py --seeds {args.seeds}`: the `tutorial` preset (Adam, batch 100), the "
             "range test with `cnnlab lr-find`'s defaults (1e-7 to 10, 200 steps, valley rule), then one epoch at each "
             f"rate. Load average before {load_before}, after {load_after}.", "",
             "| seed | suggested lr | its test acc | " + " | ".join(f"lr {lr:g}" for lr in GRID)
             + " | best of the five | gap (points) | within 0.5 points |",
             "|" + "---|" * (len(GRID) + 6)]
    for s in seeds:
        grid = {r["lr"]: r["test_accuracy"] for r in s["rows"] if r["kind"] == "grid"}
        lines.append(f"| {s['seed']} | {s['suggestion']:.3g} | {100 * s['rows'][0]['test_accuracy']:.2f}% | "
                     + " | ".join(f"{100 * grid[lr]:.2f}%" for lr in GRID)
                     + f" | {100 * s['best_grid_accuracy']:.2f}% | {s['gap_points']:+.2f} | {'yes' if s['within_tolerance'] else 'NO'} |")
    lines += ["", "Gap: best of the five minus the suggested rate's accuracy (negative: the suggestion did better).",
              "Range test: " + "; ".join(f"seed {s['seed']} {s['sweep_steps']} steps ({s['stopped']}), {s['sweep_seconds']:.1f} s"
                                        for s in seeds) + "."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lr-find-{platform.node()}-{started:%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps({"started": started.isoformat(timespec="seconds"), "seeds": seeds,
                                                     "load_before": load_before, "load_after": load_after}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md and .json")
    return 0 if all(s["within_tolerance"] for s in seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
