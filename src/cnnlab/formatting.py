"""How cnnlab writes things for people: the one text-table writer (plain or Markdown), HTML tables,
numbers as people read them, the colour maps of its pictures and the progress bar.

Every table cnnlab prints goes through `text_table` (summary, evaluate, compare, tune, predict,
module summaries), every colour lookup through `colour_table` (explanations, the server's feature
maps). The lowest layer of the package: nothing from cnnlab is imported here, and only the
standard library at module level (numpy, matplotlib and tqdm when a function needs them).
"""

from __future__ import annotations

import html
import sys
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import numpy as np


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def text_table(rows: list[dict[str, str]], right: Iterable[str] = (), columns: Sequence[str] | None = None,
               markdown: bool = False) -> str:
    """Rows of strings (one dict per row, same keys) as aligned text: a header, a line of dashes,
    the rows. `right` columns are right-aligned (numbers); `columns` orders them and gives the
    header when there are no rows. `markdown`: a Markdown table instead (no padding)."""
    columns = list(columns if columns is not None else rows[0] if rows else [])
    if not columns:
        return ""
    if markdown:
        def cells(values: Iterable[str]) -> str:
            return "| " + " | ".join(str(v).replace("|", "/") for v in values) + " |"

        return "\n".join([cells(columns), "|" + "---|" * len(columns)] + [cells(r[c] for c in columns) for r in rows])
    right = set(right)
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}

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
# Colours
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def colour_table(name: str) -> "np.ndarray":
    """A matplotlib colour map (`RdBu_r`, `magma`, `inferno`, ...) as a (256, 3) uint8 lookup table:
    `colour_table(name)[values]` colours an array of 0..255 indices. Cached: callers must not
    write into it."""
    import numpy as np
    from matplotlib import colormaps

    table = (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    table.flags.writeable = False
    return table


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

def ipython_kernel():
    """The running IPython kernel's shell, or None (a script, a terminal, plain IPython)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell if shell is not None and "IPKernelApp" in getattr(shell, "config", {}) else None


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    return ipython_kernel() is not None


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
