"""Evaluation metrics computed from logits."""

import torch

from cnnlab.evaluate import compute_metrics, confusion_matrix, format_metrics


def test_metrics_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    logits = torch.nn.functional.one_hot(predicted, 3).float() * 5
    m = compute_metrics(logits, labels, ["a", "b", "c"])
    assert m["accuracy"] == 0.6
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    a, b, c = m["per_class"]
    assert a["precision"] == 0.5 and a["recall"] == 0.5
    assert round(b["precision"], 4) == 0.6667 and b["recall"] == 1.0
    assert c["f1"] == 0.0 and c["support"] == 1
    text = format_metrics(m)
    assert "confusion matrix" in text and "60.00%" in text


def test_confusion_matrix_counts():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]), 2)
    assert cm.tolist() == [[1, 1], [0, 1]]
