"""How cnnlab's Python objects show themselves: text tables, escaped HTML tables, Jupyter hooks."""

from __future__ import annotations

import io

from cnnlab.display import Metrics, Predictions, html_table, in_notebook, progress_bar, show_figures_inline, text_table
from cnnlab.predict import Prediction


def test_text_and_html_tables_align_and_escape():
    rows = [{"name": "a<b", "count": "1,234"}, {"name": "c", "count": "5"}]
    assert text_table(rows, right=["count"]).splitlines() == ["name  count", "-----------", "a<b   1,234", "c         5"]
    html = html_table(rows, right=["count"], caption="x & y")
    assert "a&lt;b" in html and "x &amp; y" in html and html.count("<tr>") == 3
    assert text_table([]) == html_table([]) == ""


def test_metrics_print_as_the_cli_prints_them():
    metrics = Metrics({"loss": 0.5, "accuracy": 0.75, "count": 4, "macro_f1": 0.7,
                       "per_class": [{"class": "a", "precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2},
                                     {"class": "b", "precision": 0.667, "recall": 1.0, "f1": 0.8, "support": 2}],
                       "confusion": [[1, 1], [0, 2]], "classes": ["a", "b"]})
    assert "accuracy   75.00%" in str(metrics) and repr(metrics) == str(metrics)
    html = metrics._repr_html_()
    assert "per class" in html and "confusion matrix" in html and html.count("<table>") == 3
    assert str(Metrics({"epoch": 2, "test_accuracy": 0.98})).splitlines()[0].split() == ["epoch", "2"]


def test_predictions_name_their_inputs():
    predictions = Predictions([Prediction("7", 7, 0.9, [{"label": "7", "probability": 0.9},
                                                        {"label": "1", "probability": 0.05}])], ["digit.png"])
    assert predictions[0].label == "7" and predictions.sources == ["digit.png"]
    assert str(predictions).splitlines()[-1] == "digit.png  7           90.0%  7 90.0%, 1 5.0%"
    assert "<td style=\"text-align:left\">digit.png</td>" in predictions._repr_html_()


def test_outside_jupyter_nothing_changes(monkeypatch):
    assert not in_notebook()
    show_figures_inline()  # no kernel: nothing to do
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert progress_bar(10, "epoch 1/1", "step") is None
