"""How cnnlab's Python objects show themselves: text in a terminal, HTML tables in Jupyter.

Summaries, metrics, predictions and models print as plain text (`__str__`/`__repr__`) and render
as HTML tables in a notebook (`_repr_html_`, which Jupyter calls by itself). Figures are matplotlib
`Figure`s; `show_figures_inline` makes Jupyter draw them, and `progress_bar` gives training a bar
in a terminal and in a notebook. No imports beyond the standard library at module level: the
classes here wrap objects made elsewhere.
"""

from __future__ import annotations

import html
import sys
import warnings
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .predict import Prediction
    from .summarize import Summary


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def text_table(rows: list[dict[str, str]], right: Iterable[str] = ()) -> str:
    """Rows of strings (one dict per row, same keys) as aligned text with a header line."""
    if not rows:
        return ""
    columns = list(rows[0])
    right = set(right)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}

    def line(row: dict[str, str]) -> str:
        return "  ".join(row[c].rjust(widths[c]) if c in right else row[c].ljust(widths[c]) for c in columns).rstrip()

    header = line({c: c for c in columns})
    return "\n".join([header, "-" * len(header), *(line(r) for r in rows)])


def html_table(rows: list[dict[str, str]], right: Iterable[str] = (), caption: str = "") -> str:
    """The same rows as an HTML table (escaped); `right` columns are right-aligned (numbers)."""
    if not rows:
        return ""
    right = set(right)

    def cell(tag: str, column: str, value: str) -> str:
        align = ' style="text-align:right"' if column in right else ' style="text-align:left"'
        return f"<{tag}{align}>{html.escape(value)}</{tag}>"

    head = "".join(cell("th", c, c) for c in rows[0])
    body = "".join("<tr>" + "".join(cell("td", c, v) for c, v in row.items()) + "</tr>" for row in rows)
    title = f"<caption style=\"text-align:left\">{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_lines(lines: Iterable[str], tag: str = "div") -> str:
    """Lines of text as escaped HTML elements, one per line."""
    return "".join(f"<{tag}>{html.escape(text)}</{tag}>" for text in lines)


def key_value_rows(items: dict[str, Any]) -> list[dict[str, str]]:
    """A flat mapping as two-column table rows."""
    return [{"": str(key), "value": format_value(value)} for key, value in items.items()]


def format_value(value: Any) -> str:
    """Numbers as people read them: 0.9806 stays 0.9806, 28938 becomes 28,938."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


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

def _ipython_kernel():
    """The running IPython kernel's shell, or None (a script, a terminal, plain IPython)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell if shell is not None and "IPKernelApp" in getattr(shell, "config", {}) else None


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    return _ipython_kernel() is not None


def show_figures_inline() -> None:
    """Make Jupyter draw matplotlib `Figure`s that cells return.

    cnnlab builds figures without pyplot (no global state), and until something imports pyplot
    Jupyter shows such a figure as `<Figure size ...>`. A PNG formatter that someone else set
    (`%matplotlib inline`, `%config InlineBackend...`) is left alone.
    """
    shell = _ipython_kernel()
    if shell is None:
        return
    from matplotlib.figure import Figure

    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        from .visualize import figure_png

        formatter.for_type(Figure, figure_png)


def progress_bar(total: int, desc: str, unit: str):
    """A progress bar where someone watches it, else None: a terminal (stderr is a TTY) or a
    notebook (tqdm.auto: a widget with ipywidgets installed, else a text bar)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)
    if in_notebook():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tqdm.auto warns when it falls back to text (no ipywidgets)
            from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=False)
    return None
