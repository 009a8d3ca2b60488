#!/usr/bin/env python3
"""Do cnnlab's attribution maps mean something? Two checks per method, per model (docs/EXPLAIN.md).

    python benchmarks/explain_sanity.py runs/<mnist default run> runs/<colour run> --count 1000

1. Deletion test: for each test image, blank (set to the background: black for digit models, the
   mean colour for the others) the 10% of pixels with the highest attribution for the true class,
   and, separately, as many pixels chosen at random, and the top pixels' pattern moved to a random
   place; a map that points at the evidence lowers the true class's probability more than both.
   Reported: the three mean drops, and on how many images the top pixels beat the random ones.
2. Model randomisation (Adebayo et al., "Sanity checks for saliency maps", 2018): re-initialise
   every weight and explain the same images again; maps that explain the model and not just the
   input change completely. Reported: the Spearman rank correlation between the trained and the
   randomised model's maps per image (mean and median), of the maps as they are, of their absolute
   values, and of their absolute values on the pixels that differ from the blank (for digits: the ink).

The test images are a seeded random sample of the model's test split (the same one every run).
Results: benchmarks/results/explain-sanity-<machine>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
if (SOURCE / "cnnlab").is_dir():  # in a checkout: measure its code, not another installed copy
    sys.path.insert(0, str(SOURCE))
sys.path.insert(0, str(SOURCE.parent))  # this checkout's `benchmarks`, for the shared result writer

import torch  # noqa: E402

from cnnlab.runs import open_run  # noqa: E402
from benchmarks.explain_speed import cpu_name, write_results  # noqa: E402
from cnnlab.explain import METHODS, background_uint8, deletion_test, explain, randomized, spearman  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 100


def maps_for(bundle, images: torch.Tensor, labels: torch.Tensor, method: str) -> tuple[torch.Tensor, str]:
    """The maps of the true classes, explained `BATCH` images at a time; and Grad-CAM's layer."""
    parts, layer = [], ""
    for start in range(0, images.shape[0], BATCH):
        result = explain(bundle, images[start:start + BATCH], method, target=labels[start:start + BATCH])
        parts.append(result.maps)
        layer = result.layer_name
    return torch.cat(parts), layer


def correlations(trained: torch.Tensor, random: torch.Tensor, changed: torch.Tensor) -> dict:
    """Spearman correlations per image: of the maps, of their absolute values, and of their absolute
    values on the pixels that differ from the blank (`changed`, (B, H, W) bool; for digits: the ink)."""
    signed = torch.tensor([spearman(a, b) for a, b in zip(trained, random)])
    absolute = torch.tensor([spearman(a.abs(), b.abs()) for a, b in zip(trained, random)])
    inside = torch.tensor([spearman(a[m].abs(), b[m].abs()) if m.sum() >= 3 else float("nan")
                           for a, b, m in zip(trained, random, changed)])
    return {"spearman_mean": _nan_stat(signed, "mean"), "spearman_median": _nan_stat(signed, "median"),
            "abs_spearman_mean": _nan_stat(absolute, "mean"), "abs_spearman_median": _nan_stat(absolute, "median"),
            "abs_changed_spearman_mean": _nan_stat(inside, "mean"),
            "undefined": int(signed.isnan().sum()), "images": int(signed.numel())}


def _nan_stat(values: torch.Tensor, how: str) -> float | None:
    kept = values[~values.isnan()]
    if kept.numel() == 0:
        return None
    return float(kept.mean() if how == "mean" else kept.median())


def check_model(path: str, count: int, random_count: int, seed: int) -> dict:
    bundle = open_run(path)
    data = bundle.load_test_data()
    order = torch.randperm(data.test.images.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    images, labels = data.test.images[order], data.test.labels[order]
    with torch.inference_mode():
        probabilities = torch.softmax(bundle.model(bundle.preprocessing.normalize(images)).float(), 1)
    summary = {"model": str(path), "dataset": bundle.dataset, "input_shape": "x".join(map(str, bundle.input_shape)),
               "images": int(count), "accuracy_on_sample": float((probabilities.argmax(1) == labels).double().mean()),
               "mean_true_probability": float(probabilities.gather(1, labels.view(-1, 1)).mean()),
               "methods": []}
    random_bundle = randomized(bundle, seed=seed + 1)
    changed = (images != background_uint8(bundle.preprocessing)).any(1)  # (N, H, W): pixels that are not blank
    print(f"{path}: {count} test images, accuracy {100 * summary['accuracy_on_sample']:.1f}%", flush=True)
    for method in METHODS:
        start = time.perf_counter()
        maps, layer = maps_for(bundle, images, labels, method)
        seconds = time.perf_counter() - start
        deletion = deletion_test(bundle, images, maps, labels, fraction=0.1, seed=seed)
        random_maps, _ = maps_for(random_bundle, images[:random_count], labels[:random_count], method)
        row = {"method": method, "layer": layer, "top_drop": deletion.top_drop, "random_drop": deletion.random_drop,
               "moved_drop": deletion.moved_drop, "top_wins": deletion.top_wins, "seconds": seconds,
               **correlations(maps[:random_count], random_maps, changed[:random_count])}
        summary["methods"].append(row)
        print(f"  {method:22s} drop top {row['top_drop']:.3f} random {row['random_drop']:.3f} "
              f"moved {row['moved_drop']:.3f} "
              f"(top wins on {100 * row['top_wins']:.0f}%)  spearman vs randomised {row['spearman_mean']:.3f} "
              f"(abs {row['abs_spearman_mean']:.3f}, non-blank {_number(row['abs_changed_spearman_mean'])})  "
              f"{seconds:.0f}s", flush=True)
    return summary


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    lines = ["# Do the attribution maps mean something?", "",
             f"{results['date']}, {results['machine']['cpu']}; `python benchmarks/explain_sanity.py {results['command']}`; "
             f"torch {results['versions']['torch']}, captum {results['versions']['captum']}.", ""]
    for model in results["models"]:
        lines += [f"## {model['model']} ({model['dataset']}, input {model['input_shape']})", "",
                  f"{model['images']} test images (seeded sample); the model is right on "
                  f"{100 * model['accuracy_on_sample']:.1f}% of them, mean probability of the true class "
                  f"{model['mean_true_probability']:.3f}. Maps explain the true class.", "",
                  "| method | drop, top 10% blanked | drop, random 10% blanked | drop, top 10% moved elsewhere | "
                  "top beats random on | "
                  "Spearman vs randomised model: mean (median) | of absolute values: mean (median) | "
                  "of absolute values, non-blank pixels only: mean | undefined | time |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in model["methods"]:
            name = row["method"] + (f" (layer {row['layer']})" if row["layer"] else "")
            lines.append(f"| {name} | {row['top_drop']:.3f} | {row['random_drop']:.3f} | {row['moved_drop']:.3f} | "
                         f"{100 * row['top_wins']:.1f}% | "
                         f"{_number(row['spearman_mean'])} ({_number(row['spearman_median'])}) | "
                         f"{_number(row['abs_spearman_mean'])} ({_number(row['abs_spearman_median'])}) | "
                         f"{_number(row['abs_changed_spearman_mean'])} | "
                         f"{row['undefined']} of {row['images']} | {row['seconds']:.0f} s |")
        lines.append("")
    lines.append("Drop: the true class's probability before minus after blanking, averaged over the images. "
                 "Undefined: images where a map was constant (a rectified Grad-CAM of all zeros), left out of the correlation.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run folders or model files (a digit model and a colour model)")
    parser.add_argument("--count", type=int, default=1000, help="test images per model for the deletion test")
    parser.add_argument("--random-count", type=int, default=1000, help="of those, how many for the randomisation check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=platform.node() or "machine", help="name used in the file names")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results")
    args = parser.parse_args(argv)

    results = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv[1:] if argv is None else argv),
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg()[0]},
               "versions": {"torch": torch.__version__, "captum": version("captum")},
               "models": [check_model(path, args.count, min(args.random_count, args.count), args.seed) for path in args.models]}
    write_results(results, markdown(results), Path(args.out), f"explain-sanity-{args.machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
