#!/usr/bin/env python3
"""Inference speed of one trained model: eager PyTorch (also channels_last), torch.compile and ONNX
Runtime, each as images/s at batch 1024 and the latency of one image.

`benchmarks/run.py` starts it in its own process on the `default` preset's model and reads the
JSON after `DONE`:

    python benchmarks/inference.py --model RUN_DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def forward_flops(model, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of the conv and linear layers for one image (the rest is small change)."""
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


def measure_inference(model_dir: str, quick: bool) -> None:
    """Eager, torch.compile and ONNX Runtime on one model; prints a DONE line with JSON."""
    from cnnlab.runs import open_run
    from cnnlab.runtime import set_threads

    set_threads(0)  # the threads `cnnlab train` and `predict` use
    bundle = open_run(model_dir)
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

    path = Path(tempfile.mkdtemp(prefix="cnnlab-bench-onnx-")) / "model.onnx"
    try:
        from cnnlab.export import export_model

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

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/inference.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run folder or model .safetensors file")
    parser.add_argument("--quick", action="store_true", help="a few rounds, no torch.compile: checks that it runs")
    args = parser.parse_args(argv)
    measure_inference(args.model, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
