"""How cnnlab's Python objects show themselves in a notebook: metrics, predictions, Jupyter hooks."""

from __future__ import annotations

import io

from cnnlab.display import Metrics, Predictions, show_figures_inline
from cnnlab.formatting import in_notebook, progress_bar
from cnnlab.predict import Prediction


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
