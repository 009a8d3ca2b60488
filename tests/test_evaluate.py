"""Evaluation metrics computed from logits."""

import pytest
import torch

from cnnlab.data.preprocess import Preprocessing
from cnnlab.evaluate import EvalSettings, compute_metrics, confusion_matrix, format_metrics, infer


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


class TopLeftPixel(torch.nn.Module):
    """Logits = the top-left and bottom-right pixels: sensitive to every shift and flip."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 0, -1, -1]], 1)


def test_test_time_augmentation_averages_the_views():
    images = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4) * 7
    prep = Preprocessing(kind="resize", channels=1, size=(4, 4), mean=[0.0], std=[1.0])
    x = images.float() / 255
    plain = infer(TopLeftPixel(), images, prep)
    assert torch.allclose(plain, torch.stack([x[:, 0, 0, 0], x[:, 0, 3, 3]], 1))
    flipped = infer(TopLeftPixel(), images, prep, EvalSettings(tta_flip=True))
    assert torch.allclose(flipped[:, 0], 0.5 * (x[:, 0, 0, 0] + x[:, 0, 0, 3]))
    shifted = infer(TopLeftPixel(), images, prep, EvalSettings(tta_shift=1))
    # the two shifted views are windows of the reflect-padded image, weighted 1/4 each against 1/2
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :4, :4], padded[..., 2:, 2:]
    expected = 0.5 * x[:, 0, 0, 0] + 0.25 * (up_left[:, 0, 0, 0] + down_right[:, 0, 0, 0])
    assert torch.allclose(shifted[:, 0], expected)
    assert not torch.allclose(shifted, plain)


@pytest.mark.slow
def test_training_evaluate_report_and_show_give_one_accuracy_with_tta(tmp_path, capsys):
    """One evaluation, with the model's own settings (TTA included), serves every command."""
    import json
    import re

    from cnnlab.runs import open_run
    from cnnlab.cli import main
    from cnnlab.config import resolve_config
    from cnnlab.report import build_report
    from cnnlab.training import fit
    from tests.support.helpers import write_image_folder
    from tests.support.run_folders import TINY_MODEL

    folder = write_image_folder(tmp_path / "data", n_per_class=40, size=12, rgb=True)
    config_file = tmp_path / "tta.json"
    config_file.write_text(json.dumps({
        "model": TINY_MODEL, "data": {"dataset": f"folder:{folder}", "image_size": 12},
        # a fraction of an epoch: a model that is still wrong often, so the views really disagree
        "train": {"epochs": 0.5, "batch_size": 10, "lr": 0.003, "flip": True, "tta": True, "tta_shift": 1,
                  "threads": 1}}))
    result = fit(resolve_config(config_file=config_file), tmp_path / "run", progress=False, log=lambda *_: None)
    trained = result["metrics"]["test_accuracy"]

    bundle = open_run(tmp_path / "run")
    assert bundle.evaluation == EvalSettings(tta_flip=True, tta_shift=1, batch_size=1000)
    images = bundle.load_test_data().test.images
    assert not torch.allclose(bundle.test_logits(images), infer(bundle.model, images, bundle.preprocessing))

    assert main(["evaluate", str(tmp_path / "run"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["accuracy"]
    report = build_report(open_run(tmp_path / "run"))
    reported = float(re.search(r"accuracy<b>([0-9.]+)%</b>", report).group(1)) / 100
    shown = open_run(tmp_path / "run").evaluate()["accuracy"]
    assert trained == evaluated == pytest.approx(reported, abs=5e-5) and shown == evaluated
