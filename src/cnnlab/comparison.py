"""`cnnlab compare RUN...`: runs side by side.

For each run: the settings that differ between the runs (dotted names, `model.4.out_channels`
for layer settings), its final metrics and its times, read from the run folder's config.json
and metrics.jsonl. In the terminal as a table, with `--json` as JSON, and with `--html FILE` as a
self-contained page with the runs' curves overlaid.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

from .errors import CnnlabError
from .runs import CONFIG_FILE, METRICS_FILE, Run

# (metrics.jsonl key, column title, format): the final metrics and times shown for every run
METRICS = [
    ("test_accuracy", "test acc", lambda v: f"{100 * v:.2f}%"),
    ("test_loss", "test loss", lambda v: f"{v:.4f}"),
    ("train_accuracy", "train acc", lambda v: f"{100 * v:.2f}%"),
    ("train_loss", "train loss", lambda v: f"{v:.4f}"),
    ("epoch", "epochs", lambda v: f"{v:g}"),
    ("elapsed_seconds", "time", lambda v: f"{v:.1f} s"),
    ("images_per_second", "img/s", lambda v: f"{v:,.0f}"),
]


def expand_runs(patterns: list[str]) -> list[Path]:
    """Paths and glob patterns -> run folders, in the order given (each once)."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(str(Path(pattern).expanduser())))
            if not matches:
                raise CnnlabError(f"{pattern}: no folder matches")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(pattern).expanduser())
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return [next(p for p in paths if p.resolve() == u) for u in unique]


def read_run(path: Path) -> Run:
    """A run folder opened for comparing (config and history; no weights are loaded); a folder that
    is not a run is a one-line error naming it."""
    if not path.is_dir():
        raise CnnlabError(f"{path}: not a run folder ({'no such folder' if not path.exists() else 'a file'})")
    run = Run(path)
    for name in (CONFIG_FILE, METRICS_FILE):
        if not run.file(name).is_file():
            raise CnnlabError(f"{path}: not a cnnlab run folder (no {name})")
    run.settings()  # a damaged config.json fails here, naming the file
    return run


def differing_settings(runs: list[Run]) -> list[str]:
    """Dotted names whose value is not the same in every run (or missing in some), in config order."""
    names = list(dict.fromkeys(name for run in runs for name in run.settings()))
    missing = object()
    return [name for name in names
            if len({json.dumps(run.settings().get(name, missing), default=repr) for run in runs}) > 1]


def comparison(runs: list[Run]) -> dict[str, Any]:
    """The comparison as plain data (what --json prints)."""
    differing = differing_settings(runs)
    return {
        "differing_settings": differing,
        "runs": [{"path": str(run.root), "name": run.label,
                  "settings": {name: _finite(run.settings().get(name)) for name in differing},
                  "final": {key: _number(run.final_metrics()[key]) for key, _, _ in METRICS if key in run.final_metrics()},
                  "best_test_accuracy": max((v for v in (_number(m.get("test_accuracy")) for m in run.history())
                                             if v is not None), default=None),
                  "epochs_logged": len(run.history())}
                 for run in runs],
    }


def _number(value: Any) -> float | None:
    """A metric as a finite number, else None: a hand-edited metrics.jsonl may hold a list, text or NaN,
    and NaN is not JSON (`--json` writes null instead)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _finite(value: Any) -> Any:
    """A setting's value with NaN and infinities (not JSON) as None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _unique_names(runs: list[Run]) -> None:
    # Two studies' trial-0 folders share a name: show them with their parent folder.
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.root.parent.name}/{run.root.name}"


def _value_text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def table(runs: list[Run]) -> str:
    """One row per run: the differing settings, then the final metrics and times."""
    from .formatting import text_table

    data = comparison(runs)
    settings, metrics = data["differing_settings"], [title for _, title, _ in METRICS]
    rows = []
    for run, item in zip(runs, data["runs"]):
        row = {"run": run.label, **{name: _value_text(item["settings"][name]) for name in settings}}
        row.update({title: fmt(item["final"][key]) if item["final"].get(key) is not None else "—" for key, title, fmt in METRICS})
        rows.append(row)
    text = [text_table(rows, right=metrics, columns=["run", *settings, *metrics])]
    if not settings:
        text.append("(the runs have the same settings)")
    return "\n".join(text)


def overlaid_curves_figure(runs: list[Run]):
    """Loss (log scale) and accuracy per epoch of every run, overlaid: one colour per run (a legend entry
    each), the line style says the split (train solid, validation dotted, test dashed)."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from .visualize import new_figure

    fig = new_figure(12, 4.6)
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    # Matplotlib's 10-colour cycle repeats after 10 runs: more runs take evenly spaced colours of one map.
    colours = ([f"C{i}" for i in range(len(runs))] if len(runs) <= 10
               else [colormaps["turbo"](i / (len(runs) - 1)) for i in range(len(runs))])
    styles = (("train", "-"), ("val", ":"), ("test", "--"))
    shown = set()
    for run, colour in zip(runs, colours):
        for split, style in styles:
            for ax, key, scale in ((loss_ax, f"{split}_loss", 1), (accuracy_ax, f"{split}_accuracy", 100)):
                points = [(m["epoch"], scale * m[key]) for m in run.history()
                          if _number(m.get(key)) is not None and _number(m.get("epoch")) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=colour, marker="o" if len(points) < 30 else None,
                            markersize=3)
                    shown.add(split)
    loss_ax.set_yscale("log")  # losses of runs that differ by orders of magnitude stay readable
    for ax, ylabel, title in ((loss_ax, "cross-entropy loss (log scale)", "loss per epoch (lower is better)"),
                              (accuracy_ax, "accuracy (%)", "accuracy per epoch (higher is better)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
    names = {"train": "train (mean over the epoch)", "val": "validation (end of epoch)", "test": "test"}
    loss_ax.legend([Line2D([], [], color="black", linestyle=style) for split, style in styles if split in shown],
                   [names[split] for split, _ in styles if split in shown], fontsize=7, loc="upper right")
    accuracy_ax.legend([Line2D([], [], color=colour, linewidth=3) for colour in colours], [run.label for run in runs],
                       fontsize=7, loc="lower right", title="run", title_fontsize=7)
    return fig


def html_page(runs: list[Run]) -> str:
    """A self-contained HTML page: the comparison table and the overlaid curves."""
    import base64
    import html

    from .report import STYLE
    from .visualize import figure_png

    data = comparison(runs)
    names = data["differing_settings"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", *names, *(t for _, t, _ in METRICS)])
    body = ""
    for run, item in zip(runs, data["runs"]):
        cells = [f"<td title='{html.escape(str(run.root))}'>{html.escape(run.label)}</td>"]
        cells += [f"<td>{html.escape(_value_text(item['settings'][n]))}</td>" for n in names]
        cells += [f"<td class='num'>{html.escape(fmt(item['final'][k]) if k in item['final'] else '—')}</td>"
                  for k, _, fmt in METRICS]
        body += "<tr>" + "".join(cells) + "</tr>"
    png = base64.b64encode(figure_png(overlaid_curves_figure(runs))).decode("ascii")
    same = "" if names else "<p class='note'>The runs have the same settings.</p>"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>cnnlab compare: {len(runs)} runs</title>"
            f"<style>{STYLE}</style></head><body><header><h1>cnnlab compare: {len(runs)} runs</h1>"
            f"<p>{html.escape(', '.join(str(r.root) for r in runs))}</p></header><main>"
            f"<section><h2>Settings that differ, final metrics and times</h2>{same}<table><tr>{head}</tr>{body}</table>"
            "<p class='note'>Layers are numbered from 1 as in <code>cnnlab summary</code>; time is the whole training, "
            "evaluations included.</p></section>"
            f"<section><h2>Curves</h2><img alt='curves of every run' src='data:image/png;base64,{png}'>"
            "<p class='note'>One colour per run. Solid: train (mean over the epoch); dotted: validation; dashed: "
            "test. The loss axis is logarithmic.</p></section>"
            "</main></body></html>\n")


def read_runs(patterns: list[str]) -> list[Run]:
    """The runs of these folders and glob patterns, each with a name of its own."""
    runs = [read_run(path) for path in expand_runs(patterns)]
    _unique_names(runs)
    return runs


def write_html(runs: list[Run], path: str | Path) -> Path:
    """Write `html_page(runs)` to `path` (atomically); returns the path written."""
    from .files import atomic_write_text

    target = Path(path).expanduser()
    try:
        atomic_write_text(target, html_page(runs))
    except OSError as exc:
        raise CnnlabError(f"--html {target}: cannot write ({exc.strerror or exc})") from None
    return target
