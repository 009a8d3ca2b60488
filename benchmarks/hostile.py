"""Hostile inputs, each in a fresh `cnnlab` process: what cnnlab did, how long it took, its peak memory.

    python benchmarks/hostile.py                       # writes benchmarks/results/hostile-<date>.md and .json
    python benchmarks/hostile.py --cap-gb 6            # every child under a 6 GiB address-space cap (prlimit --as)
    python benchmarks/hostile.py --src OLD/src --label before   # the same inputs against another checkout's code

Every case runs as its own child process; its peak resident memory is the child's own `ru_maxrss`
(os.wait4), so the interpreter and PyTorch (about 300-400 MB) are part of every figure: the
baseline row (a normal image through `predict`) is that floor. The load average of the machine is
recorded before and after, since other jobs on a shared machine stretch the times (not the memory).
The server case attacks an in-process app (FastAPI's TestClient) with concurrent bombs to /predict
and /explain, then sends one normal image.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.hostile_images import digit_picture, pickle_payload, png16_bomb, png_bomb  # noqa: E402

SERVER = r"""
import io, sys, threading
from fastapi.testclient import TestClient
from cnnlab.serve.app import create_app
from tests.support.hostile_images import png16_bomb, png_bomb, digit_picture
app = create_app(sys.argv[1])
bombs = [png16_bomb(6300, 6300), png_bomb(30000, 30000)]
statuses = []
with TestClient(app) as client:
    def attack(route, data):
        statuses.append(client.post(route, content=data, headers={"content-type": "image/png"}).status_code)
    threads = [threading.Thread(target=attack, args=(route, data))
               for _ in range(int(sys.argv[2]) // 4) for route in ("/predict", "/explain") for data in bombs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    buffer = io.BytesIO()
    digit_picture(64, "RGB").save(buffer, "PNG")
    after = client.post("/predict", content=buffer.getvalue(), headers={"content-type": "image/png"}).status_code
counts = {s: statuses.count(s) for s in sorted(set(statuses))}
print(f"{len(statuses)} bombs: " + ", ".join(f"{n}x {s}" for s, n in counts.items()) + f"; then a normal image: {after}",
      file=sys.stderr)
"""


def rgb_png_bomb(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG of zeros, streamed: a few hundred KB for 64 Mpixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def alias_bomb(*keys: str) -> str:
    """A "billion laughs" YAML file of ~400 bytes: 9 levels of 9 aliases (10^9 values once expanded),
    all inside the value of the setting `keys` names, so that an error about that value renders it."""
    lines = [f"{'  ' * depth}{key}:" for depth, key in enumerate(keys)]
    pad = "  " * len(keys)
    lines.append(f"{pad}- &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]")
    lines += [f"{pad}- &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    return "\n".join(lines) + "\n"


def make_cases(work: Path) -> list[tuple[str, list[str]]]:
    """(what is sent, the cnnlab arguments) for every case; files are written under `work`."""
    import torch

    from cnnlab.checkpoint import save_model
    from cnnlab.layers import build_model, parse_layers

    spec = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, "relu",
            {"type": "maxpool", "kernel_size": 2}, "flatten", {"type": "linear"}]
    model = work / "model"
    model.mkdir()
    torch.manual_seed(0)
    save_model(model / "model.safetensors", build_model(parse_layers(spec), (3, 16, 16), 2),
               {"layers": spec, "input_shape": [3, 16, 16], "classes": ["a", "b"], "dataset": "x", "epoch": 1,
                "preprocessing": {"kind": "resize", "channels": 3, "size": [16, 16], "mean": [0.5] * 3, "std": [0.25] * 3},
                "metrics": {}, "config": {}})
    files = {"normal.png": None, "grey16-6300.png": png16_bomb(6300, 6300), "bits-30000.png": png_bomb(30000, 30000),
             "bits-6000.png": png_bomb(6000, 6000)}
    for name, data in files.items():
        if data is None:
            digit_picture(64, "RGB").save(work / name)
        else:
            (work / name).write_bytes(data)
    os.mkfifo(work / "fifo.png")
    folder = work / "folder"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            digit_picture(32, "RGB").save(folder / label / f"{i}.png")
    (folder / "a" / "huge.png").write_bytes(rgb_png_bomb(8000, 8000))
    (work / "bomb.yaml").write_text(alias_bomb("train", "lr"))
    (work / "space.yaml").write_text("base: tutorial\n" + alias_bomb("space", "train.lr", "choices"))
    clean = work / "clean-folder"
    for label in ("a", "b"):
        (clean / label).mkdir(parents=True)
        for i in range(3):
            digit_picture(32, "RGB").save(clean / label / f"{i}.png")
    (work / "ok-space.yaml").write_text("base: tutorial\nspace: {train.lr: {low: 0.001, high: 0.1}}\n")
    (work / "weights.SAFETENSORS").write_bytes(pickle_payload(work / "PICKLE-WAS-EXECUTED"))
    (work / "timm.yaml").write_text(json.dumps({
        "model": [{"type": "timm", "name": "test_resnet", "pretrained": str(work / "weights.SAFETENSORS")},
                  "global_avg_pool", {"type": "linear"}],
        "data": {"dataset": f"folder:{clean}", "image_size": 32}, "train": {"epochs": 1, "threads": 1}}))
    compare = []
    for name, metric in (("r1", [0.5] * 3), ("r2", float("nan"))):
        (work / name).mkdir()
        (work / name / "config.json").write_text(json.dumps({"train": {"lr": 0.1 if name == "r1" else 0.2}}))
        (work / name / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": metric}) + "\n")
        compare.append(str(work / name))
    out = str(work / "runs")
    return [
        ("baseline: a normal 64x64 PNG through predict", ["predict", str(model), str(work / "normal.png")]),
        ("16-bit grey PNG 6300x6300 (77 KB file, 79 MB decoded)", ["predict", str(model), str(work / "grey16-6300.png")]),
        ("1-bit PNG 30000x30000 (900 Mpixel)", ["predict", str(model), str(work / "bits-30000.png")]),
        ("1-bit PNG 6000x6000 (36 Mpixel, under every limit)", ["predict", str(model), str(work / "bits-6000.png")]),
        ("predict /dev/zero", ["predict", str(model), "/dev/zero"]),
        ("predict a FIFO with no writer", ["predict", str(model), str(work / "fifo.png")]),
        ("explain /dev/zero", ["explain", str(model), "/dev/zero", "--out", str(work / "expl")]),
        ("folder dataset with an 8000x8000 RGB PNG (256 MB in memory once decoded)",
         ["train", "--dataset", f"folder:{folder}", "--epochs", "1", "--out", out + "/f", "--no-progress"]),
        ("the same with data.skip_bad=true",
         ["train", "--dataset", f"folder:{folder}", "--set", "data.skip_bad=true", "--epochs", "0.1", "--out", out + "/g",
          "--no-progress"]),
        (f"config alias bomb ({len((work / 'bomb.yaml').read_bytes())} bytes, 10^9 values in train.lr)", ["train", "--config", str(work / "bomb.yaml"), "--out", out + "/b"]),
        ("search-space alias bomb (in space.train.lr.choices)", ["tune", str(work / "space.yaml"), "--trials", "1", "--out", out + "/t"]),
        ("pretrained: weights.SAFETENSORS holding a pickle",
         ["train", "--config", str(work / "timm.yaml"), "--out", out + "/p", "--no-progress"]),
        ("compare: a list-valued metric and NaN, --json", ["compare", *compare, "--json"]),
        ("lr-find --end inf", ["lr-find", "--preset", "tutorial", "--end", "inf"]),
        ("tune --storage /dev/null", ["tune", str(work / "ok-space.yaml"), "--trials", "1", "--storage", "/dev/null"]),
        ("server: 8 concurrent bombs to /predict and /explain", ["SERVER", str(model), "8"]),
        ("server: 32 concurrent bombs to /predict and /explain", ["SERVER", str(model), "32"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-gb", type=float, default=6.0, help="address-space cap of every child (default 6 GiB)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--src", default=str(ROOT / "src"), help="the cnnlab source to test (default this checkout's)")
    parser.add_argument("--label", default="", help="added to the results' file name, e.g. before")
    args = parser.parse_args()
    cap = int(args.cap_gb * 2**30) if args.cap_gb else None
    env = dict(os.environ, CNNLAB_OFFLINE="1", OMP_NUM_THREADS="1", CNNLAB_CACHE=tempfile.mkdtemp(prefix="hostile-cache-"),
               PYTHONPATH=os.pathsep.join([str(Path(args.src).resolve()), str(ROOT)]))
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        work = Path(tmp)
        for what, case_args in make_cases(work):
            result = _wait_with_rusage(case_args, cap, env, args.timeout)
            result["input"] = what
            rows.append(result)
            print(f"{what}: exit {result['exit']}, peak {result['peak_mb']} MB, {result['seconds']} s: {result['line']}",
                  flush=True)
        executed = (work / "PICKLE-WAS-EXECUTED").exists()
    load_after = os.getloadavg()
    date = datetime.date.today().isoformat() + (f"-{args.label}" if args.label else "")
    header = (f"# Hostile inputs, {date}\n\nMachine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
              f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after), Python {platform.python_version()}. "
              f"Every case in a fresh process under a {args.cap_gb:g} GiB address-space cap; peak = the child's ru_maxrss "
              f"(interpreter and PyTorch included). Code: {args.src}. Pickle payload executed: {'YES' if executed else 'no'}.\n\n"
              "| input | exit | what cnnlab said | peak RSS | time |\n|---|---|---|---|---|\n")
    table = "".join(f"| {r['input']} | {r['exit']} | {r['line'].replace('|', '/')} | "
                    f"{r['peak_mb'] if r['peak_mb'] is not None else '—'} MB | {r['seconds']} s |\n" for r in rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hostile-{date}.md").write_text(header + table)
    (out / f"hostile-{date}.json").write_text(json.dumps({"load_before": load_before, "load_after": load_after,
                                                          "pickle_executed": executed, "cap_gb": args.cap_gb,
                                                          "rows": rows}, indent=1))
    print(f"wrote {out / f'hostile-{date}.md'}")
    return 1 if executed or any(r.get("traceback") or r["exit"] == "timeout" for r in rows) else 0


def _wait_with_rusage(args: list[str], cap: int | None, env: dict[str, str], timeout: float) -> dict:
    """`run_case`, with the child's own peak memory from os.wait4 (not the maximum over all children)."""
    command = ([sys.executable, "-c", SERVER, *args[1:]] if args[0] == "SERVER"
               else [sys.executable, "-m", "cnnlab", *args])

    def limit():
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    started = time.perf_counter()
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        process = subprocess.Popen(command, stdout=out_file, stderr=err_file, env=env, cwd=ROOT, preexec_fn=limit)
        deadline = started + timeout
        status, usage, timed_out = None, None, False
        while status is None:
            pid, status_code, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                status, usage = status_code, rusage
                break
            if time.perf_counter() > deadline:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        err_file.seek(0)
        out_file.seek(0)
        lines = [line for line in err_file.read().decode(errors="replace").splitlines() if line.strip()]
        stdout = out_file.read().decode(errors="replace")
    shown = next((line for line in lines if line.startswith("error")), lines[-1] if lines else " ".join(stdout.split())[:120])
    if args[0] == "compare":
        try:
            json.loads(stdout, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
            shown = "valid JSON (no NaN); the list and NaN metrics are null"
        except ValueError as exc:
            shown = f"NOT valid JSON ({exc})"
    if timed_out:
        shown = f"no answer in {timeout:.0f} s"
    return {"exit": "timeout" if timed_out else process.returncode, "line": shown[:220],
            "peak_mb": round(usage.ru_maxrss / 1024) if usage else None, "seconds": round(seconds, 1),
            "traceback": any("Traceback" in line for line in lines)}


if __name__ == "__main__":
    sys.exit(main())
