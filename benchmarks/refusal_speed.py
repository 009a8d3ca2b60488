#!/usr/bin/env python3
"""How fast hostile input is refused: the timings the tests no longer assert.

    python benchmarks/refusal_speed.py            # writes benchmarks/results/refusal-speed-<date>.{md,json}

The tests check *that* a hostile picture or a tampered model file is refused without a large
allocation (tests/test_bad_input.py, by peak memory); how long it takes depends on the machine and
its load, so it is measured here instead. Two parts:
- every picture of the hostile corpus (`tests/support/hostile_images.write_corpus`: decompression
  bombs, truncated and flipped files, pickles named .png, animated GIFs, ...) through
  `Predictor.predict_bytes` of a random-weight digit model and a colour model: seconds per picture;
- opening model files tampered to ask for a huge network (a conv of 10⁹ channels, a linear layer of
  10⁹ outputs) or cut short: seconds until `open_run` refuses, and the peak memory it grew by.
The old test limits were 20 s per picture and 5 s per model file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))           # tests.support: the hostile corpus
sys.path.insert(0, str(ROOT / "src"))   # cnnlab, when run from a checkout

import torch  # noqa: E402

from cnnlab.checkpoint import read_metadata, save_model  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402
from cnnlab.layers import build_model, parse_layers  # noqa: E402
from cnnlab.predict import BadImage, Predictor  # noqa: E402
from cnnlab.runs import open_run  # noqa: E402
from tests.support.helpers import TINY_SPEC  # noqa: E402
from tests.support.hostile_images import write_corpus  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_model(folder: Path, kind: str) -> Path:
    shape = (1, 28, 28) if kind == "digit" else (3, 16, 16)
    torch.manual_seed(0)
    path = folder / kind / "model.safetensors"
    save_model(path, build_model(parse_layers(TINY_SPEC), shape, 3), {
        "layers": TINY_SPEC, "input_shape": list(shape), "classes": ["zero", "one", "two"],
        "preprocessing": {"kind": kind, "channels": shape[0], "size": list(shape[1:]), "mean": [0.5] * shape[0],
                          "std": [0.25] * shape[0]}})
    return path


def hostile_pictures(folder: Path) -> list[dict]:
    corpus = folder / "images"
    expectations = write_corpus(corpus)
    rows = []
    for kind in ("digit", "resize"):
        predictor = Predictor.from_path(tiny_model(folder, kind))
        for name in expectations:
            data = (corpus / name).read_bytes()
            started = time.perf_counter()
            try:
                predictor.predict_bytes(data)
                outcome = "answered"
            except BadImage as error:
                outcome = f"refused ({error.status})"
            rows.append({"model": kind, "picture": name, "bytes": len(data), "outcome": outcome,
                         "seconds": round(time.perf_counter() - started, 4)})
    return rows


def tampered_models(folder: Path) -> list[dict]:
    good = tiny_model(folder, "digit")
    meta = read_metadata(good)
    cases = {
        "conv of 10^9 channels": [{"type": "conv", "out_channels": 10**9, "kernel_size": 3}, "flatten", "linear"],
        "linear of 10^9 outputs": ["flatten", {"type": "linear", "out_features": 10**9}, "linear"],
    }
    rows = []
    for name, layers in cases.items():
        path = folder / name.replace(" ", "-").replace("^", "") / "model.safetensors"
        path.parent.mkdir()
        raw = good.read_bytes()
        header_length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_length])
        header["__metadata__"]["cnnlab"] = json.dumps({**meta, "layers": layers})
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + header_length:])
        rows.append(_refusal(name, path))
    cut = folder / "truncated" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[:-100])
    rows.append(_refusal("cut 100 bytes short", cut))
    return rows


def _refusal(name: str, path: Path) -> dict:
    before = _peak_mib()
    started = time.perf_counter()
    try:
        open_run(path)
        outcome = "opened (!)"
    except CnnlabError as error:
        outcome = "refused: " + str(error).split(": ", 1)[-1][:70]
    return {"model file": name, "outcome": outcome, "seconds": round(time.perf_counter() - started, 4),
            "peak memory grew MiB": round(_peak_mib() - before, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--name", default="", help="a word for the file name (e.g. the machine)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pictures = hostile_pictures(Path(tmp))
        models = tampered_models(Path(tmp))
    from cnnlab.formatting import text_table

    slowest = sorted(pictures, key=lambda r: -r["seconds"])[:10]
    date = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, load average {open('/proc/loadavg').read().split()[0]}"
    text = "\n".join([
        f"# Refusal speed, {date}", "", f"Machine: {machine}. `python benchmarks/refusal_speed.py`.", "",
        f"Hostile pictures: {len(pictures)} (corpus x 2 models), median "
        f"{sorted(r['seconds'] for r in pictures)[len(pictures) // 2]:.4f} s, slowest {slowest[0]['seconds']:.3f} s "
        "(old test limit: 20 s).", "",
        text_table([{k: str(v) for k, v in r.items()} for r in slowest], right=("bytes", "seconds"), markdown=True), "",
        "Tampered model files (old test limit: 5 s):", "",
        text_table([{k: str(v) for k, v in r.items()} for r in models], right=("seconds",), markdown=True), ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "refusal-speed" + (f"-{args.name}" if args.name else "") + f"-{date}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "pictures": pictures, "models": models}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
