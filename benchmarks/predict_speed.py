#!/usr/bin/env python3
"""`cnnlab predict` and `cnnlab serve` beside the plain runtimes, on a folder of image files.

    python benchmarks/predict_speed.py RUN [RUN ...] --images /tmp/cifar10/test --machine vm-2core

For each run folder (any: an `rgb32` run, a pretrained-backbone run, ...), in one go on one machine:

1. files: every image under `--images` classified by
   - `cnnlab predict RUN IMAGES --json`, as a user types it after `cnnlab export RUN` (which this
     benchmark runs first: RUN/model.onnx, so predict's default runtime is ONNX Runtime), and with
     `--runtime torch`;
   - a plain PyTorch loop: a `DataLoader` (PIL decode, the model's own resize/crop and normalisation,
     2 workers) feeding `model.eval()` under `torch.inference_mode()`, batch 256;
   - ONNX Runtime on the model `cnnlab export` wrote, fed by the same DataLoader;
   each as its own process, timed from start to exit (imports and model loading count for all three),
   with its peak memory (the process's maximum resident set, from wait4) and its labels, so the table
   also says how often the three agree;
2. the server: `cnnlab serve RUN` (its default runtime, and `--runtime torch`) against a plain FastAPI app around the same PyTorch model and one
   around ONNX Runtime, each on 127.0.0.1: `--clients` concurrent clients post single JPEGs from the
   folder (`--requests` in all, after a warm-up), requests/s and p50/p99 latency, and the server's peak memory.

The plain arms implement the colour models' preprocessing (shorter side to the input size, centre
crop, the stored mean and std), so any run trained on image folders fits, a pretrained-backbone run
(`--preset finetune`, `photos`) as well as `rgb32`; a digit model's digit finding is not rewritten there.

`--rounds N` runs cnnlab's default and plain ONNX Runtime N times in all, alternated (files, then server), and
tables each round's ratio and the median: the machine's noise between two runs of the same arm is often larger
than the difference between the arms. `--arms onnx` leaves the slow PyTorch arms out.

Results: benchmarks/results/predict-<machine>-<date>.{md,json,png}. Everything is bounded: a time
limit per process, a request count, and every server is stopped.
"""


import argparse  # (no `from __future__ import annotations`: FastAPI reads the plain servers' annotations)
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, by design
BATCH = 256
EXTENSIONS = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------------------------------------
# The plain arms: what a user would write without cnnlab (run in their own process: `--arm`)
# ---------------------------------------------------------------------------------------------

def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS)


def _plain_loader(run_dir: str, folder: str):
    """A DataLoader over the folder's files with the run's own preprocessing (PIL + torchvision-style steps)."""
    import numpy as np
    import torch
    from PIL import Image

    from cnnlab.runs import open_run

    run = open_run(run_dir)
    prep = run.preprocessing
    files = image_files(Path(folder))
    mean = np.array(prep.mean, dtype=np.float32)[:, None, None]
    std = np.array(prep.std, dtype=np.float32)[:, None, None]
    h, w = prep.size

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            image = Image.open(files[i]).convert("RGB" if prep.channels == 3 else "L")
            scale = max(h / image.height, w / image.width)   # shorter side to the input size, centre crop
            size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
            if size != image.size:
                image = image.resize(size, Image.BILINEAR)
            left, top = (image.width - w) // 2, (image.height - h) // 2
            array = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
            array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
            return torch.from_numpy((array - mean) / std)

    loader = torch.utils.data.DataLoader(Files(), batch_size=BATCH, num_workers=2)
    return run, files, loader


def arm_torch(run_dir: str, folder: str) -> dict[str, Any]:
    import torch

    run, files, loader = _plain_loader(run_dir, folder)
    model = run.model.eval()
    labels: list[int] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            labels += model(x).argmax(1).tolist()
    return {"labels": labels, "loop_s": time.perf_counter() - started, "files": [str(f) for f in files]}


def arm_onnx(run_dir: str, folder: str, onnx_path: str) -> dict[str, Any]:
    import onnxruntime

    run, files, loader = _plain_loader(run_dir, folder)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    labels: list[int] = []
    started = time.perf_counter()
    for x in loader:
        (logits,) = session.run(None, {name: x.numpy()})
        labels += logits.argmax(1).tolist()
    return {"labels": labels, "loop_s": time.perf_counter() - started, "files": [str(f) for f in files]}


def serve_plain(run_dir: str, port: int, onnx_path: "str | None") -> None:
    """A plain FastAPI app: POST /predict with one image file -> {"label", "confidence"}."""
    import io

    import numpy as np
    import torch
    import uvicorn
    from fastapi import FastAPI, UploadFile
    from PIL import Image

    from cnnlab.runs import open_run

    run = open_run(run_dir)
    prep = run.preprocessing
    mean = np.array(prep.mean, dtype=np.float32)[:, None, None]
    std = np.array(prep.std, dtype=np.float32)[:, None, None]
    h, w = prep.size
    model = run.model.eval()
    if onnx_path:
        import onnxruntime

        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/predict")
    def predict(file: UploadFile):  # a plain `def`: FastAPI runs it in its thread pool
        image = Image.open(io.BytesIO(file.file.read())).convert("RGB" if prep.channels == 3 else "L")
        image = image.resize((w, h), Image.BILINEAR) if image.size != (w, h) else image
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        x = ((array - mean) / std)[None].astype(np.float32)
        if onnx_path:
            logits = session.run(None, {name: x})[0][0]
        else:
            with torch.inference_mode():
                logits = model(torch.from_numpy(x))[0].numpy()
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return {"label": run.classes[int(p.argmax())], "confidence": float(p.max())}

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def timed_process(command: list[str], env: dict, limit: float, stdout=subprocess.PIPE) -> dict[str, Any]:
    """Run `command` to its end: wall seconds, peak resident memory (MB), exit code, stdout."""
    load = load_average()
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return {"error": f"over the time limit of {limit:.0f} s"}
    wall = time.perf_counter() - started
    return {"seconds": wall, "returncode": process.returncode, "stdout": out, "stderr": err.decode(errors="replace")[-2000:],
            "load_before": load, "load_after": load_average()}


def peak_of(command: list[str], env: dict, limit: float) -> dict[str, Any]:
    """`timed_process` in a wrapper that reports the command's own peak RSS (RUSAGE_CHILDREN of a process
    with that one child: the benchmark's own children would all count in one maximum)."""
    wrapper = [sys.executable, __file__, "--arm", "exec", "--"] + command
    result = timed_process(wrapper, env, limit)
    if "error" in result:
        return result
    text = result["stdout"].decode(errors="replace")
    marker = text.rfind("\nPEAK_RSS_MB ")
    if marker < 0 or result["returncode"] not in (0, 1):
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({result['returncode']}): {result['stderr']}")
    result["peak_rss_mb"] = float(text[marker:].split()[1])
    result["stdout"] = text[:marker + 1]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def load_round(url: str, payloads: list[bytes], clients: int, total: int, deadline: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0

    async def client(http) -> None:
        nonlocal sent
        while sent < total and time.monotonic() < deadline:
            data = payloads[sent % len(payloads)]
            sent += 1
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/predict", files={"file": ("image.jpg", data, "image/jpeg")})
            except Exception as exc:  # any transport failure counts as an error
                errors.append(f"{type(exc).__name__}: {exc}"[:160])
                continue
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:120]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else float("nan")

    return {"requests": len(latencies), "errors": len(errors), "error_samples": errors[:3], "seconds": round(elapsed, 2),
            "requests_per_second": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_server(name: str, command: list[str], env: dict, payloads: list[bytes], clients: int, requests: int,
                 limit: float) -> dict[str, Any]:
    import httpx

    port = free_port()
    url = f"http://{HOST}:{port}"
    server = subprocess.Popen(command + ["--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + limit
    try:
        while True:
            if server.poll() is not None:
                return {"arm": name, "error": f"the server exited: {server.stderr.read().decode()[-500:]}"}
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return {"arm": name, "error": "the server did not come up in time"}
            time.sleep(0.2)
        asyncio.run(load_round(url, payloads, clients, min(100, requests), deadline))  # warm-up: not counted
        load = load_average()
        result = asyncio.run(load_round(url, payloads[100:] + payloads[:100], clients, requests, deadline))
        result.update({"arm": name, "peak_rss_mb": round(peak_rss_mb(server.pid), 1), "load_before": load,
                       "load_after": load_average()})
        return result
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


ONNX_PAIR = ("cnnlab predict", "ONNX Runtime (same DataLoader)")            # compared round by round (--rounds)
SERVER_PAIR = ("cnnlab serve", "plain FastAPI + ONNX Runtime")


def bench_run(run_dir: Path, images: Path, args, env: dict, work: Path) -> dict[str, Any]:
    files = image_files(images)
    # `cnnlab export RUN` writes RUN/model.onnx, where `cnnlab predict --runtime onnx` looks for it
    onnx_path = run_dir / "model.onnx"
    export = subprocess.run([sys.executable, "-m", "cnnlab", "export", str(run_dir), "--format", "onnx"] + args.export_args,
                            env=env, capture_output=True, text=True, timeout=args.limit)
    if export.returncode != 0:
        raise SystemExit(f"cnnlab export {run_dir} failed: {export.stderr[-1000:]}")
    me = [sys.executable, __file__]
    classes = json.loads((run_dir / "model.json").read_text())["classes"] if (run_dir / "model.json").exists() else None
    predict = [sys.executable, "-m", "cnnlab", "predict", str(run_dir), str(images), "--json"]
    file_arms = [("cnnlab predict", predict + args.predict_args),  # its default: ONNX Runtime, the file being there
                 ("cnnlab predict --runtime torch", predict + ["--runtime", "torch"] + args.predict_args),
                 ("PyTorch loop (DataLoader, inference_mode)", me + ["--arm", "torch", str(run_dir), str(images)]),
                 ("ONNX Runtime (same DataLoader)", me + ["--arm", "onnx", str(run_dir), str(images), str(onnx_path)])]
    serve = [sys.executable, "-m", "cnnlab", "serve", str(run_dir), "--host", HOST, "--log-level", "warning"]
    server_arms = [("cnnlab serve", serve + args.serve_args),  # its default: ONNX Runtime, as predict
                   ("cnnlab serve --runtime torch", serve + ["--runtime", "torch"] + args.serve_args),
                   ("plain FastAPI + PyTorch", me + ["--arm", "serve-torch", str(run_dir)]),
                   ("plain FastAPI + ONNX Runtime", me + ["--arm", "serve-onnx", str(run_dir), str(onnx_path)])]
    if args.arms == "onnx":
        file_arms = [arm for arm in file_arms if arm[0] in ONNX_PAIR]
        server_arms = [arm for arm in server_arms if arm[0] in SERVER_PAIR]
    payloads = [f.read_bytes() for f in files[:: max(1, len(files) // 2000)]] if args.requests else []
    arms = file_round(run_dir, files, file_arms, classes, env, args.limit)
    servers = server_round(run_dir, server_arms, env, payloads, args)
    rounds = [round_ratios(arms, servers)]
    for _ in range(args.rounds - 1):  # the pairs again, alternated, on the same machine minutes apart
        rounds.append(round_ratios(file_round(run_dir, files, [a for a in file_arms if a[0] in ONNX_PAIR], classes, env,
                                              args.limit),
                                   server_round(run_dir, [a for a in server_arms if a[0] in SERVER_PAIR], env, payloads, args)))
    return {"run": str(run_dir), "images": len(files), "files": arms, "server": servers, "rounds": rounds}


def file_round(run_dir: Path, files: list[Path], file_arms: list, classes, env: dict, limit: float) -> list[dict[str, Any]]:
    """Each file arm once, as its own process: time, peak memory, and how often its labels agree with cnnlab's."""
    arms: list[dict[str, Any]] = []
    labels: dict[str, list[str]] = {}
    for name, command in file_arms:
        print(f"  {run_dir.name}: {name} ...", flush=True)
        result = peak_of(command, env, limit)
        if "error" in result:
            arms.append({"arm": name, "error": result["error"]})
            continue
        text = result.pop("stdout")
        if name.startswith("cnnlab predict"):
            lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            labels[name] = [line.get("label") for line in sorted(lines, key=lambda d: d["path"])]
            loop = None
        else:
            out = json.loads([line for line in text.splitlines() if line.strip()][-1])
            order = sorted(range(len(out["files"])), key=lambda i: out["files"][i])
            names = classes or [str(i) for i in range(max(out["labels"]) + 1)]
            labels[name] = [names[out["labels"][i]] for i in order]
            loop = out["loop_s"]
        arms.append({"arm": name, "seconds": round(result["seconds"], 2), "loop_seconds": round(loop, 2) if loop else None,
                     "images": len(labels[name]), "images_per_second": round(len(files) / result["seconds"], 1),
                     "peak_rss_mb": round(result["peak_rss_mb"], 1), "load_before": result["load_before"],
                     "load_after": result["load_after"]})
    reference = labels.get("cnnlab predict")
    for arm in arms:
        if reference and arm["arm"] in labels and arm["arm"] != "cnnlab predict":
            same = sum(a == b for a, b in zip(reference, labels[arm["arm"]]))
            arm["same_label_as_cnnlab"] = f"{same}/{len(reference)}"
    return arms


def server_round(run_dir: Path, server_arms: list, env: dict, payloads: list[bytes], args) -> list[dict[str, Any]]:
    servers = []
    for name, command in server_arms if args.requests else []:
        print(f"  {run_dir.name}: {name} ...", flush=True)
        servers.append(bench_server(name, command, env, payloads, args.clients, args.requests, args.limit))
    return servers


def round_ratios(arms: list[dict[str, Any]], servers: list[dict[str, Any]]) -> dict[str, Any]:
    """One round's throughputs of cnnlab's default and plain ONNX Runtime, and their ratio (None where an arm failed)."""
    def pair(rows: list[dict[str, Any]], names: tuple[str, str], key: str) -> dict[str, Any]:
        found = {row["arm"]: row.get(key) for row in rows if "error" not in row}
        ours, theirs = found.get(names[0]), found.get(names[1])
        return {"cnnlab": ours, "plain_onnx": theirs, "ratio": round(ours / theirs, 3) if ours and theirs else None}

    return {"predict": pair(arms, ONNX_PAIR, "images_per_second"), "serve": pair(servers, SERVER_PAIR, "requests_per_second")}


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Predictions beside the runtimes ({results['machine']}, {results['date']})", "",
             f"{results['cpu']}, {results['cores']} cores; torch {results['torch']}, onnxruntime {results['onnxruntime']}. "
             f"Load average before/after each row: other work on the machine slows every number down.",
             f"Command: `{results['command']}`", ""]
    for run in results["runs"]:
        lines += [f"## {run['run']}: {run['images']:,} image files", "",
                  "| arm | whole process | images/s | loop only | peak memory | same label as cnnlab | load before/after |",
                  "|---|---|---|---|---|---|---|"]
        for arm in run["files"]:
            if "error" in arm:
                lines.append(f"| {arm['arm']} | {arm['error']} | | | | | |")
                continue
            loop = f"{arm['loop_seconds']:.2f} s" if arm.get("loop_seconds") else "—"
            lines.append(f"| {arm['arm']} | {arm['seconds']:.2f} s | {arm['images_per_second']:,.0f} | {loop} | "
                         f"{arm['peak_rss_mb']:,.0f} MB | {arm.get('same_label_as_cnnlab', '—')} | "
                         f"{arm['load_before']} / {arm['load_after']} |")
        if run["server"]:
            lines += ["", f"Server: {results['clients']} concurrent clients on 127.0.0.1, {results['requests']} single-JPEG "
                          "requests after 100 of warm-up.", "",
                      "| server | requests/s | p50 | p99 | errors | peak memory | load before/after |", "|---|---|---|---|---|---|---|"]
            for s in run["server"]:
                if "error" in s:
                    lines.append(f"| {s['arm']} | {s['error']} | | | | | |")
                    continue
                lines.append(f"| {s['arm']} | {s['requests_per_second']:,.1f} | {s['p50_ms']} ms | {s['p99_ms']} ms | "
                             f"{s['errors']} | {s['peak_rss_mb']:,.0f} MB | {s['load_before']} / {s['load_after']} |")
        if len(run.get("rounds", [])) > 1:
            lines += ["", f"cnnlab's default against plain ONNX Runtime, {len(run['rounds'])} rounds (round 1 is the tables "
                          "above; the others ran the two arms again, one after the other):", "",
                      "| round | predict img/s: cnnlab / plain | ratio | serve req/s: cnnlab / plain | ratio |",
                      "|---|---|---|---|---|"]
            for i, r in enumerate(run["rounds"], 1):
                lines.append(f"| {i} | {_cell(r['predict'])} | {_x(r['predict']['ratio'])} | {_cell(r['serve'])} | "
                             f"{_x(r['serve']['ratio'])} |")
            medians = [statistics.median(x) if x else None for x in
                       ([r[k]["ratio"] for r in run["rounds"] if r[k]["ratio"]] for k in ("predict", "serve"))]
            lines.append(f"| **median** | | **{_x(medians[0])}** | | **{_x(medians[1])}** |")
        lines.append("")
    return "\n".join(lines)


def _cell(pair: dict[str, Any]) -> str:
    return f"{pair['cnnlab']:,.0f} / {pair['plain_onnx']:,.0f}" if pair["cnnlab"] and pair["plain_onnx"] else "—"


def _x(value: "float | None") -> str:
    return f"{value:.2f}x" if value else "—"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 2.2 + 1.4 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        files = [a for a in run["files"] if "error" not in a]
        row[0].barh([a["arm"] for a in files], [a["images_per_second"] for a in files], color="#4c72b0")
        row[0].set_xlabel("images/s, whole process (higher is better)")
        row[0].set_title(Path(run["run"]).name + ": files", fontsize=10)
        servers = [s for s in run["server"] if "error" not in s]
        if servers:
            row[1].barh([s["arm"] for s in servers], [s["requests_per_second"] for s in servers], color="#55a868")
            row[1].set_xlabel(f"requests/s, {results['clients']} clients (higher is better)")
            row[1].set_title(Path(run["run"]).name + ": server", fontsize=10)
        else:
            row[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders to compare (any preset)")
    parser.add_argument("--images", required=True, help="a folder of image files (searched recursively)")
    parser.add_argument("--machine", default="vm", help="a name for the machine in the results' file names")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="server requests per arm (0: no server test)")
    parser.add_argument("--limit", type=float, default=600, help="seconds allowed per process")
    parser.add_argument("--predict-args", default="", help="extra flags for cnnlab predict (quoted)")
    parser.add_argument("--serve-args", default="", help="extra flags for cnnlab serve (quoted)")
    parser.add_argument("--export-args", default="", help="extra flags for cnnlab export (quoted)")
    parser.add_argument("--arms", choices=("all", "onnx"), default="all",
                        help="all, or onnx: only cnnlab's default beside plain ONNX Runtime (the slow PyTorch arms left out)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run cnnlab's default and plain ONNX Runtime this many times, alternated (files and server), "
                             "and report each round's ratio and the median: one run of a noisy machine is one sample")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 64 and 0 <= args.requests <= 20_000 and 1 <= args.rounds <= 20):
        parser.error("--clients 1..64, --requests 0..20000, --rounds 1..20")
    args.predict_args, args.serve_args, args.export_args = args.predict_args.split(), args.serve_args.split(), args.export_args.split()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "CNNLAB_OFFLINE": "1"}
    import onnxruntime
    import torch

    results: dict[str, Any] = {
        "machine": args.machine, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "clients": args.clients, "requests": args.requests, "rounds": args.rounds,
        "command": "python benchmarks/predict_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]), "runs": []}
    with tempfile.TemporaryDirectory(prefix="cnnlab-predict-bench-") as work:
        for run in args.runs:
            print(f"{run}:", flush=True)
            results["runs"].append(bench_run(Path(run), Path(args.images), args, env, Path(work)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"predict-{args.machine}-{datetime.now(timezone.utc).strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    stem.with_suffix(".md").write_text(text)
    chart(results, stem.with_suffix(".png"))
    print(text)
    print(f"written: {stem}.{{md,json,png}}")
    return 0


def _cpu_name() -> str:
    """The CPU's name, as every results table in benchmarks/ gives it (`explain_speed.cpu_name`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.explain_speed import cpu_name

    return cpu_name()


def _worker(argv: list[str]) -> int:
    arm = argv[0]
    if arm == "exec":  # run the command, then report its own peak memory
        code = subprocess.run(argv[2:]).returncode
        sys.stdout.flush()
        print(f"\nPEAK_RSS_MB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f}", flush=True)
        return code
    if arm == "torch":
        print(json.dumps(arm_torch(argv[1], argv[2])))
    elif arm == "onnx":
        print(json.dumps(arm_onnx(argv[1], argv[2], argv[3])))
    elif arm in ("serve-torch", "serve-onnx"):
        port = int(argv[argv.index("--port") + 1])
        serve_plain(argv[1], port, argv[2] if arm == "serve-onnx" else None)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--arm":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit(main())
