"""`cnnlab report RUN_DIR`: the whole story of a run in one self-contained HTML file.

Configuration, the layer-by-layer summary, training curves, test metrics per class, the
confusion matrix, the most confident mistakes (with their Grad-CAM), the learned filters and the feature maps of a
test image. Pictures are the very figures `cnnlab show` draws, embedded as base64 PNGs, and the
styles are inline: the file opens offline, can be mailed, and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import CnnlabError

SECTIONS = [
    ("configuration", "Configuration"),
    ("summary", "Network, layer by layer"),
    ("curves", "Training curves"),
    ("metrics", "Test metrics per class"),
    ("confusion", "Confusion matrix"),
    ("mistakes", "Most confident mistakes"),
    ("filters", "Learned filters"),
    ("feature-maps", "Feature maps of a test image"),
    ("explanations", "Can the explanations be trusted?"),
]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2328; background: #f6f8fa; }
header { background: #24292f; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 6px 0; font-size: 24px; }
header p { margin: 2px 0; color: #d0d7de; }
nav { background: white; border-bottom: 1px solid #d0d7de; padding: 8px 32px; position: sticky; top: 0; }
nav a { margin-right: 16px; color: #0969da; text-decoration: none; font-size: 14px; }
main { padding: 8px 32px 40px 32px; max-width: 1500px; }
section { background: white; border: 1px solid #d0d7de; border-radius: 6px; padding: 12px 20px; margin: 18px 0; }
h2 { font-size: 19px; margin: 6px 0 10px 0; }
p.note { color: #57606a; font-size: 14px; margin: 4px 0 10px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.formula { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; margin: 6px 0 10px 0; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 20px; }
.warning { color: #9a6700; }
.columns { display: flex; gap: 24px; flex-wrap: wrap; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _key_values(items: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v) if isinstance(v, (list, dict)) else v)}</td></tr>"
                   for k, v in items.items())
    return f"<table>{rows}</table>"


def _unavailable(what: str, exc: Exception) -> str:
    return f'<p class="note warning">{_e(what)} not available: {_e(exc)}</p>'


def _figure_html(build, alt: str) -> str:
    """Render one figure to an <img>, or a note saying why it could not be drawn."""
    from .visualize import figure_png

    try:
        return _image(figure_png(build()), alt)
    except CnnlabError as exc:
        return _unavailable(alt, exc)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _configuration_section(context) -> str:
    import dataclasses

    from .layers import spec_to_list

    bundle = context
    config = bundle.config
    # Three columns: run and data (short tables) stacked, training, layer spec.
    parts = ['<div class="columns">']
    parts.append("<div><h3>run</h3>" + _key_values({
        "run": str(context.path), "dataset": bundle.dataset, "classes": ", ".join(bundle.classes),
        "input shape (C×H×W)": "×".join(map(str, bundle.input_shape)), "model kept": kept_epoch(context),
        "preset": (config.preset if config else None) or "custom",
        "versions": ", ".join(f"{k} {v}" for k, v in bundle.versions.items()),
    }))
    data = dataclasses.asdict(config.data) if config else {}
    prep = bundle.preprocessing.to_dict()
    parts.append("<h3>data and preprocessing</h3>" + _key_values({**data, **{f"preprocessing.{k}": v for k, v in prep.items()}})
                 + "</div>")
    if config:
        parts.append("<div><h3>training</h3>" + _key_values(dataclasses.asdict(config.train)) + "</div>")
    parts.append("<div><h3>layer spec</h3><table>" + "".join(
        f"<tr><td class='num'>{i}</td><td class='formula'>{_e(json.dumps(layer) if not isinstance(layer, str) else layer)}</td></tr>"
        for i, layer in enumerate(spec_to_list(bundle.layers), start=1)) + "</table></div>")
    parts.append("</div>")
    return "".join(parts)


def _summary_section(context) -> str:
    from .summarize import SOFTMAX_NOTE, summarize, table_rows, totals_lines

    bundle = context
    summary = summarize(bundle.layers, bundle.input_shape, len(bundle.classes), name=context.name)
    rows = table_rows(summary)
    columns = list(rows[0])
    numeric = {"params", "MACs"}
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f"<td class='{'num' if c in numeric else 'formula' if c == 'output size formula' else ''}'>{_e(row[c])}</td>"
        for c in columns) + "</tr>" for row in rows)
    notes = "".join(f"<li>{_e(line)}</li>" for line in totals_lines(summary))
    warnings = "".join(f"<li class='warning'>{_e(w)}</li>" for w in summary.warnings)
    return (f"<p class='note'>Output size per axis: ⌊(n + 2·padding − dilation·(kernel − 1) − 1)/stride⌋ + 1. "
            "Receptive field: the input pixels one output value sees; jump: input pixels between neighbouring outputs. "
            "Every shape was checked against a real PyTorch forward pass.</p>"
            f"<table><tr>{head}</tr>{body}</table><ul>{notes}{warnings}</ul><p class='note'>{_e(SOFTMAX_NOTE)}</p>")


def kept_epoch(context) -> str:
    """Which epoch's model the run kept, and why: 'epoch 12 of 36, the best by validation accuracy (71.11%)'."""
    history = context.history()
    saved = context.metrics
    best = history[-1].get("best_epoch") if history else None
    if best and "val_accuracy" in saved:
        return (f"epoch {best} of {history[-1]['epoch']}, the best by validation accuracy "
                f"({100 * saved['val_accuracy']:.2f}%)")
    if context.epoch and context.config is not None:
        from .training import epochs_done

        return f"epoch {epochs_done(context.epoch, context.config.train.epochs):g}, the last"  # 0.5, not 1
    return f"epoch {context.epoch or '?'}, the last"


def _metrics_section(metrics: dict[str, Any] | None, error: Exception | None, context=None) -> str:
    if metrics is None:
        return _unavailable("test metrics", error)  # type: ignore[arg-type]
    saved = context.metrics if context is not None else {}
    validation = "".join(f"<div class='card'>{title}<b>{value}</b></div>" for key, title, value in (
        ("val_accuracy", "validation accuracy", f"{100 * saved.get('val_accuracy', 0):.2f}%"),
        ("val_loss", "validation loss", f"{saved.get('val_loss', 0):.4f}")) if key in saved)
    cards = (f"<div class='cards'><div class='card'>accuracy<b>{100 * metrics['accuracy']:.2f}%</b></div>"
             f"<div class='card'>loss<b>{metrics['loss']:.4f}</b></div>"
             f"<div class='card'>macro F1<b>{100 * metrics.get('macro_f1', 0):.2f}%</b></div>"
             f"<div class='card'>test images<b>{metrics['count']:,}</b></div>{validation}</div>"
             + (f"<p class='note'>The model of {_e(kept_epoch(context))}; the test split was used once, on it.</p>"
                if validation else ""))
    rows = "".join(
        f"<tr><td>{_e(row['class'])}</td><td class='num'>{100 * row['precision']:.2f}%</td>"
        f"<td class='num'>{100 * row['recall']:.2f}%</td><td class='num'>{100 * row['f1']:.2f}%</td>"
        f"<td class='num'>{row['support']:,}</td></tr>" for row in metrics["per_class"])
    return (cards + "<p class='note'>Precision: of the images predicted as the class, how many are it. Recall: of the "
            "images of the class, how many were found. F1: their harmonic mean.</p>"
            f"<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>")


def _mistakes_gradcam_html(context, data) -> str:
    """Each of the most confident mistakes with its Grad-CAM (cnnlab explain), or why there is none."""
    from .explain import mistakes_gradcam_figure

    return (_figure_html(lambda: mistakes_gradcam_figure(context, data.test.images, data.test.labels,
                                                         context.test_logits(), f"Why {context.name} got them wrong"),
                         "Grad-CAM of the most confident mistakes")
            + "<p class='note'>Grad-CAM (<code>cnnlab explain</code>): the bright regions are where the network found "
              "evidence for a class; left, for the class it said; right, for the true class.</p>")


def _explanations_section(bundle) -> str:
    """The faithfulness check's table and curves (`cnnlab explain RUN --check`), or how to run it."""
    from .faithfulness import caveat, check_figure, load_check

    result = load_check(bundle.path)
    if result is None:
        return (f"<p class='note'>No faithfulness check for this model yet: <code>cnnlab explain {_e(bundle.run_dir)} "
                "--check</code> measures whether each attribution method's maps point at what the model uses "
                "(deletion, insertion and ROAD against a random ranking; model randomisation).</p>")
    random = result["random"]
    rows = [f"<tr><td>random ranking</td><td class='num'>{random['deletion_auc']:.3f}</td>"
            f"<td class='num'>{random['insertion_auc']:.3f}</td><td class='num'>{random['road_score']:.3f}</td>"
            "<td></td><td></td></tr>"]
    for row in result["methods"]:
        final = row["randomisation"]["final"]
        note = caveat(result, row["name"], "")
        rows.append(f"<tr><td>{_e(row.get('title') or row['name'])}</td><td class='num'>{row['deletion_auc']:.3f}</td>"
                    f"<td class='num'>{row['insertion_auc']:.3f}</td><td class='num'>{row['road_score']:.3f}</td>"
                    f"<td class='num'>{'—' if final is None else f'{final:.2f}'}</td>"
                    f"<td>{_e(row['verdict'])}{'<br><b>' + _e(note) + '</b>' if note else ''}</td></tr>")
    return (f"<p class='note'>{result['images']} test images (seed {result['seed']}, {_e(result['date'])}), maps of "
            "the predicted class. Deletion: area under the class's probability while the most relevant pixels are "
            "replaced by a blurred copy (lower is better); insertion: while they are put back into it (higher is "
            "better); ROAD: probability with the least minus with the most relevant pixels removed and imputed "
            "(higher is better). Randomisation: rank correlation with the maps of the re-initialised model (near 0 "
            "is right). A method beats random when its gain over a random ranking is more than 2 standard "
            "errors.</p><table><tr><th>method</th><th>deletion</th><th>insertion</th><th>ROAD</th>"
            f"<th>randomisation</th><th>verdict</th></tr>{''.join(rows)}</table>"
            + _figure_html(lambda: check_figure(result), "deletion, insertion and ROAD curves"))


def build_report(context, index: int = 0) -> str:
    """The report of an opened run (`runs.open_run`) as one HTML string."""
    from .visualize import (confusion_figure, confusion_title, conv_layers, curves_figure, feature_maps_figure,
                            filters_figure, mistakes_figure, pick_test_image)

    metrics, error = None, None
    try:
        metrics = context.evaluate()
    except CnnlabError as exc:  # the dataset may be gone: the rest of the report still helps
        error = exc

    body: dict[str, str] = {}
    body["configuration"] = _configuration_section(context)
    body["summary"] = _summary_section(context)
    body["curves"] = (_figure_html(lambda: curves_figure(context.history(), f"Training curves of {context.name}"),
                                   "training curves")
                      + "<p class='note'>Train values are averaged over each epoch while the weights change; "
                        "validation values are measured at the end of the epoch, on images held out of training, and "
                        "pick the epoch kept; test values are measured at the end of the epoch, or with a validation "
                        "split once, on the kept epoch's model.</p>")
    body["metrics"] = _metrics_section(metrics, error, context)
    if metrics is not None:
        body["confusion"] = (_figure_html(lambda: confusion_figure(metrics["confusion"], context.classes,
                                                                   confusion_title(context.name, metrics)), "confusion matrix")
                             + "<p class='note'>Rows: the true class; columns: the predicted class. "
                               "Everything off the diagonal is a mistake.</p>")
        data = context.data()
        body["mistakes"] = (_figure_html(lambda: mistakes_figure(data.test.images, data.test.labels, context.test_logits(),
                                                                 context.classes, f"Most confident mistakes of {context.name}", 24),
                                         "most confident mistakes")
                            + "<p class='note'>The wrong predictions with the highest softmax probability: often "
                              "ambiguous or mislabelled images.</p>" + _mistakes_gradcam_html(context, data))
    else:
        body["confusion"] = _unavailable("the confusion matrix", error)  # type: ignore[arg-type]
        body["mistakes"] = _unavailable("mistakes", error)  # type: ignore[arg-type]
    # Deeper layers as an 8x8 corner of their kernel grid: enough to see structure, not a wall of tiles.
    filters = [_figure_html(lambda n=n: filters_figure(context, n, max_filters=8), f"filters of layer {n}")
               for n, _, _ in conv_layers(context)[:2]]
    body["filters"] = ("".join(filters) or "<p class='note'>This model has no conv layers.</p>") + (
        "<p class='note'>First layer: each filter is a small image the layer slides over the input (edge and stroke "
        "detectors). Deeper layers combine the previous layer's maps: one kernel per input channel.</p>")
    try:
        image, caption = pick_test_image(context, index)
        body["feature-maps"] = _figure_html(lambda: feature_maps_figure(context, image, caption),
                                            "feature maps")
    except CnnlabError as exc:
        body["feature-maps"] = _unavailable("feature maps", exc)

    body["explanations"] = _explanations_section(context)
    bundle = context
    accuracy = f"{100 * metrics['accuracy']:.2f}% test accuracy" if metrics else "test data unavailable"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{_e(title)}</h2>{body[key]}</section>' for key, title in SECTIONS)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>cnnlab report: {_e(context.name)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>cnnlab report: {_e(context.name)}</h1>"
            f"<p>{_e(bundle.dataset)}, {len(bundle.classes)} classes, input {'×'.join(map(str, bundle.input_shape))}, "
            f"the model of {_e(kept_epoch(context))}: <b>{_e(accuracy)}</b></p>"
            f"<p>generated {generated} from {_e(context.path)}</p></header>"
            f"<nav>{nav}</nav><main>{sections}</main></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, dataset: str | None = None,
                 data_root: str | None = None, index: int = 0, data=None) -> Path:
    """Open a run, build its report and write it (default: RUN_DIR/report.html); returns the path."""
    from .files import atomic_write_text, check_can_write, write_error
    from .runs import REPORT_FILE, open_run

    context = open_run(run_dir, dataset=dataset, data_root=data_root, data=data)
    target = Path(out).expanduser() if out else context.file(REPORT_FILE)
    if target.suffix.lower() not in (".html", ".htm"):
        raise CnnlabError(f"--out {target}: the report is HTML; use a .html file name")
    check_can_write(target, "the report")  # before the pictures are drawn, not after
    text = build_report(context, index)
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        raise write_error(target, exc, "the report") from None
    return target
