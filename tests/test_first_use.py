"""What a first use turned up (issue 21 item 6, and --limit-per-class): each small, each checked here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cnnlab.cli import main
from cnnlab.training import _epoch_line, epochs_done

from .support.helpers import TINY_SPEC, write_image_folder
from .support.tiny_runs import make_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("first-use"))


@pytest.mark.parametrize("command", ["train", "evaluate", "lr-find", "tune"])
def test_limit_per_class_is_a_flag_of_every_command_that_reads_data(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--limit-per-class N" in capsys.readouterr().out


def test_evaluate_limits_the_test_images_per_class(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--json", "--limit-per-class", "1"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == len(metrics["classes"])
    assert main(["evaluate", str(tiny_run), "--limit-per-class", "0"]) != 0
    assert "data.limit_per_class" in capsys.readouterr().err


def test_fractional_epochs_are_reported_as_such():
    assert epochs_done(1, 0.5) == 0.5 and epochs_done(3, 2.5) == 2.5 and epochs_done(2, 2.5) == 2
    line = _epoch_line({"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "images_per_second": 10.0,
                        "elapsed_seconds": 1.0}, 0.5)
    assert line.startswith("epoch 0.5/0.5 ")


@pytest.mark.slow
def test_train_says_after_half_an_epoch(tmp_path, capsys):
    root = write_image_folder(tmp_path / "photos", n_per_class=20)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": TINY_SPEC}))
    assert main(["train", "--config", str(config), "--dataset", f"folder:{root}", "--image-size", "12", "--epochs",
                 "0.5", "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress", "--no-tensorboard",
                 "--limit-per-class", "10"]) == 0
    out = capsys.readouterr().out
    assert "epoch 0.5/0.5 " in out and " after 0.5 epochs," in out, out
    assert " 24 train / 3 val / " in out or "train / " in out  # at most 10 per class in all splits
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["limit_per_class"] == 10


@pytest.mark.parametrize("resumable", [False, True])
def test_evaluate_on_a_run_interrupted_before_its_first_epoch_says_so(tmp_path, capsys, resumable):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "default", "model": [], "data": {}, "train": {}}))
    if resumable:
        (run / "resume.safetensors").write_bytes(b"")
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "interrupted before its first epoch ended, so there is no model yet" in err
    assert ("cnnlab train --resume" in err) == resumable


def test_explain_never_overwrites_an_earlier_picture(tiny_run, tmp_path, capsys):
    pytest.importorskip("captum")
    image = sorted((tiny_run.parent / "data" / "test").glob("*/*.png"))[0]
    out = tmp_path / "pictures"
    for _ in range(2):
        assert main(["explain", str(tiny_run), str(image), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0] != names[1], names


def test_the_feature_map_picture_says_how_many_maps_it_shows(tiny_run):
    from cnnlab.runs import open_run
    from cnnlab.visualize import feature_maps_figure, pick_test_image

    run = open_run(tiny_run)
    image, caption = pick_test_image(run, 0)
    titles = [ax.get_title(loc="left") for ax in feature_maps_figure(run, image, caption, max_maps=2).axes]
    assert any(title.endswith("(2 of 4 maps)") for title in titles), titles


def test_compare_curves_have_labelled_axes_a_colour_per_run_and_a_log_loss(tiny_run, tmp_path):
    from cnnlab.comparison import overlaid_curves_figure, read_runs

    fig = overlaid_curves_figure(read_runs([str(tiny_run), str(make_tiny_run(tmp_path, epochs=2))]))
    loss, accuracy = fig.axes[:2]
    assert loss.get_yscale() == "log" and loss.get_xlabel() == accuracy.get_xlabel() == "epoch"
    assert "loss" in loss.get_ylabel() and "accuracy" in accuracy.get_ylabel()
    legend = accuracy.get_legend()
    colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in legend.get_lines()}
    assert len(legend.get_texts()) == 2 and len(colours) == 2


def test_the_report_and_the_curves_show_validation_and_the_kept_epoch(tmp_path):
    from cnnlab.report import build_report
    from cnnlab.runs import open_run
    from cnnlab.visualize import curves_figure

    run_dir = make_tiny_run(tmp_path)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in history:
        m.update({"val_accuracy": 0.5 + 0.1 * m["epoch"], "val_loss": 1.0 / m["epoch"]})
        m.pop("test_accuracy")
        m.pop("test_loss")
    history[-1].update({"best_epoch": 2, "test_accuracy": 0.6, "test_loss": 0.9})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    fig = curves_figure(history, "t")
    labels = [text.get_text() for text in fig.axes[1].get_legend().get_texts()]
    assert any(label.startswith("validation") for label in labels) and "kept: epoch 2 (best validation)" in labels
    run = open_run(run_dir)
    meta_metrics = dict(run.metrics, val_accuracy=0.7, val_loss=0.5)
    run.__dict__["meta"] = dict(run.meta, metrics=meta_metrics)
    page = build_report(run)
    assert "validation accuracy<b>70.00%</b>" in page and "epoch 2 of 3, the best by validation accuracy" in page


@pytest.mark.slow
def test_the_pretrained_download_fails_fast_in_a_subprocess_without_network(tmp_path):
    pytest.importorskip("timm")
    from .test_backbones import closed_port

    script = ("import sys\nfrom cnnlab.layers import backbones, parse_layers\n"
              "backbones._cached_hub_file = lambda hub_id: None\n"
              "spec = parse_layers([{'type': 'timm', 'name': 'test_resnet', 'pretrained': True}, 'global_avg_pool',"
              " {'type': 'linear'}])[0]\n"
              "try:\n    backbones.load_pretrained(None, spec, 'layer 1')\n"
              "except Exception as exc:\n    print(exc)\n")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.count("\n") == 1 and "cannot reach" in result.stdout, result.stdout + result.stderr
