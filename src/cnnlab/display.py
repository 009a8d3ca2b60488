"""How cnnlab's Python objects show themselves in a notebook: the wrappers the API returns.

Summaries, metrics and predictions print as plain text (`__str__`/`__repr__`) and render as HTML
tables in a notebook (`_repr_html_`, which Jupyter calls by itself); the tables themselves are
written by `formatting`. Figures are matplotlib `Figure`s; `show_figures_inline` makes Jupyter
draw them. No imports beyond the standard library at module level: the classes here wrap
objects made elsewhere.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from .formatting import format_value, html_lines, html_table, ipython_kernel, key_value_rows, text_table

if TYPE_CHECKING:
    from .predict import Prediction
    from .summarize import Summary


# ---------------------------------------------------------------------------------------------
# Wrappers of the objects the commands make
# ---------------------------------------------------------------------------------------------

class NetworkSummary:
    """`summary.Summary` (what `cnnlab summary` prints) with notebook display.

    Every attribute of the wrapped summary is available here (`total_params`, `total_macs`,
    `layers`, `warnings`, `input_shape`, ...); `.summary` is the wrapped object itself.
    """

    def __init__(self, summary: "Summary"):
        self.summary = summary

    def __getattr__(self, name: str) -> Any:
        if name == "summary":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.summary, name)

    def to_dict(self) -> dict[str, Any]:
        """The table as JSON-able data (`cnnlab summary --json`)."""
        from .summarize import summary_to_dict

        return summary_to_dict(self.summary)

    def __str__(self) -> str:
        from .summarize import format_summary

        return format_summary(self.summary)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from .summarize import SOFTMAX_NOTE, table_rows, totals_lines

        s = self.summary
        c, h, w = s.input_shape
        classes = f", {s.num_classes} classes" if s.num_classes else ""
        parts = [f"<p><b>{html.escape(s.name)}</b>: input {c}x{h}x{w} (channels x height x width){classes}; "
                 "output size per axis: ⌊(n + 2·padding − dilation·(kernel − 1) − 1)/stride⌋ + 1</p>",
                 html_table(table_rows(s), right=("params", "MACs")),
                 html_lines(totals_lines(s)),
                 html_lines((f"warning: {text}" for text in s.warnings)),
                 f"<p>{html.escape(SOFTMAX_NOTE)}</p>"]
        return "".join(parts)


class Metrics(dict):
    """A metrics dict (`evaluate`'s or a run's last epoch) that prints as tables.

    Keys are those of `evaluate.compute_metrics` (`loss`, `accuracy`, `count`, `macro_f1`,
    `per_class`, `confusion`, `classes`) or of a training epoch (`epoch`, `train_loss`,
    `train_accuracy`, `test_loss`, `test_accuracy`, ...).
    """

    def _scalars(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if not isinstance(v, (list, dict))}

    def __str__(self) -> str:
        if "per_class" in self and "confusion" in self and self.get("count"):
            from .evaluate import format_metrics

            return format_metrics(self)
        return "\n".join(f"{key:<20} {format_value(value)}" for key, value in self._scalars().items())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        parts = [html_table(key_value_rows(self._scalars()), right=("value",))]
        if self.get("per_class"):
            rows = [{"class": str(r["class"]), "precision": f"{100 * r['precision']:.2f}%",
                     "recall": f"{100 * r['recall']:.2f}%", "f1": f"{100 * r['f1']:.2f}%", "support": f"{r['support']:,}"}
                    for r in self["per_class"]]
            parts.append(html_table(rows, right=("precision", "recall", "f1", "support"), caption="per class"))
        if self.get("confusion"):
            classes = [str(c) for c in self["classes"]]
            rows = [{"true \\ predicted": name, **{c: str(v) for c, v in zip(classes, row)}}
                    for name, row in zip(classes, self["confusion"])]
            parts.append(html_table(rows, right=classes, caption="confusion matrix (rows: true class, columns: predicted)"))
        return "".join(parts)


class Predictions(list):
    """`predict.Prediction`s in the order of the inputs, with where each came from (`sources`)."""

    def __init__(self, predictions: list["Prediction"], sources: list[str]):
        super().__init__(predictions)
        self.sources = sources

    def rows(self) -> list[dict[str, str]]:
        """One table row per image: input, label, confidence, top-k."""
        return [{"input": source, "label": p.label, "confidence": f"{p.confidence:.1%}",
                 "top-k": ", ".join(f"{t['label']} {t['probability']:.1%}" for t in p.top_k)}
                for source, p in zip(self.sources, self)]

    def __str__(self) -> str:
        return text_table(self.rows(), right=("confidence",)) if self else "no predictions"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return html_table(self.rows(), right=("confidence",))


# ---------------------------------------------------------------------------------------------
# Jupyter
# ---------------------------------------------------------------------------------------------

def show_figures_inline() -> None:
    """Make Jupyter draw matplotlib `Figure`s that cells return.

    cnnlab builds figures without pyplot (no global state), and until something imports pyplot
    Jupyter shows such a figure as `<Figure size ...>`. A PNG formatter that someone else set
    (`%matplotlib inline`, `%config InlineBackend...`) is left alone.
    """
    shell = ipython_kernel()
    if shell is None:
        return
    from matplotlib.figure import Figure

    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        from .visualize import figure_png

        formatter.for_type(Figure, figure_png)

