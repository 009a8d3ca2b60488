"""`cnnlab compare` on three tiny run folders."""

from __future__ import annotations

import json

import pytest

from cnnlab.cli import main
from cnnlab.config import flat_settings, set_setting
from cnnlab.errors import CnnlabError
from tests.support.tiny_runs import make_tiny_run


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Runs a (3 epochs), b (2 epochs, lr 0.003), c (3 epochs, 8 channels in layer 4)."""
    root = tmp_path_factory.mktemp("compare")
    runs = {}
    for name, epochs in (("a", 3), ("b", 2), ("c", 3)):
        runs[name] = make_tiny_run(root / name, epochs=epochs).rename(root / f"run-{name}")
    dataset = json.loads((runs["a"] / "config.json").read_text())["data"]["dataset"]
    for name, change in (("b", ("train.lr", 0.003)), ("c", ("model.4.out_channels", 8))):
        path = runs[name] / "config.json"
        config = json.loads(path.read_text())
        set_setting(config, *change)
        set_setting(config, "data.dataset", dataset)  # all three on one dataset
        path.write_text(json.dumps(config))
    return root, runs


def test_table_shows_what_differs_and_final_metrics(three_runs, capsys):
    root, runs = three_runs
    assert main(["compare", str(runs["a"]), str(runs["b"]), str(runs["c"])]) == 0
    out = capsys.readouterr().out
    header, rule, *rows = out.splitlines()
    assert header.split()[:4] == ["run", "train.epochs", "train.lr", "model.4.out_channels"]
    assert "train.batch_size" not in header  # the same everywhere
    assert [row.split()[0] for row in rows] == ["run-a", "run-b", "run-c"]
    assert rows[1].split()[1:3] == ["2", "0.003"]
    assert rows[2].split()[3] == "8" and rows[0].split()[3] == "6"
    # make_tiny_run's histories: test accuracy 0.3 + 0.15 * epochs
    assert "75.00%" in rows[0] and "60.00%" in rows[1]


def test_json_and_globs(three_runs, capsys):
    root, runs = three_runs
    assert main(["compare", str(root / "run-*"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["runs"]] == ["run-a", "run-b", "run-c"]
    assert data["differing_settings"] == ["train.epochs", "train.lr", "model.4.out_channels"]
    assert data["runs"][1]["settings"] == {"train.epochs": 2, "train.lr": 0.003, "model.4.out_channels": 6}
    assert data["runs"][0]["final"]["test_accuracy"] == pytest.approx(0.75)
    assert data["runs"][0]["final"]["elapsed_seconds"] == 3.0


def test_html_has_table_and_curves(three_runs, tmp_path, capsys):
    root, runs = three_runs
    page = tmp_path / "compare.html"
    assert main(["compare", str(runs["a"]), str(runs["b"]), str(runs["c"]), "--html", str(page)]) == 0
    text = page.read_text()
    assert "model.4.out_channels" in text and text.count("<tr>") == 4
    assert "data:image/png;base64," in text and "http" not in text.split("<body>")[1]


def test_a_folder_that_is_not_a_run_is_one_error_naming_it(three_runs, tmp_path, capsys):
    root, runs = three_runs
    (tmp_path / "photos").mkdir()
    assert main(["compare", str(runs["a"]), str(tmp_path / "photos")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'photos'}: not a cnnlab run folder"), err
    assert main(["compare", str(tmp_path / "nothing-*")]) == 2
    assert "nothing-*: no folder matches" in capsys.readouterr().err


def test_flat_settings_numbers_layers_from_one_and_drops_defaults():
    explicit = {"model": [{"type": "conv", "out_channels": 4, "kernel_size": 3, "stride": 1}, "relu"], "train": {}}
    plain = {"model": [{"type": "conv", "out_channels": 4, "kernel_size": 3}, "relu"], "train": {}}
    assert flat_settings(explicit) == flat_settings(plain)
    assert flat_settings(plain)["model.1.out_channels"] == 4 and flat_settings(plain)["model.2.type"] == "relu"


def test_set_setting_names_the_key_in_errors():
    config = {"model": [{"type": "conv", "out_channels": 4, "kernel_size": 3}, "relu"]}
    set_setting(config, "model.2.type", "gelu")
    assert config["model"][1] == {"type": "gelu"}
    for bad, words in (("model.3.out_channels", "model.3.out_channels: no layer '3' (the model has 2 layers"),
                       ("model.0.out_channels", "no layer '0'"), ("model.1", "expected train.KEY"),
                       ("optimizer.lr", "optimizer.lr: expected train.KEY")):
        with pytest.raises(CnnlabError, match=words.replace("(", r"\(").replace(".", r"\.")):
            set_setting(config, bad, 1)
