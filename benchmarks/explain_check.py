#!/usr/bin/env python3
"""Which attribution maps can be trusted on which model? The faithfulness check, before and after issue 24.

    python benchmarks/explain_check.py runs/<mnist default run> runs/<cifar-fast run> --images 200

For each model, `cnnlab.faithfulness.check` (deletion and insertion with a blurred substrate, ROAD,
each against a random ranking; cascading model randomisation) on the same seeded test images, for:

- **after**: `cnnlab.explain.check_variants` (what `cnnlab explain RUN --check` measures): Grad-CAM
  at a useful resolution, Layer-CAM, saliency and SmoothGrad ranked by magnitude, integrated
  gradients from the blank and from a blurred baseline, occlusion;
- **before**, as rows `<method> (before)` where the maps differed: Grad-CAM at the last conv block
  of at least 2x2 (3x3 on the colour presets), saliency ranked by its signed value (integrated
  gradients from the blank image and occlusion are unchanged).

Results: benchmarks/results/explain-check-<machine>-<date>.{md,json}; the model's own check file is
not touched.
"""

from __future__ import annotations

import argparse
import functools
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

from benchmarks.explain_speed import cpu_name, write_results  # noqa: E402
from cnnlab import faithfulness  # noqa: E402
from cnnlab.runs import open_run as load_model  # noqa: E402
from cnnlab.explain import _check_maps, check_variants, explain  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def old_gradcam_layer(infos) -> int:
    """Grad-CAM's automatic layer before issue 24: the last conv/residual block of at least 2x2, then the
    layers that keep its map (BatchNorm, activations, dropout)."""
    blocks = [i for i, info in enumerate(infos) if info.spec.kind.extracts_features and len(info.out_shape) == 3
              and min(info.out_shape[1:]) >= 2]
    index = blocks[-1]
    while index + 1 < len(infos) and infos[index + 1].spec.kind.keeps_layout:
        index += 1
    return index + 1


def _old_gradcam(bundle, images, targets, layer):
    return torch.cat([explain(bundle, images[i:i + 50], "gradcam", targets[i:i + 50], layer).maps
                      for i in range(0, images.shape[0], 50)])


BEFORE = ("gradcam", "saliency", "integrated-gradients", "occlusion")  # the four methods before issue 24


def all_variants(bundle) -> tuple[dict, dict, dict]:
    """The check's variants (after), plus those that differed before issue 24 — Grad-CAM at its old
    layer when that differs, saliency ranked by its signed value — named `<method> (before)`;
    and which row is each method's before and after (the others were the same then)."""
    variants, details = check_variants(bundle)
    before = {name: name for name in BEFORE}
    layer = old_gradcam_layer(bundle.infos())
    if layer != details["gradcam"]["layer"]:
        info = bundle.infos()[layer - 1]
        variants["gradcam (before)"] = functools.partial(_old_gradcam, layer=layer)
        details["gradcam (before)"] = {"method": "gradcam", "layer": layer,
                                       "layer_name": f"{layer}: {info.spec.type} {'x'.join(map(str, info.out_shape))}"}
        before["gradcam"] = "gradcam (before)"
    variants["saliency (before)"] = functools.partial(_check_maps, method="saliency", baseline="blank")
    details["saliency (before)"] = {"method": "saliency", "ranked_by": "value"}
    before["saliency"] = "saliency (before)"
    return variants, details, before


def check_model(path: str, count: int, seed: int, randomisation_images: int) -> dict:
    bundle = load_model(path)
    data = bundle.load_test_data()
    chosen = faithfulness.sample(count, seed, data.test.images.shape[0])
    images, labels = data.test.images[chosen], data.test.labels[chosen]
    variants, details, before = all_variants(bundle)
    print(f"{path}: {len(variants)} methods on {count} images", flush=True)
    started = time.perf_counter()
    result = faithfulness.check(bundle, images, variants, seed=seed, labels=labels, details=details,
                                randomisation_images=randomisation_images, progress=lambda line: print("  " + line, flush=True))
    result["seconds"] = time.perf_counter() - started
    print(faithfulness.table(result), flush=True)
    return {"model": str(path), "dataset": bundle.dataset, "input_shape": "x".join(map(str, bundle.input_shape)),
            "check": result, "before": before}


def _gain(row: dict, test: str) -> str:
    t = row["tests"][test]
    return f"{t['mean_gain']:+.3f} ± {t['standard_error']:.3f}{'' if t['beats_random'] else ' ✗'}"


def markdown(results: dict) -> str:
    lines = ["# Can the attribution maps be trusted? The faithfulness check, before and after issue 24", "",
             f"{results['date']}, {results['machine']['cpu']} ({results['machine']['cores']} cores, load average "
             f"{results['machine']['load_average']:.1f} at the start); `python benchmarks/explain_check.py "
             f"{results['command']}`; torch {results['versions']['torch']}, captum {results['versions']['captum']}.", "",
             "Deletion / insertion: area under the explained (predicted) class's probability while the pixels, most "
             "relevant first, are replaced by a blurred copy / put back into it (17 points). ROAD: mean over 10%..90% "
             "removed of p(LeRF) − p(MoRF), noisy linear imputation. Gain: the paired gain over a random ranking "
             "(deletion: random − method; insertion and ROAD: method − random), mean ± standard error over the "
             "images; ✗: not more than 2 standard errors above 0. Randomisation: mean Spearman correlation of the "
             "maps' absolute values with those of the fully re-initialised model (≥ 0.5 fails).", ""]
    for model in results["models"]:
        r = model["check"]
        random = r["random"]
        if True:
            lines += [f"## {model['model']} ({model['dataset']}, input {model['input_shape']})", "",
                      f"{r['images']} test images (seed {r['seed']}); the model is right on "
                      f"{100 * r.get('accuracy_on_sample', float('nan')):.1f}% of them; check time {r['seconds']:.0f} s. "
                      f"Random ranking: deletion {random['deletion_auc']:.3f}, insertion {random['insertion_auc']:.3f}, "
                      f"ROAD {random['road_score']:.3f}.", "",
                      "Before issue 24 each of the four methods was its `(before)` row where there is one, else its "
                      "own row (integrated gradients from the blank image; occlusion; Grad-CAM where its layer did "
                      "not change).", "",
                      "| method | deletion AUC | gain | insertion AUC | gain | ROAD | gain | randomisation | verdict | s/image |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for row in r["methods"]:
                label = row["name"] + (f" (layer {row['layer_name']})" if row.get("layer_name") else "")
                if row.get("ranked_by") == "magnitude":
                    label += ", by magnitude"
                final = row["randomisation"]["final"]
                lines.append(f"| {label} | {row['deletion_auc']:.3f} | {_gain(row, 'deletion')} | {row['insertion_auc']:.3f} | "
                             f"{_gain(row, 'insertion')} | {row['road_score']:.3f} | {_gain(row, 'road')} | "
                             f"{'—' if final is None else f'{final:.2f}'} | {row['verdict']} | "
                             f"{row['seconds_per_image'] * 1000:.1f} ms |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run folders or model files")
    parser.add_argument("--images", type=int, default=200, help="test images per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--randomisation-images", type=int, default=faithfulness.RANDOMISATION_IMAGES,
                        help="of those, how many for the cascading randomisation check")
    parser.add_argument("--machine", default=platform.node() or "machine", help="name used in the file names")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results")
    args = parser.parse_args(argv)
    results = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"),
               "command": " ".join(sys.argv[1:] if argv is None else argv),
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg()[0]},
               "versions": {"torch": torch.__version__, "captum": version("captum")},
               "models": [check_model(path, args.images, args.seed, args.randomisation_images) for path in args.models]}
    write_results(results, markdown(results), Path(args.out), f"explain-check-{args.machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
