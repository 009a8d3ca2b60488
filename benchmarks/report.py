"""The benchmark's results as text: one line per run for the console, and the Markdown page
written beside the JSON (`benchmarks/results/<machine>-<date>.md`)."""

from __future__ import annotations

from typing import Any

from cnnlab.presets import PRESETS


def trains_on_colour_folders(row: dict[str, Any]) -> bool:
    """A cifar preset's row: it goes in the CIFAR-10 table and is measured against 85%."""
    return bool(PRESETS.get(row.get("preset"), {}).get("colour_folders"))


def _seconds_text(value) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _row_name(row: dict[str, Any]) -> str:
    notes = (["bf16"] if row.get("precision") == "bf16" else []) + \
            ([f"median of {len(row['seeds'])} seeds"] if row.get("seeds") else [])
    return f"{row['name']} ({', '.join(notes)})" if notes else row["name"]


def _rest_of_row(row: dict[str, Any]) -> str:
    return (f"{row['wall_seconds']:.1f} s | {row['cpu_seconds']:.1f} s | {row['images_per_second']:,.0f} "
            f"| {row['train_gflops']:.1f} ({100 * (row['train_gflops_of_matmul'] or 0):.0f}%) | {row['peak_rss_mb']:,.0f} MB |")


def row_summary(row: dict[str, Any]) -> str:
    """One line for the console: accuracy, time, time to the targets, images per second."""
    if not row.get("ok"):
        return f"{row['name']}: failed ({row.get('error', 'see above')})"
    targets = ((0.85,) if trains_on_colour_folders(row) else (0.9806, 0.99))
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
              f"- started {results['started']}, finished {results.get('finished', '?')}"]
    cifar_rows = [row for row in results["runs"] if trains_on_colour_folders(row)]
    mnist_rows = [row for row in results["runs"] if not trains_on_colour_folders(row)]
    if mnist_rows:  # a colour-only run gets no empty MNIST table
        lines += ["", "## MNIST", "",
                  "| run | test acc | time to 98.06% | time to 99.0% | whole process | CPU (user+sys) | train img/s "
                  "| train GFLOP/s (of matmul) | peak RSS |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for row in mnist_rows:
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



def time_to_accuracy_png(results: dict[str, Any]) -> bytes | None:
    """Test accuracy against seconds from process start, one line per run (the tutorial recipe and each
    preset; the median seed's curve), on a log time axis with the tutorial's 98.06% marked: the gap is
    seen, not read. None when no run has a curve."""
    import io

    from matplotlib.figure import Figure

    runs = [row for row in results.get("runs", []) if row.get("ok") and row.get("curve")]
    if not runs:
        return None
    fig = Figure(figsize=(8, 4.8), dpi=110)
    ax = fig.subplots()
    for number, row in enumerate(runs):
        curve = row["curve"] if "seeds" not in row else _median_seed(row)["curve"]
        points = [(p["seconds"], 100 * p["test_accuracy"]) for p in curve if p.get("test_accuracy") is not None]
        if not points:
            continue
        seconds, accuracy = zip(*points)
        style = "--" if row.get("kind") == "tutorial" else "-"
        ax.plot(seconds, accuracy, style, marker="o", markersize=3, color=f"C{number % 10}",
                label=f"{_row_name(row)}: {accuracy[-1]:.2f}% at {seconds[-1]:.0f} s")
    for target, text in ((98.06, "the tutorial's 98.06%"), (99.0, "99%")):
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(text, (1, target), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8,
                    color="grey")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    seconds_text = FuncFormatter(lambda value, _: f"{value:g}")  # 4, 6, 10, 20 rather than 4×10⁰
    ax.xaxis.set_major_formatter(seconds_text)
    ax.xaxis.set_minor_formatter(seconds_text)
    ax.set_xlabel("seconds from process start (log scale; imports and data loading included)")
    ax.set_ylabel("test accuracy (%)")
    # the axis starts just below the lowest accuracy above 90% (a quick run may have none)
    high_enough = [100 * p["test_accuracy"] for row in runs for p in row["curve"]
                   if p.get("test_accuracy") is not None and p["test_accuracy"] > 0.9]
    low = min(97.0, *high_enough) - 0.2 if high_enough else 0.0
    ax.set_ylim(low, 100)
    machine = results.get("machine", {})
    ax.set_title(f"Time to accuracy on MNIST: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
                 f"load {machine.get('load_average', [0])[0]:.1f}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _median_seed(row: dict[str, Any]) -> dict[str, Any]:
    """Of a preset's seeds, the one whose accuracy is the median (its curve stands for the preset)."""
    good = sorted((s for s in row["seeds"] if s.get("ok")), key=lambda s: s.get("test_accuracy") or 0)
    return good[len(good) // 2] if good else row
