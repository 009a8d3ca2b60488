"""A bounded load test of `cnnlab serve` on 127.0.0.1: throughput, latency, errors, memory.

    python benchmarks/load_test.py                      # a random-weight digit model, 50 clients, 2 x 1500 requests
    python benchmarks/load_test.py runs/mnist --clients 50 --requests 2000 --json load.json

It starts `cnnlab serve` on a free loopback port, waits for /health, warms up, then sends
`--requests` requests in each of two rounds from `--clients` concurrent clients (httpx, asyncio)
and stops the server. Most requests are a valid digit PNG; `--bad-fraction` of them are broken or
hostile files from tests/support/hostile_images.py, which must be refused with a 4xx. An *error* is a
transport failure, a 5xx, or a status other than the one expected. Memory is the server's RSS
(from /proc) after the warm-up and after each round: "flat" means round 2 did not grow it.
Everything is bounded: request count, a total time limit, and the server is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_model(folder: Path) -> Path:
    """A random-weight MNIST-shaped model (the server's cost does not depend on its accuracy)."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from cnnlab.checkpoint import save_model
    from cnnlab.layers import build_model, parse_layers

    spec = [{"type": "conv", "out_channels": 16, "kernel_size": 5, "padding": 2}, "relu", {"type": "maxpool", "kernel_size": 2},
            {"type": "conv", "out_channels": 32, "kernel_size": 5, "padding": 2}, "relu", {"type": "maxpool", "kernel_size": 2},
            "flatten", {"type": "linear"}]
    torch.manual_seed(0)
    save_model(folder / "model.safetensors", build_model(parse_layers(spec), (1, 28, 28), 10), {
        "layers": spec, "input_shape": [1, 28, 28], "classes": [str(d) for d in range(10)], "dataset": "random",
        "preprocessing": {"kind": "digit", "channels": 1, "size": [28, 28], "mean": [0.1307], "std": [0.3081]},
        "epoch": 0, "metrics": {}, "config": {}})
    return folder


def payloads(folder: Path) -> tuple[bytes, list[tuple[str, bytes, str]]]:
    """(a valid digit PNG, [(name, bytes, 'ok'|'reject'|'any')...]) from the hostile corpus."""
    sys.path.insert(0, str(ROOT))
    from tests.support.hostile_images import digit_picture, write_corpus

    buffer = io.BytesIO()
    digit_picture(96).save(buffer, "PNG")
    expectations = write_corpus(folder / "hostile")
    bad = [(name, (folder / "hostile" / name).read_bytes(), expectation) for name, expectation in expectations.items()
           if name != "large-but-allowed.png"]  # 36 Mpixel decodes are a different benchmark
    return buffer.getvalue(), bad


async def run_round(url: str, clients: int, total: int, good: bytes, bad: list, bad_fraction: float, rng: random.Random,
                    deadline: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    remaining = total

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            if bad and rng.random() < bad_fraction:
                name, data, expectation = rng.choice(bad)
            else:
                name, data, expectation = "digit.png", good, "ok"
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/predict", files={"file": (name, data, "application/octet-stream")})
            except Exception as exc:  # a refused or dropped connection is an error, whatever its type
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
                continue
            latencies.append(time.perf_counter() - started)
            code = response.status_code
            statuses[str(code)] = statuses.get(str(code), 0) + 1
            expected_ok = {"ok": code == 200, "reject": 400 <= code < 500, "any": code == 200 or 400 <= code < 500}
            if code >= 500 or not expected_ok[expectation]:
                errors.append(f"{name}: HTTP {code} {response.text[:120]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"requests": len(latencies) + len(errors), "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(pct(0.50), 1), "p90_ms": round(pct(0.90), 1), "p99_ms": round(pct(0.99), 1),
            "max_ms": round(1000 * ordered[-1], 1) if ordered else None,
            "mean_ms": round(1000 * statistics.fmean(ordered), 1) if ordered else None,
            "statuses": statuses, "errors": len(errors), "error_samples": errors[:5],
            "unfinished": max(0, remaining)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="run folder or model file (default: a random-weight digit model)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1500, help="requests per round (two rounds)")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="share of hostile/broken uploads")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds for the whole test, server start included")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 500 and 1 <= args.requests <= 100_000 and 0 <= args.bad_fraction <= 1):
        parser.error("--clients 1..500, --requests 1..100000, --bad-fraction 0..1")

    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="cnnlab-load-") as tmp:
        tmp_path = Path(tmp)
        model = args.model or str(tiny_model(tmp_path))
        good, bad = payloads(tmp_path)
        port = free_port()
        url = f"http://{HOST}:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CNNLAB_OFFLINE": "1"}
        server = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", model, "--host", HOST, "--port", str(port),
                                   "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            import httpx

            while True:
                if server.poll() is not None:
                    print(f"the server exited: {server.stderr.read().decode()[-2000:]}", file=sys.stderr)
                    return 1
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print("the server did not come up in time", file=sys.stderr)
                    return 1
                time.sleep(0.3)
            rng = random.Random(0)
            rss_start = rss_mb(server.pid)
            warm = asyncio.run(run_round(url, min(args.clients, 8), 100, good, bad, args.bad_fraction, rng, deadline))
            rss_warm = rss_mb(server.pid)
            rounds = []
            for _ in range(2):
                rounds.append(asyncio.run(run_round(url, args.clients, args.requests, good, bad, args.bad_fraction, rng,
                                                    deadline)))
                rounds[-1]["rss_mb_after"] = round(rss_mb(server.pid), 1)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    result = {"url": url, "clients": args.clients, "requests_per_round": args.requests, "bad_fraction": args.bad_fraction,
              "cpus": os.cpu_count(), "warmup_errors": warm["errors"], "rss_mb_start": round(rss_start, 1),
              "rss_mb_after_warmup": round(rss_warm, 1), "rounds": rounds,
              "rss_growth_round2_mb": round(rounds[1]["rss_mb_after"] - rounds[0]["rss_mb_after"], 1)}
    for number, r in enumerate(rounds, 1):
        print(f"round {number}: {r['requests']} requests, {args.clients} clients, {r['seconds']}s: "
              f"{r['throughput_rps']} req/s, p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms, "
              f"max {r['max_ms']} ms; statuses {r['statuses']}; errors {r['errors']}; unfinished {r['unfinished']}; "
              f"server RSS {r['rss_mb_after']} MB")
        for sample in r["error_samples"]:
            print(f"  error: {sample}")
    print(f"server RSS: {result['rss_mb_start']} MB idle, {result['rss_mb_after_warmup']} MB after warm-up, "
          f"{rounds[0]['rss_mb_after']} MB after round 1, {rounds[1]['rss_mb_after']} MB after round 2 "
          f"(growth in round 2: {result['rss_growth_round2_mb']} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    failed = warm["errors"] + sum(r["errors"] + r["unfinished"] for r in rounds)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
