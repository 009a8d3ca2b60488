#!/usr/bin/env python3
"""How quickly the page's network view answers, measured in headless Chromium (Playwright).

    python benchmarks/explorer.py --run runs/<default MNIST run>     # + random-weight presets
    python benchmarks/explorer.py --presets default,rgb32 --strokes 30 --machine my-laptop

For each model, a real uvicorn server and Chromium:
- open: navigation until the layer columns are built (GET /network/spec), then the first drawing's
  POST /network until every layer is drawn (cold);
- stroke: a stroke drawn with the mouse, from its pointerup until the view shows the answer to the
  final picture (`cnnlab:network-drawn` with nothing newer waiting), over `--strokes` strokes;
- the parts: the server's `network_activations` alone (in this process), the answer's size, and
  the page's drawing time (answer in hand -> every canvas drawn);
- the offline copy (`cnnlab explorer` page) opened from disk until drawn.
Presets without `--run` get random weights: the time does not depend on what the weights are.
Results: benchmarks/results/explorer-<machine>-<date>.{md,json}; the load average is recorded,
other work on the machine slows every number.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
if (SOURCE / "cnnlab").is_dir():  # in a checkout: measure its code, not another installed copy
    sys.path.insert(0, str(SOURCE))
sys.path.insert(0, str(SOURCE.parent))  # this checkout's `benchmarks`, for the CPU's name

import torch  # noqa: E402

from benchmarks.explain_speed import cpu_name  # noqa: E402
from cnnlab.checkpoint import save_model  # noqa: E402
from cnnlab.runs import open_run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHROMIUM = "/usr/bin/chromium"
ARM = """() => {
  // the next pointerup starts the clock; the answer to the finished picture stops it
  window.__strokeMs = null;
  const canvas = document.getElementById("canvas");
  canvas.addEventListener("pointerup", () => {
    const start = performance.now();
    document.addEventListener("cnnlab:network-drawn", function done(event) {
      if (!event.detail.last) return;
      document.removeEventListener("cnnlab:network-drawn", done);
      window.__strokeMs = performance.now() - start;
    });
  }, { once: true });
}"""
DONE = "window.__strokeMs !== null"


def random_preset_model(name: str, folder: Path) -> Path:
    """The preset's network with random weights, saved as a model file the server can load."""
    from cnnlab.layers import build_model, spec_to_list
    from cnnlab.summarize import load_spec

    _, layers, shape, classes = load_spec(preset=name)
    torch.manual_seed(0)
    model = build_model(layers, shape, classes).eval()
    c = shape[0]
    kind = "digit" if shape == (1, 28, 28) else "resize"
    path = folder / f"{name}.safetensors"
    save_model(path, model, {"layers": spec_to_list(layers), "input_shape": list(shape),
                             "classes": [str(i) for i in range(classes)],
                             "preprocessing": {"kind": kind, "channels": c, "size": list(shape[1:]),
                                               "mean": [0.5] * c, "std": [0.25] * c}})
    return path


class Server:
    """uvicorn serving `create_app(model)` in a background thread."""

    def __init__(self, model: Path):
        import uvicorn

        from cnnlab.serve import create_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(model), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def stroke(page, n: int) -> None:
    box = page.locator("#canvas").bounding_box()
    x = box["x"] + box["width"] * (0.3 + 0.05 * (n % 8))
    page.mouse.move(x, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(x + box["width"] * 0.05, box["y"] + box["height"] * 0.8, steps=12)
    page.mouse.up()


def summarise(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 1), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
            "max": round(ordered[-1], 1), "n": len(ordered)}


def measure_model(browser, name: str, path: Path, strokes: int) -> dict:
    from cnnlab.network_view import network_activations, network_spec

    bundle = open_run(path)
    spec = network_spec(bundle)
    image = torch.randint(0, 256, bundle.input_shape, dtype=torch.uint8)
    server_ms, size = [], 0
    for i in range(12):
        started = time.perf_counter()
        answer = network_activations(bundle, image, spec)
        if i >= 2:
            server_ms.append(1000 * (time.perf_counter() - started))
        size = len(json.dumps(answer))
    with Server(path) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        started = time.perf_counter()
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function("document.querySelectorAll('.net-column').length > 1", timeout=30_000)
        columns_ms = 1000 * (time.perf_counter() - started)
        page.evaluate(ARM)
        stroke(page, 0)
        page.wait_for_function(DONE, timeout=30_000)
        first_ms = page.evaluate("window.__strokeMs")
        stroke_ms = []
        for n in range(1, strokes + 1):
            page.evaluate(ARM)
            stroke(page, n)
            page.wait_for_function(DONE, timeout=30_000)
            stroke_ms.append(page.evaluate("window.__strokeMs"))
            if n % 6 == 0:
                page.click("#clear")
        render_ms = page.evaluate("window.cnnlabNetwork.renderTimings")
        page.close()
        page = browser.new_page(viewport={"width": 1400, "height": 1200})  # a second visitor: the server is warm
        started = time.perf_counter()
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function("document.querySelectorAll('.net-column').length > 1", timeout=30_000)
        reopen_ms = 1000 * (time.perf_counter() - started)
        page.close()
    return {"model": name, "input": "x".join(map(str, bundle.input_shape)), "layers": len(spec["nodes"]) - 1,
            "values_per_image": sum(n["shape"][0] * n["shape"][1] * n["shape"][2] for n in spec["nodes"]),
            "answer_kib": round(size / 1024), "open_columns_ms": round(columns_ms, 1), "reopen_columns_ms": round(reopen_ms, 1), "first_view_ms": round(first_ms, 1),
            "stroke_ms": summarise(stroke_ms), "server_ms": summarise(server_ms), "render_ms": summarise(render_ms[1:])}


def measure_offline(browser, path: Path, out_dir: Path) -> dict:
    from cnnlab.serve.offline import explorer_html

    bundle = open_run(path)
    images = [(f"random {i}", torch.randint(0, 256, bundle.input_shape, dtype=torch.uint8)) for i in range(6)]
    page_file = out_dir / "explorer.html"
    page_file.write_text(explorer_html(bundle, images), encoding="utf-8")
    times = []
    for _ in range(5):
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        started = time.perf_counter()
        page.goto(page_file.as_uri())
        page.wait_for_function("document.getElementById('network').dataset.ready === '1'")
        times.append(1000 * (time.perf_counter() - started))
        page.close()
    return {"file_kib": round(page_file.stat().st_size / 1024), "open_ms": summarise(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a trained run (or model file) measured as 'default (trained)'")
    parser.add_argument("--presets", default="default,resnet-mnist,rgb32,resnet32",
                        help="presets measured with random weights (comma-separated)")
    parser.add_argument("--strokes", type=int, default=20)
    parser.add_argument("--machine", default="vm-2core")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        models = [("default (trained)", Path(args.run))] if args.run else []
        models += [(f"{name} (random weights)", random_preset_model(name, Path(folder)))
                   for name in args.presets.split(",") if name]
        for name, path in models:
            rows.append(measure_model(browser, name, path, args.strokes))
            print(json.dumps(rows[-1]))
        offline = measure_offline(browser, models[0][1], Path(folder))
        browser.close()
    load = os.getloadavg()
    results = {"machine": args.machine, "cpu": cpu_name(), "load_average": [round(v, 2) for v in load],
               "date": datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
               "models": rows, "offline": {"model": models[0][0], **offline}}
    lines = [f"# Network view speed ({args.machine}, {results['date'][:10]})", "",
             f"CPU: {results['cpu']}; torch {torch.__version__}; load average at the end "
             f"{', '.join(map(str, results['load_average']))} (other agents share the 2 cores). Headless Chromium "
             f"through Playwright, a real uvicorn server; `python benchmarks/explorer.py` wrote this page.", "",
             "| model | input | layers | values per image | answer | open: columns (fresh server / warm) | first view "
             "| stroke → view median (p90, max) | server part median | page drawing median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stroke_ms"]
        lines.append(f"| {r['model']} | {r['input']} | {r['layers']} | {r['values_per_image']:,} | {r['answer_kib']} KiB | "
                     f"{r['open_columns_ms']:.0f} / {r['reopen_columns_ms']:.0f} ms | {r['first_view_ms']:.0f} ms | {s['median']:.0f} ms ({s['p90']:.0f}, "
                     f"{s['max']:.0f}; n={s['n']}) | {r['server_ms']['median']:.1f} ms | {r['render_ms']['median']:.1f} ms |")
    o = results["offline"]
    lines += ["", f"Offline copy (`cnnlab explorer`, {o['model']}, 6 images baked in, {o['file_kib']} KiB): opened from "
                  f"disk until drawn in {o['open_ms']['median']:.0f} ms median of {o['open_ms']['n']} "
                  f"(max {o['open_ms']['max']:.0f} ms).", "",
              "open: columns = navigation until every layer's column is built (GET /network/spec; a fresh server "
              "builds the spec and imports matplotlib for the colour tables on this first request, a warm one "
              "has them); first view = the "
              "first stroke's pointerup until all layers are drawn; stroke → view = pointerup until the view shows the "
              "answer to the finished picture (the page also sends the same picture to /inspect for the prediction "
              "bars and the older feature-map section); server part = `network_activations` alone, in the "
              "benchmark's process; page drawing = answer in hand until the maps in view are drawn (the others "
              "are drawn when scrolled to)."]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"explorer-{args.machine}-{datetime.now().strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
