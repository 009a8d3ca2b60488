"""`cnnlab bench`: the tutorial's recipe and cnnlab's presets side by side, each in its own process.

What runs, in this order, on the same machine in one go:

1. the machine: CPU, cores, load average (other work on the machine slows every number down),
   and its measured fp32 matrix-product rate — the ceiling that achieved GFLOP/s are compared to;
2. (a) the tutorial's recipe as it describes it: torchvision MNIST + `ToTensor` +
   `DataLoader(batch_size=100, shuffle=True)`, the two-conv network, Adam lr 0.01, cross-entropy
   (`tutorial_baseline`, run as `python -m cnnlab.bench --child tutorial`);
3. (b) each cnnlab preset through `cnnlab train`, exactly as a user would type it;
4. inference on the `default` preset's model: images/s at batch 1024 and the latency of one image,
   for eager PyTorch, torch.compile and ONNX Runtime.

Times are wall-clock seconds from the moment the process was started, so interpreter start-up,
imports and data loading count. "Time to X%" pauses the clock while the tutorial baseline is
evaluated (it is evaluated several times per epoch to find the moment); cnnlab presets are
evaluated when their schedule ends, so for them it is the time of the first evaluation at or
above X%. Results go to `<out>/<machine>-<date>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import CnnlabError
from .presets import PRESETS

TARGETS = (0.85, 0.9806, 0.99)  # the CIFAR-10 target; the tutorial's published figure; the usual "99% on MNIST" mark
MNIST_PRESETS = ("fast", "default", "best")
ALL_PRESETS = ("fast", "default", "best", "cifar-fast", "cifar-gpu")
# The presets that train on colour image folders: they get the CIFAR-10 folder and their own table.
CIFAR_PRESETS = tuple(name for name in ALL_PRESETS if PRESETS[name].get("colour_folders"))
# --quick: a tiny budget that only shows the pipeline works (tests use it), not a measurement.
QUICK_EPOCHS = 0.02
QUICK_TUTORIAL_EPOCHS = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="fast,default",
                        help="comma-separated cnnlab presets to run (fast, default, best, cifar-fast, cifar-gpu; 'all' for "
                             "every one; 'none' for only the tutorial baseline). On a 2-core CPU best and cifar-fast "
                             "take ~4 min each, cifar-gpu ~12 min")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per preset; the table shows the median (default 1)")
    parser.add_argument("--tutorial-epochs", type=float, default=2, help="epochs of the tutorial baseline (default 2)")
    parser.add_argument("--no-tutorial", action="store_true", help="skip the tutorial baseline")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference measurements")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny budget (a few steps of each) to check that everything runs; numbers mean nothing")
    parser.add_argument("--cifar", default=os.environ.get("CNNLAB_CIFAR10", "/tmp/cifar10"),
                        help="CIFAR-10 image folder for the cifar presets (train/ and test/ inside; default $CNNLAB_CIFAR10 "
                             "or /tmp/cifar10)")
    parser.add_argument("--data-root", help="folder holding MNIST/raw (default: $CNNLAB_DATA, else ~/.cache/cnnlab)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results (default benchmarks/results)")
    parser.add_argument("--machine", help="machine name used in the file names (default: the host name)")


def run(args: argparse.Namespace) -> int:
    presets = _parse_presets(args.presets)
    if args.seeds < 1:
        raise CnnlabError(f"--seeds: expected at least 1, got {args.seeds}")
    if set(presets) & set(CIFAR_PRESETS) and not (Path(args.cifar) / "train").is_dir():
        raise CnnlabError(f"the cifar presets need the CIFAR-10 folders: {args.cifar}/train not found "
                          "(unpack cifar10-jpg.tar.gz there or pass --cifar)")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    # The children inherit this environment unchanged: what a user typing the commands gets. On a busy
    # machine OMP_WAIT_POLICY=PASSIVE helps a lot, on a quiet one it costs ~20% (benchmarks/NOTES.md).
    env = dict(os.environ)
    if args.data_root:
        env["CNNLAB_DATA"] = args.data_root

    print("measuring the machine ...", flush=True)
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "started": _now(), "runs": []}
    ceiling = results["machine"]["matmul_gflops"]
    print(f"  {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"matmul {ceiling:.0f} GFLOP/s, load average {results['machine']['load_average'][0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as scratch:
        if not args.no_tutorial:
            epochs = QUICK_TUTORIAL_EPOCHS if args.quick else args.tutorial_epochs
            print(f"tutorial baseline, {epochs:g} epoch(s) ...", flush=True)
            row = run_tutorial(epochs, env, ceiling)
            results["runs"].append(row)
            print("  " + _row_summary(row), flush=True)
        default_model = None
        for preset in presets:
            seeds = []
            for seed in range(args.seeds):
                print(f"cnnlab train --preset {preset} --seed {seed} ...", flush=True)
                run_dir = Path(scratch) / f"{preset}-{seed}"
                row = run_preset(preset, seed, run_dir, env, ceiling, args.quick, args.cifar)
                seeds.append(row)
                print("  " + _row_summary(row), flush=True)
                if preset == "default" and seed == 0 and row.get("ok"):
                    default_model = run_dir
            results["runs"].append(_median_row(preset, seeds))
        if not args.no_inference:
            if default_model is None:  # inference is measured on the default model: train a short one
                print("inference needs a default model: training one briefly ...", flush=True)
                default_model = Path(scratch) / "default-inference"
                run_preset("default", 0, default_model, env, ceiling, True, args.cifar)
            print("inference (eager, torch.compile, ONNX Runtime) ...", flush=True)
            results["inference"] = run_inference(default_model, env, ceiling, args.quick)
            for row in results["inference"].get("runtimes", []):
                print(f"  {row['runtime']}: " + (row.get("error") or
                      f"{row['images_per_second']:,.0f} img/s at batch 1024, {row['latency_ms']:.2f} ms at batch 1"),
                      flush=True)
    results["finished"] = _now()
    results["machine"]["load_average_end"] = list(os.getloadavg())
    stem = f"{_safe_name(args.machine or platform.node() or 'machine')}-{datetime.now().strftime('%Y-%m-%d')}"
    if args.quick:
        stem += "-quick"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    print(f"\n{markdown(results)}\nwritten: {out / stem}.json and .md")
    return 0


def _parse_presets(text: str) -> list[str]:
    if text.strip() == "all":
        return list(ALL_PRESETS)
    if text.strip() in ("", "none"):
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_PRESETS]
    if unknown:
        raise CnnlabError(f"--presets: unknown preset {unknown[0]!r} (choose from {', '.join(ALL_PRESETS)}, or all)")
    return names


# --- the machine --------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb,
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            # `cnnlab train` picks a CUDA GPU when there is one; the tutorial baseline always runs on the CPU
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "not set"),
            "matmul_gflops": round(matmul_gflops(), 1)}


def matmul_gflops(size: int = 2048, seconds: float = 1.0) -> float:
    """Best fp32 matrix-product rate of a few timed rounds: the machine's practical ceiling."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def forward_flops(model, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of the conv and linear layers for one image (the rest is small change)."""
    import torch
    from torch import nn

    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2 * output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return total


# --- (a) the tutorial's recipe -------------------------------------------------------------------

def run_tutorial(epochs: float, env: dict[str, str], ceiling: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "cnnlab.bench", "--child", "tutorial", "--epochs", str(epochs)]
    lines, info = _run_child(command, env)
    evals = [json.loads(line[len("EVAL "):]) for line in lines if line.startswith("EVAL ")]
    done = next((json.loads(line[len("DONE "):]) for line in lines if line.startswith("DONE ")), None)
    row: dict[str, Any] = {"name": "tutorial recipe (DataLoader, batch 100, Adam)", "kind": "tutorial",
                           "command": " ".join(command[1:]), **info}
    if done is None:
        row["ok"] = False
        return row
    row.update(ok=True, epochs=epochs, test_accuracy=evals[-1]["test_accuracy"] if evals else None,
               images_per_second=done["images_per_second"], curve=evals)
    for target in TARGETS:
        hit = next((e for e in evals if e["test_accuracy"] >= target), None)
        row[f"seconds_to_{target:.4f}"] = round(hit["seconds"], 2) if hit else None
    from .layers import build_model, parse_layers
    from .presets import get_preset

    flops = forward_flops(build_model(parse_layers(get_preset("tutorial")["model"]), (1, 28, 28), 10), (1, 28, 28))
    _add_rates(row, flops, ceiling)
    return row


def tutorial_baseline(epochs: float, root: str, evals_per_epoch: int, started: float) -> None:
    """The tutorial's recipe, as it describes it; prints EVAL/DONE lines with JSON for the parent."""
    import torch
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import transforms

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2))   # (B, 16, 14, 14)
            self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2))  # (B, 32, 7, 7)
            self.out = nn.Linear(32 * 7 * 7, 10)

        def forward(self, x):
            return self.out(self.conv2(self.conv1(x)).flatten(1))

    torch.manual_seed(0)
    train_data = torchvision.datasets.MNIST(root, train=True, transform=transforms.ToTensor(), download=False)
    test_data = torchvision.datasets.MNIST(root, train=False, transform=transforms.ToTensor(), download=False)
    loader = DataLoader(train_data, batch_size=100, shuffle=True)
    # Evaluation goes through a DataLoader too, in large batches; its time is taken off the clock.
    test_loader = DataLoader(test_data, batch_size=1000)
    cnn = CNN()
    optimizer = torch.optim.Adam(cnn.parameters(), lr=0.01)
    loss_func = nn.CrossEntropyLoss()

    total_steps = max(1, round(epochs * len(loader)))
    eval_every = max(1, len(loader) // evals_per_epoch)
    paused, train_seconds, seen, step = 0.0, 0.0, 0, 0
    while step < total_steps:
        cnn.train()
        tick = time.perf_counter()
        for images, labels in loader:
            output = cnn(images)
            loss = loss_func(output, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(labels)
            if step % eval_every == 0 or step == total_steps:
                train_seconds += time.perf_counter() - tick
                pause = time.time()
                accuracy = _tutorial_accuracy(cnn, test_loader)
                print("EVAL " + json.dumps({"epoch": round(step / len(loader), 3), "test_accuracy": accuracy,
                                            "seconds": round(pause - started - paused, 3)}), flush=True)
                paused += time.time() - pause
                cnn.train()
                tick = time.perf_counter()
            if step == total_steps:
                break
        train_seconds += time.perf_counter() - tick
    print("DONE " + json.dumps({"images_per_second": seen / max(train_seconds, 1e-9)}), flush=True)


def _tutorial_accuracy(cnn, test_loader) -> float:
    import torch

    cnn.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in test_loader:
            correct += (cnn(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return correct / total


# --- (b) cnnlab presets --------------------------------------------------------------------------

def run_preset(preset: str, seed: int, run_dir: Path, env: dict[str, str], ceiling: float, quick: bool,
               cifar: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "cnnlab", "train", "--preset", preset, "--seed", str(seed),
               "--no-progress", "--out", str(run_dir)]
    if preset in CIFAR_PRESETS:
        command += ["--dataset", f"folder:{cifar}"]
    if quick:
        command += ["--epochs", str(QUICK_EPOCHS)]
    lines, info = _run_child(command, env)
    row: dict[str, Any] = {"name": f"cnnlab {preset}", "kind": "preset", "preset": preset, "seed": seed,
                           "command": "cnnlab " + " ".join(command[3:-2]), **info}
    history_path = run_dir / "metrics.jsonl"
    if info["returncode"] != 0 or not history_path.exists():
        row["ok"] = False
        return row
    history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    last = history[-1]
    # Each epoch's elapsed_seconds counts from the start of fit(); the process started earlier by
    # (wall - the last epoch's elapsed), which every epoch shares.
    offset = info["wall_seconds"] - last["elapsed_seconds"]
    row.update(ok=True, epochs=last["epoch"], test_accuracy=last.get("test_accuracy"),
               images_per_second=round(statistics.fmean(m["images_per_second"] for m in history), 1),
               curve=[{"epoch": m["epoch"], "test_accuracy": m.get("test_accuracy"),
                       "seconds": round(offset + m["elapsed_seconds"], 2)} for m in history])
    for target in TARGETS:
        hit = next((m for m in row["curve"] if (m["test_accuracy"] or 0) >= target), None)
        row[f"seconds_to_{target:.4f}"] = hit["seconds"] if hit else None
    config = json.loads((run_dir / "config.json").read_text())
    row["precision"] = config["train"].get("precision", "auto")
    shape = (3, 32, 32) if preset in CIFAR_PRESETS else (1, 28, 28)
    from .layers import build_model, parse_layers

    _add_rates(row, forward_flops(build_model(parse_layers(config["model"]), shape, 10), shape), ceiling)
    return row


def _add_rates(row: dict[str, Any], flops: int, ceiling: float) -> None:
    # Training costs about three forward passes: forward, and backward for inputs and for weights.
    row["forward_mflop_per_image"] = round(flops / 1e6, 2)
    achieved = 3 * flops * row["images_per_second"] / 1e9
    row["train_gflops"] = round(achieved, 1)
    row["train_gflops_of_matmul"] = round(achieved / ceiling, 3) if ceiling else None


def _median_row(preset: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per preset: the median over seeds of every number, the seeds themselves kept."""
    if len(seeds) == 1:
        return seeds[0]
    good = [s for s in seeds if s.get("ok")]
    row = {**seeds[0], "seed": "median", "ok": len(good) == len(seeds), "seeds": seeds}
    for key in ("wall_seconds", "cpu_seconds", "peak_rss_mb", "test_accuracy", "images_per_second", "train_gflops",
                "train_gflops_of_matmul", *(f"seconds_to_{t:.4f}" for t in TARGETS)):
        values = [s[key] for s in good if s.get(key) is not None]
        # a target that some seeds missed has no median time: show it as missed
        row[key] = statistics.median(values) if values and len(values) == len(good) else None
    return row


# --- inference -----------------------------------------------------------------------------------

def run_inference(model_dir: Path, env: dict[str, str], ceiling: float, quick: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "cnnlab.bench", "--child", "inference", "--model", str(model_dir)]
    if quick:
        command.append("--quick")
    lines, info = _run_child(command, env)
    done = next((json.loads(line[len("DONE "):]) for line in lines if line.startswith("DONE ")), None)
    if done is None:
        return {"ok": False, **info}
    for row in done["runtimes"]:
        if "images_per_second" in row:
            row["gflops"] = round(done["forward_flops"] * row["images_per_second"] / 1e9, 1)
            row["gflops_of_matmul"] = round(row["gflops"] / ceiling, 3) if ceiling else None
    return {"ok": True, "model": "default preset", **done, "peak_rss_mb": info["peak_rss_mb"]}


def measure_inference(model_dir: str, quick: bool) -> None:
    """Eager, torch.compile and ONNX Runtime on one model; prints a DONE line with JSON."""
    import torch

    from .checkpoint import load_model
    from .train import set_threads

    set_threads(0)  # the threads `cnnlab train` and `predict` use
    bundle = load_model(model_dir)
    model, shape = bundle.model, bundle.input_shape
    batch = torch.randn(1024, *shape)
    single = torch.randn(1, *shape)
    rounds, singles = (2, 20) if quick else (10, 300)
    results: dict[str, Any] = {"forward_flops": forward_flops(model, shape), "threads": torch.get_num_threads(),
                               "runtimes": []}

    def timed(name: str, run_batch, run_single, setup_seconds: float = 0.0) -> None:
        run_batch(batch)
        best = min(_seconds(run_batch, batch) for _ in range(rounds))
        for _ in range(10):
            run_single(single)
        latencies = sorted(_seconds(run_single, single) for _ in range(singles))
        results["runtimes"].append({"runtime": name, "images_per_second": round(len(batch) / best, 1),
                                    "latency_ms": round(1e3 * latencies[len(latencies) // 2], 3),
                                    "latency_p90_ms": round(1e3 * latencies[int(0.9 * len(latencies))], 3),
                                    "setup_seconds": round(setup_seconds, 2)})

    with torch.inference_mode():
        timed("eager", model, model)
        channels_last = model.to(memory_format=torch.channels_last)
        timed("eager channels_last", lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)),
              lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)))
        model = model.to(memory_format=torch.contiguous_format)
    if quick:  # compiling takes minutes on a small, busy CPU: far beyond a quick check's budget
        results["runtimes"].append({"runtime": "torch.compile", "error": "skipped (--quick)"})
    else:
        _measure_compiled(model, batch, single, timed, results)
    try:
        start = time.perf_counter()
        session = _onnx_session(model, shape, model_dir)
        name = session.get_inputs()[0].name
        run = lambda x: session.run(None, {name: x.numpy()})  # noqa: E731
        timed("ONNX Runtime", run, run, time.perf_counter() - start)
    except Exception as exc:  # onnxruntime missing or the export failing: record it
        results["runtimes"].append({"runtime": "ONNX Runtime", "error": _first_line(exc)})
    print("DONE " + json.dumps(results), flush=True)


def _measure_compiled(model, batch, single, timed, results) -> None:
    """torch.compile'd model, its setup time being the compile (both batch sizes are compiled)."""
    import torch

    try:
        start = time.perf_counter()
        compiled = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            compiled(batch)
            compiled(single)
            timed("torch.compile", compiled, compiled, time.perf_counter() - start)
    except Exception as exc:  # no C compiler, an unsupported op: record it, measure the rest
        results["runtimes"].append({"runtime": "torch.compile", "error": _first_line(exc)})


def _onnx_session(model, shape: tuple[int, ...], model_dir: str):
    import onnxruntime
    import torch

    path = Path(tempfile.mkdtemp(prefix="cnnlab-bench-onnx-")) / "model.onnx"
    try:
        from .export import export_model

        export_model(model_dir, "onnx", path, check_real=False)
    except ImportError:  # the export module is optional here: export directly
        torch.onnx.export(model, (torch.randn(1, *shape),), str(path), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as eager PyTorch
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shutil.rmtree(path.parent, ignore_errors=True)
    return session


def _seconds(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


# --- processes and output ------------------------------------------------------------------------

def _run_child(command: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Run a command to the end; its output lines plus wall/CPU seconds and peak memory of that process."""
    with tempfile.TemporaryFile(mode="w+") as log:
        env = {**env, "CNNLAB_BENCH_STARTED": repr(time.time())}
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        # wait4 gives this child's own resource usage (RUSAGE_CHILDREN would mix all children's peaks)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = log.read().splitlines()
    info = {"returncode": process.returncode, "wall_seconds": round(wall, 2),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is in KiB on Linux
    if process.returncode != 0:
        info["error"] = next((line for line in reversed(lines) if line.strip()), f"exit code {process.returncode}")[:300]
        print(f"  failed: {' '.join(command)}\n  " + "\n  ".join(lines[-8:]), file=sys.stderr, flush=True)
    return lines, info


def _seconds_text(value) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _row_name(row: dict[str, Any]) -> str:
    notes = (["bf16"] if row.get("precision") == "bf16" else []) + \
            ([f"median of {len(row['seeds'])} seeds"] if row.get("seeds") else [])
    return f"{row['name']} ({', '.join(notes)})" if notes else row["name"]


def _rest_of_row(row: dict[str, Any]) -> str:
    return (f"{row['wall_seconds']:.1f} s | {row['cpu_seconds']:.1f} s | {row['images_per_second']:,.0f} "
            f"| {row['train_gflops']:.1f} ({100 * (row['train_gflops_of_matmul'] or 0):.0f}%) | {row['peak_rss_mb']:,.0f} MB |")


def _row_summary(row: dict[str, Any]) -> str:
    if not row.get("ok"):
        return f"{row['name']}: failed ({row.get('error', 'see above')})"
    targets = ((0.85,) if row.get("preset") in CIFAR_PRESETS else (0.9806, 0.99))
    reached = ", ".join(f"to {100 * t:g}%: {_seconds_text(row.get(f'seconds_to_{t:.4f}'))}" for t in targets)
    return (f"{row['name']}: {100 * row['test_accuracy']:.2f}% in {row['wall_seconds']:.1f} s "
            f"(CPU {row['cpu_seconds']:.1f} s), {reached}, {row['images_per_second']:,.0f} img/s")


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown page: machine, training table, inference table."""
    m = results["machine"]
    load = m["load_average"]
    lines = [f"# cnnlab benchmark — {m['host']}, {results['started'][:10]}", ""]
    if results.get("quick"):
        lines += ["**--quick run: a few steps each, to check the pipeline. The numbers mean nothing.**", ""]
    lines += [f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}",
              f"- Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); "
              f"OMP_WAIT_POLICY {m['omp_wait_policy']}",
              f"- GPU: {m.get('gpu') or 'none (everything ran on the CPU)'}",
              f"- fp32 matrix product on the CPU: {m['matmul_gflops']:.0f} GFLOP/s (the ceiling below)",
              f"- load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, at the end "
              f"{m.get('load_average_end', [0])[0]:.2f}: above 0 means other work shared the CPU and slowed every number",
              f"- started {results['started']}, finished {results.get('finished', '?')}", "",
              "## MNIST", "",
              "| run | test acc | time to 98.06% | time to 99.0% | whole process | CPU (user+sys) | train img/s "
              "| train GFLOP/s (of matmul) | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|"]
    cifar_rows = [row for row in results["runs"] if row.get("preset") in CIFAR_PRESETS]
    for row in results["runs"]:
        if row.get("preset") in CIFAR_PRESETS:
            continue
        if not row.get("ok"):
            lines.append(f"| {row['name']} | failed: {row.get('error', '?')[:80]} | | | | | | | |")
            continue
        lines.append(f"| {_row_name(row)} | {100 * row['test_accuracy']:.2f}% | {_seconds_text(row.get('seconds_to_0.9806'))} "
                     f"| {_seconds_text(row.get('seconds_to_0.9900'))} | {_rest_of_row(row)}")
    if cifar_rows:
        lines += ["", "## CIFAR-10 (from the JPEG folders)", "",
                  "| run | test acc | time to 85% | whole process | CPU (user+sys) | train img/s | train GFLOP/s (of matmul) "
                  "| peak RSS |", "|---|---|---|---|---|---|---|---|"]
        for row in cifar_rows:
            if not row.get("ok"):
                lines.append(f"| {row['name']} | failed: {row.get('error', '?')[:80]} | | | | | | |")
                continue
            lines.append(f"| {_row_name(row)} | {100 * row['test_accuracy']:.2f}% "
                         f"| {_seconds_text(row.get('seconds_to_0.8500'))} | {_rest_of_row(row)}")
    lines += ["", "Times are from process start (imports and data loading included); the tutorial's clock pauses "
              "while it is evaluated (several times per epoch). A dash: not reached. "
              "GFLOP/s count conv and linear layers as direct convolutions, 3 x forward per training image; "
              "above 100% of the matmul rate, a runtime does fewer multiplications (e.g. Winograd convolutions). "
              "Runs marked bf16 use the CPU's bf16 instructions, about twice the fp32 rate for wide layers.", ""]
    inference = results.get("inference")
    if inference and inference.get("ok"):
        flops = inference["forward_flops"]
        lines += [f"## Inference, default model ({flops / 1e6:.2f} MFLOP per image, {inference['threads']} threads)", "",
                  "| runtime | images/s at batch 1024 | GFLOP/s (of matmul) | latency at batch 1 (median / p90) | setup |",
                  "|---|---|---|---|---|"]
        for row in inference["runtimes"]:
            if "error" in row:
                reason = row["error"] if row["error"].startswith("skipped") else f"failed: {row['error'][:80]}"
                lines.append(f"| {row['runtime']} | {reason} | | | |")
                continue
            lines.append(f"| {row['runtime']} | {row['images_per_second']:,.0f} | {row['gflops']:.1f} "
                         f"({100 * (row['gflops_of_matmul'] or 0):.0f}%) | {row['latency_ms']:.2f} / "
                         f"{row['latency_p90_ms']:.2f} ms | {row['setup_seconds']:.1f} s |")
        lines.append("")
    elif inference:
        lines += ["## Inference", "", f"failed: {inference.get('error', '?')}", ""]
    return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "machine"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _child_main(argv: list[str]) -> int:
    """`python -m cnnlab.bench --child tutorial|inference ...`: the measured processes."""
    parser = argparse.ArgumentParser(prog="python -m cnnlab.bench")
    parser.add_argument("--child", choices=["tutorial", "inference"], required=True)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--evals-per-epoch", type=int, default=6)
    parser.add_argument("--model")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    started = float(os.environ.get("CNNLAB_BENCH_STARTED", time.time()))
    if args.child == "tutorial":
        from .data.mnist import data_root

        tutorial_baseline(args.epochs, str(data_root()), args.evals_per_epoch, started)
    else:
        measure_inference(args.model, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
