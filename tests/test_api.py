"""cnnlab from Python (`cnnlab.summary`, `cnnlab.train`, `cnnlab.load`, `Model`): the same results and
error lines as the CLI, every kind of input, and the README's Python block run as written."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import cnnlab
from cnnlab.cli import main
from cnnlab.config import DataConfig, TrainConfig, resolve_config
from cnnlab.display import Metrics, NetworkSummary, Predictions
from cnnlab.predict import Prediction

from .conftest import needs_mnist
from .support.helpers import TINY_SPEC
from .support.helpers import write_image_folder
from .support.tiny_runs import CLASSES, SIZE, make_tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def model(tiny_run) -> cnnlab.Model:
    return cnnlab.load(tiny_run)


def error_line(argv: list[str], capsys) -> str:
    """What the `cnnlab` command prints for a mistake, without its `error: ` prefix."""
    assert main(argv) != 0
    line = capsys.readouterr().err.strip().splitlines()[0]
    assert line.startswith("error: ")
    return line[len("error: "):]


# ---------------------------------------------------------------------------------------------
# the package
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_import_is_quick_and_lazy():
    """`import cnnlab` loads neither PyTorch nor the API; the public names load on first use, and no
    module of the package shares a name with them (importing a module never hides a function)."""
    script = ("import sys, cnnlab\n"
              "assert 'torch' not in sys.modules and 'cnnlab.api' not in sys.modules, sorted(sys.modules)\n"
              "import cnnlab.training, cnnlab.summarize\n"
              "assert callable(cnnlab.train) and cnnlab.train.__module__ == 'cnnlab.api'\n"
              "assert cnnlab.summary.__module__ == 'cnnlab.api' and cnnlab.load and cnnlab.Model\n"
              "import pkgutil\n"
              "modules = {m.name for m in pkgutil.iter_modules(cnnlab.__path__)}\n"
              "assert not modules & set(cnnlab.__all__), modules & set(cnnlab.__all__)\n"
              "print(sorted(cnnlab.__all__))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['CnnlabError', 'Model', 'compare', 'load', 'lr_find', 'summary', 'train', 'tune']"


def test_public_names_and_the_error_type():
    from cnnlab.errors import CnnlabError

    assert cnnlab.CnnlabError is CnnlabError
    assert {"summary", "train", "load", "Model", "CnnlabError", "lr_find", "tune", "compare"} <= set(dir(cnnlab))
    assert cnnlab.lr_find.__module__ == cnnlab.tune.__module__ == cnnlab.compare.__module__ == "cnnlab.api"
    with pytest.raises(AttributeError):
        cnnlab.no_such_name  # noqa: B018


def test_help_explains_every_argument_and_setting():
    doc = cnnlab.train.__doc__
    for argument in ("preset_or_config", "epochs", "out", "dataset", "settings", "progress", "verbose"):
        assert f"{argument}:" in doc
    for cls in (DataConfig, TrainConfig):
        for field in dataclasses.fields(cls):
            assert re.search(rf"^\s+{field.name} \(default ", doc, re.M), field.name
    for function in (cnnlab.summary, cnnlab.load, cnnlab.Model.predict, cnnlab.Model.show, cnnlab.Model.evaluate,
                     cnnlab.Model.export, cnnlab.Model.explain, cnnlab.lr_find, cnnlab.tune, cnnlab.compare):
        assert "Args:" in function.__doc__ and "Returns:" in function.__doc__


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------

class TutorialNet(nn.Module):
    """The tutorial's network as its readers write it, in plain PyTorch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2))
        self.out = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        return self.out(x.view(x.size(0), -1))


def test_summary_of_a_preset_is_the_cli_summary(capsys):
    s = cnnlab.summary("tutorial")
    assert isinstance(s, NetworkSummary) and s.total_params == 28938
    assert main(["summary", "--preset", "tutorial", "--json"]) == 0
    assert s.to_dict() == json.loads(capsys.readouterr().out)
    assert "28,938" in str(s) and repr(s) == str(s)
    html = s._repr_html_()
    assert html.count("<tr>") == len(s.layers) + 2 and "⌊(28 + 2·2 − 5)/1⌋ + 1 = 28" in html


def test_summary_of_a_hand_written_module_matches_the_preset():
    """Forward hooks on the tutorial net in plain PyTorch give the parameters, MACs, shapes and
    formulas that cnnlab's own trace gives for the tutorial preset."""
    preset = cnnlab.summary("tutorial")
    module = cnnlab.summary(TutorialNet(), input_shape=(1, 28, 28))
    assert (module.total_params, module.total_macs) == (preset.total_params, preset.total_macs) == (28938, 2838080)
    spatial = [info for info in preset.layers if info.spec.type in ("conv", "relu", "maxpool")]
    assert [row.out_shape for row in module.rows[:6]] == [tuple(info.out_shape) for info in spatial]
    assert [row.formula for row in module.rows[:6]] == [info.formula for info in spatial]
    assert module.rows[-1].out_shape == (10,) and module.rows[-1].params == 15690
    assert "out" in str(module) and "<table>" in module._repr_html_()


def test_summary_takes_layer_lists_config_files_runs_and_models(tmp_path, tiny_run, model):
    layers = cnnlab.summary(TINY_SPEC, input_shape=(1, 12, 12), classes=3)
    assert layers.input_shape == (1, 12, 12) and layers.num_classes == 3
    assert layers.total_params == 4 * 9 + 4 + 4 * 6 * 6 * 3 + 3
    config = tmp_path / "net.json"
    config.write_text(json.dumps({"model": TINY_SPEC}))
    assert cnnlab.summary(config).total_params == cnnlab.summary(TINY_SPEC).total_params
    assert cnnlab.summary(str(tiny_run)).total_params == cnnlab.summary(model).total_params \
        == sum(p.numel() for p in model.module.parameters())
    assert cnnlab.summary(model, "1x24x24").input_shape == (1, 24, 24)


def test_summary_mistakes_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(cnnlab.CnnlabError, match=r"tutoral: not a preset \(did you mean 'tutorial'\?\)"):
        cnnlab.summary("tutoral")
    with pytest.raises(cnnlab.CnnlabError, match="give input_shape"):
        cnnlab.summary(TutorialNet())
    with pytest.raises(cnnlab.CnnlabError, match=r"layer out \(Linear.*fails on an input of 1x32x32: mat1 and mat2"):
        cnnlab.summary(TutorialNet(), input_shape=(1, 32, 32))
    bad = [{"type": "conv", "out_channels": 4, "kernel_size": 5}, "relu"] * 3 + ["flatten", {"type": "linear"}]
    with pytest.raises(cnnlab.CnnlabError) as caught:
        cnnlab.summary(bad, input_shape=(1, 10, 10))
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"model": bad}))
    assert str(caught.value) == error_line(["summary", "--config", str(config), "--input", "1x10x10"], capsys)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def test_train_settings_by_name_and_by_section(tmp_path):
    folder = write_image_folder(tmp_path / "images", n_per_class=20)
    trained = cnnlab.train(TINY_SPEC, dataset=folder, epochs=2, out=tmp_path / "run", lr=0.05, batch_size=15,
                           image_size=12, settings={"train.shift": 1, "data.val_fraction": 0.2},
                           progress=False, verbose=False)
    assert isinstance(trained, cnnlab.Model) and trained.path == tmp_path / "run" / "model.safetensors"
    config = trained.config
    assert (config.train.lr, config.train.batch_size, config.train.shift, config.train.epochs) == (0.05, 15, 1, 2)
    assert (config.data.image_size, config.data.val_fraction, config.data.dataset) == (12, 0.2, f"folder:{folder}")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["lr"] == 0.05 and saved["data"]["val_fraction"] == 0.2
    metrics = trained.metrics
    assert metrics["accuracy"] == metrics["test_accuracy"] and metrics["loss"] == metrics["test_loss"]
    assert metrics["epoch"] == 2 and len(trained.history) == 2
    assert isinstance(metrics, Metrics) and "accuracy" in str(metrics) and "<table>" in metrics._repr_html_()


def test_train_takes_a_config_dict_and_a_config_object(tmp_path):
    folder = write_image_folder(tmp_path / "images", n_per_class=10)
    content = {"model": TINY_SPEC, "data": {"dataset": f"folder:{folder}", "image_size": 12},
               "train": {"epochs": 1, "batch_size": 10}}
    first = cnnlab.train(content, out=tmp_path / "a", progress=False, verbose=False)
    config = resolve_config(None, content)
    second = cnnlab.train(config, out=tmp_path / "b", progress=False, verbose=False)
    assert first.config == second.config == config
    assert torch.equal(first.module.features[0].weight, second.module.features[0].weight)  # same seed, same run


def test_train_mistakes_are_the_cli_lines(capsys):
    with pytest.raises(cnnlab.CnnlabError, match=r"^lrr: unknown setting \(did you mean 'lr'\?\)$"):
        cnnlab.train("tutorial", lrr=0.1)
    with pytest.raises(cnnlab.CnnlabError) as caught:
        cnnlab.train("tutorial", settings={"train.lrr": 0.1})
    assert str(caught.value) == error_line(["train", "--preset", "tutorial", "--set", "train.lrr=0.1"], capsys)
    with pytest.raises(cnnlab.CnnlabError) as caught:
        cnnlab.train("tutorial", lr=-1)
    assert str(caught.value) == error_line(["train", "--preset", "tutorial", "--lr", "-1"], capsys)
    with pytest.raises(cnnlab.CnnlabError, match="expected SECTION.NAME"):
        cnnlab.train("tutorial", settings={"shift": 2})
    with pytest.raises(cnnlab.CnnlabError, match=r"tutoral: not a preset \(did you mean 'tutorial'\?\) nor a config file"):
        cnnlab.train("tutoral")


# ---------------------------------------------------------------------------------------------
# load and Model
# ---------------------------------------------------------------------------------------------

def test_load_mistakes_are_the_cli_lines(tmp_path, capsys):
    with pytest.raises(cnnlab.CnnlabError) as caught:
        cnnlab.load(tmp_path / "nothing")
    assert str(caught.value) == error_line(["evaluate", str(tmp_path / "nothing")], capsys)


def test_model_describes_itself(model, tiny_run):
    assert model.classes == CLASSES and model.input_shape == (1, SIZE, SIZE) and model.run_dir == tiny_run
    assert isinstance(model.module, nn.Module) and model.run.model is model.module
    text = repr(model)
    assert "horizontal, square, vertical" in text and "test accuracy" in text
    assert "<table>" in model._repr_html_() and "1x12x12" in model._repr_html_()


def test_predict_takes_paths_folders_pil_images_arrays_and_tensors(model, tiny_run):
    folder = tiny_run.parent / "data" / "test"
    files = sorted(folder.glob("*/*.png"))
    by_path = model.predict([str(f) for f in files], top_k=2)
    assert isinstance(by_path, Predictions) and all(isinstance(p, Prediction) for p in by_path)
    assert by_path.sources == [str(f) for f in files] and all(len(p.top_k) == 2 for p in by_path)
    assert [p.label for p in model.predict(folder)] == [p.label for p in by_path]  # a folder: its files, sorted
    grey = np.array(Image.open(files[0]))  # (H, W) uint8
    expected = by_path[0].confidence
    for same in (Image.open(files[0]), grey, grey.astype(np.float32) / 255, grey[:, :, None],
                 torch.from_numpy(grey), torch.from_numpy(grey)[None], torch.from_numpy(grey)[None, None]):
        (prediction,) = model.predict(same, top_k=2)
        assert prediction.label == by_path[0].label and prediction.confidence == pytest.approx(expected, abs=1e-5)
    batch = np.stack([np.asarray(Image.open(f)) for f in files[:3]])  # (N, H, W)
    assert [p.label for p in model.predict(batch)] == [p.label for p in by_path[:3]]
    assert "confidence" in str(by_path) and by_path._repr_html_().count("<tr>") == len(files) + 1


def test_predict_mistakes_are_the_cli_lines(model, tiny_run, tmp_path, capsys):
    missing, broken = tmp_path / "missing.png", tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for path in (missing, broken):
        with pytest.raises(cnnlab.CnnlabError) as caught:
            model.predict([path])
        assert str(caught.value) == error_line(["predict", str(tiny_run), str(path)], capsys)
    with pytest.raises(cnnlab.CnnlabError, match="top_k must be at least 1"):
        model.predict(np.zeros((12, 12)), top_k=0)
    with pytest.raises(cnnlab.CnnlabError, match=r"image 0: an image array is \(H, W\)"):
        model.predict(np.zeros((2, 12, 12, 5)))
    with pytest.raises(cnnlab.CnnlabError, match="not an image: dict"):
        model.predict({"an": "image"})


@pytest.mark.slow  # every picture again (seconds); test_visualize draws each in the fast tier
def test_show_draws_every_picture(model, tiny_run):
    image = sorted((tiny_run.parent / "data" / "test").glob("*/*.png"))[0]
    for kind in ("feature-maps", "filters", "curves", "confusion", "mistakes"):
        assert isinstance(model.show(kind), Figure), kind
    assert isinstance(model.show("feature-maps", image=image), Figure)
    assert isinstance(model.show("filters", layer=4), Figure)
    with pytest.raises(cnnlab.CnnlabError, match="unknown picture 'bogus'"):
        model.show("bogus")
    with pytest.raises(cnnlab.CnnlabError, match="--layer 2: not a conv layer"):
        model.show("filters", layer=2)


def test_explain_gives_maps_and_show_draws_them(model, tiny_run):
    pytest.importorskip("captum")
    image = sorted((tiny_run.parent / "data" / "test").glob("*/*.png"))[0]
    explanation = model.explain(image, method="saliency")
    assert explanation.method == "saliency" and tuple(explanation.maps.shape) == (1, *model.input_shape[1:])
    two = model.explain([image, image], target=model.classes[1])
    assert two.method == "gradcam" and two.target.tolist() == [1, 1]
    for method in ("gradcam", "integrated-gradients"):
        assert isinstance(model.show(method, image=image), Figure), method
    assert isinstance(model.show("gradcam"), Figure)  # a test image, as feature-maps takes one
    with pytest.raises(cnnlab.CnnlabError, match="unknown method 'bogus'"):
        model.explain(image, method="bogus")


def test_evaluate_takes_a_limit_per_class(model):
    full, small = model.evaluate(), model.evaluate(limit_per_class=2)
    assert small["count"] == 2 * len(model.classes) < full["count"]


def test_compare_in_python_is_the_cli_json(tiny_run, tmp_path, capsys):
    result = cnnlab.compare(tiny_run, tiny_run, html=tmp_path / "c.html")
    assert main(["compare", str(tiny_run), str(tiny_run), "--json"]) == 0
    assert result == json.loads(capsys.readouterr().out) and (tmp_path / "c.html").is_file()
    with pytest.raises(cnnlab.CnnlabError, match="use a .html file name"):
        cnnlab.compare(tiny_run, html=tmp_path / "c.png")


@pytest.mark.slow
def test_lr_find_in_python_suggests_a_rate(tiny_run, tmp_path):
    result = cnnlab.lr_find({"model": TINY_SPEC}, dataset=tiny_run.parent / "data", steps=20, plot=tmp_path / "lr.png",
                            limit_per_class=3, verbose=False, image_size=12, batch_size=4, device="cpu")
    assert len(result.lrs) <= 20 and result.suggestion > 0 and (tmp_path / "lr.png").is_file()


def test_evaluate_is_the_cli_evaluate(model, tiny_run, capsys):
    metrics = model.evaluate()
    assert main(["evaluate", str(tiny_run), "--json"]) == 0
    assert dict(metrics) == json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"accuracy", "loss", "count", "per_class", "confusion"}
    assert "confusion matrix" in str(metrics) and "per class" in metrics._repr_html_()


@pytest.mark.slow  # the ONNX exporter takes seconds
def test_export_writes_a_checked_file(model, tmp_path):
    report = model.export("onnx", tmp_path / "m.onnx")
    assert Path(report["path"]).is_file() and max(report["max_abs_diff"].values()) <= report["tolerance"]
    with pytest.raises(cnnlab.CnnlabError, match="unknown export format"):
        model.export("tflite", tmp_path / "m.tflite")


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------

def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@needs_mnist
def test_the_readme_python_block_runs_as_written(tmp_path):
    """A plain `python` script of the README's block, in an empty folder: trains the tutorial for one
    epoch on MNIST, predicts the digit it draws, draws feature maps, evaluates and exports."""
    script = tmp_path / "readme.py"
    script.write_text(readme_python_block())
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "28938"
    accuracy = float(next(line for line in lines if re.fullmatch(r"0\.\d+", line)))
    assert accuracy > 0.9  # one epoch of the tutorial's recipe; it reports 98.06% after ten
    for name in ("runs/t1/model.safetensors", "digit.png", "feature-maps.png", "m.onnx"):
        assert (tmp_path / name).is_file(), name
