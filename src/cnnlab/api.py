"""cnnlab from Python: the commands as functions, on the same objects the CLI uses.

    import cnnlab
    cnnlab.summary("tutorial").total_params                   # 28938
    model = cnnlab.train("tutorial", epochs=1, out="runs/t1")  # a Model
    model.predict(["digit.png"], top_k=3)                      # predict.Prediction objects
    model.show("feature-maps", image="digit.png")              # a matplotlib Figure
    model.evaluate()["accuracy"]; model.export("onnx", "m.onnx")

`summary` is `cnnlab summary` (summary.load_spec + summarize), `train` is `cnnlab train`
(config.resolve_config + train.fit), `load` opens a model as every command does
(runs.open_run). A `Model` holds that `Run` and adds what a user does with a
trained model: predict (predict.Predictor), show (visualize's figures), evaluate
(Run.evaluate) and export (export.export_model). Mistakes raise `CnnlabError` with the
message the CLI prints after `error: `.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .runs import Run, open_run
from .config import FOLDER, Config, DataConfig, TrainConfig, field_help, folder_path, resolve_config, split_settings
from .display import Metrics, NetworkSummary, Predictions, show_figures_inline
from .errors import CnnlabError, shorten
from .module_summary import ModuleSummary, summarize_module
from .presets import PRESETS
from .summarize import load_spec, parse_input_shape, summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .explain import Explanation

    from .predict import Predictor

__all__ = ["Model", "compare", "load", "lr_find", "summary", "train", "tune"]

PICTURES = ("feature-maps", "filters", "curves", "confusion", "mistakes")
EXPLAIN_METHODS = ("gradcam", "saliency", "integrated-gradients", "occlusion")  # explain.METHODS, also pictures


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------

def summary(model: str | os.PathLike | Sequence | Mapping | torch.nn.Module | Model | Run,
            input_shape: tuple[int, ...] | str | None = None, *, classes: int | None = None,
            name: str | None = None) -> NetworkSummary | ModuleSummary:
    """A network layer by layer, as `cnnlab summary` prints it.

    Args:
        model: what to describe, one of
            - a preset name: "tutorial", "default", "fast", "best", "rgb32", "cifar-fast", "cifar-gpu";
            - a config file (YAML/TOML/JSON with a `model:` list of layers);
            - a run folder or a model .safetensors file;
            - a list of layer specs as in a config file, e.g.
              `[{"type": "conv", "out_channels": 8, "kernel_size": 3}, "relu", "flatten", {"type": "linear"}]`
              (or a whole config as a dict with `model`, `data`, `train`);
            - a trained `Model` (from `cnnlab.load` or `cnnlab.train`);
            - any `torch.nn.Module` you wrote: one zero image of `input_shape` runs through it and
              forward hooks record each leaf module's output shape, parameters and multiply-adds;
              Conv2d, MaxPool2d and AvgPool2d rows show the output-size formula.
        input_shape: one image's shape (C, H, W), as a tuple or text like "1x28x28". Default: the
            data's (28x28 grey for MNIST, 3x32x32 for colour folders) or the trained model's.
            Required for an `nn.Module`.
        classes: the number of classes, i.e. the last linear layer's outputs (default: the data's,
            else 10). Not used for an `nn.Module`.
        name: the table's title.

    Returns:
        A `NetworkSummary` (it wraps `summary.Summary`: `.total_params`, `.total_macs`, `.layers`
        with formula, shapes, parameters, MACs and receptive field per layer, `.warnings`,
        `.to_dict()`), or a `ModuleSummary` for an `nn.Module` (`.total_params`, `.total_macs`,
        `.rows`). Both print as a text table and show as an HTML table in Jupyter.

    Raises:
        CnnlabError: an unknown preset, a missing file, a layer that cannot work (naming it and
            the numbers), a module that fails on `input_shape`.
    """
    if isinstance(model, torch.nn.Module):
        if input_shape is None:
            raise CnnlabError(f"summary of a {type(model).__name__}: give input_shape, one image's shape, e.g. (1, 28, 28)")
        shape = parse_input_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
        return summarize_module(model, shape, name)
    shape = _input_shape(input_shape)
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise CnnlabError(f"classes must be a positive whole number, got {shorten(classes)}")
    if isinstance(model, Model):
        model = model.run
    if isinstance(model, Run):
        title, layers = model.name, model.layers
        shape, classes = shape or model.input_shape, classes or len(model.classes)
    elif isinstance(model, (list, tuple, dict)):
        _, layers, shape, classes = load_spec(config_file=model, input_shape=shape, num_classes=classes)  # type: ignore[arg-type]
        title = "layer list"
    elif isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        path = Path(text).expanduser()
        if text in PRESETS:
            title, layers, shape, classes = load_spec(preset=text, input_shape=shape, num_classes=classes)
        elif path.is_dir() or path.suffix == ".safetensors":
            title, layers, shape, classes = load_spec(run_dir=text, input_shape=shape, num_classes=classes)
        elif path.is_file():
            title, layers, shape, classes = load_spec(config_file=text, input_shape=shape, num_classes=classes)
        else:
            raise _not_found(text, "nor a config file or run folder")
    else:
        raise CnnlabError(f"summary: expected a preset name, a file or folder, a list of layers, a Model or an "
                          f"nn.Module, got {type(model).__name__}")
    return NetworkSummary(summarize(layers, shape, classes, name=name or title))


def _not_found(text: str, what: str) -> CnnlabError:
    guess = difflib.get_close_matches(text, list(PRESETS), n=1)
    hint = f"did you mean '{guess[0]}'?" if guess else f"presets: {', '.join(PRESETS)}"
    return CnnlabError(f"{text}: not a preset ({hint}) {what}")


def _input_shape(value: tuple[int, ...] | str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_input_shape(value)
    shape = tuple(value)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise CnnlabError(f"input_shape: expected (C, H, W) with positive whole numbers, e.g. (1, 28, 28), got {shorten(value)}")
    return shape  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig}


def train(preset_or_config: str | os.PathLike | Mapping | Sequence | Config | None = None, *,
          epochs: float | None = None, out: str | os.PathLike | None = None, overwrite: bool = False,
          dataset: str | os.PathLike | None = None, limit_per_class: int | None = None,
          settings: Mapping[str, Any] | None = None, progress: bool = True, verbose: bool = True,
          scratch: bool = False, **setting_values: Any) -> Model:
    """Train a CNN, as `cnnlab train` does, and return the trained `Model`.

    Settings flow as on the command line: the preset's values, then the config, then the
    arguments given here; the resolved configuration is saved in the run folder (config.json).

    Args:
        preset_or_config: what to train:
            - a preset name (the presets are listed at the end of this help);
            - a config file (YAML/TOML/JSON) or its content as a dict (`{"model": [...], "train": {...}}`);
            - a list of layer specs (trained with the default recipe);
            - a `cnnlab.config.Config`;
            - None: the `default` preset for datasets by name; for a folder of colour photos, the
              `photos` preset (ImageNet's EfficientNet-Lite0, when cnnlab[pretrained] is installed);
              for grey images, or with `scratch=True`, the `rgb32` network with its batch, length and
              learning rate fitted to the folder (said in one line).
        epochs: passes over the training data; a fraction such as 0.1 trains on part of one epoch.
        out: the run folder to write (default: a new folder runs/<time>-<preset>). A folder that
            already holds a run is refused unless `overwrite=True`, which replaces that run.
        dataset: a dataset by name ("mnist", "fashion-mnist", "cifar10", ...), or a folder (or a
            .zip/.tar.gz archive) with one sub-folder of images per class, as "folder:PATH" or as
            a `pathlib.Path`.
        limit_per_class: use at most this many images of each class in every split (a seeded
            draw): try a recipe small first (`--limit-per-class`, data.limit_per_class).
        settings: more settings by their full name, as `--set` takes them:
            `{"train.shift": 2, "data.val_fraction": 0.2, "model.3.out_channels": 64}` (layers
            numbered from 1, as `cnnlab summary` numbers them).
        progress: show a progress bar (in a terminal, and in Jupyter as a notebook bar).
        verbose: print what is trained and one line per epoch.
        scratch: a folder with no preset or config: train a network from scratch rather than start
            from ImageNet's weights (`cnnlab train --scratch`).
        **setting_values: any setting by its name alone, e.g. `lr=0.001, batch_size=64, shift=2,
            image_size=32, limit_per_class=20` (all of them are listed below). These win over `settings`.

    Returns:
        The trained `Model`, loaded from the run folder (`.metrics["accuracy"]` is its test
        accuracy, `.path` its model file).

    Raises:
        CnnlabError: an unknown preset or setting (with a "did you mean"), a bad value, a layer
            that cannot work with the data, missing data, training that diverged, Ctrl-C
            (saved; resumable with `cnnlab train --resume`).
    """
    from .training import fit

    if limit_per_class is not None:
        setting_values = {**setting_values, "limit_per_class": limit_per_class}
    log = print if verbose else (lambda *_: None)
    overrides = _overrides(epochs, dataset, settings, setting_values)
    folder = str(overrides["data"].get("dataset") or "")
    if preset_or_config is None and folder_path(folder) is not None and not overrides["train"].get("init") and not scratch:
        from .recipes import folder_default

        preset_or_config, line = folder_default(folder)
        if line:
            log(line)
    config = _resolve(preset_or_config, overrides, "train")
    result = fit(config, out, progress=progress, log=log, overwrite=overwrite)
    log(f"run saved to {result['run_dir']}")
    return load(result["run_dir"])


def _resolve(preset_or_config, overrides: dict[str, dict[str, Any]], what: str) -> Config:
    """The resolved `Config` of train's or lr_find's first argument and settings."""
    source = preset_or_config
    if isinstance(source, Config):
        source = source.to_dict()
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) in PRESETS:
        config = resolve_config(os.fspath(source), None, overrides)
    elif isinstance(source, (str, os.PathLike)):
        if not Path(source).expanduser().is_file():
            raise _not_found(os.fspath(source), "nor a config file")
        config = resolve_config(None, Path(source).expanduser(), overrides)
    elif source is None or isinstance(source, (dict, list, tuple)):
        config = resolve_config(None, source, overrides)  # type: ignore[arg-type]
    else:
        raise CnnlabError(f"{what}: expected a preset name, a config file, a dict, a list of layers or a Config, "
                          f"got {type(source).__name__}")
    return config


def _overrides(epochs, dataset, settings, setting_values) -> dict[str, dict[str, Any]]:
    """train()'s arguments as resolve_config's {"train": {...}, "data": {...}}, names checked."""
    sections = split_settings(dict(settings or {}))  # resolve_config names an unknown one, with a "did you mean"
    fields = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for name, value in setting_values.items():
        if name not in fields:
            guess = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else " (help(cnnlab.train) lists them)"
            raise CnnlabError(f"{name}: unknown setting{hint}")
        sections[fields[name]][name] = value
    if epochs is not None:
        sections["train"]["epochs"] = epochs
    if dataset is not None:
        sections["data"]["dataset"] = FOLDER + os.fspath(dataset) if isinstance(dataset, os.PathLike) else dataset
    return sections


def _settings_help() -> str:
    """Every setting with its default and the description from its dataclass (config.py), for train's docstring."""
    lines = ["", "    Presets:", ""]
    for name, preset in PRESETS.items():
        lines += textwrap.wrap(f"{name}: {preset['description']}", width=100, initial_indent="        ",
                               subsequent_indent="            ")
    lines += ["", "    Settings by name (a preset sets many of them; `cnnlab train --help` shows the same):"]
    for section, cls in SECTIONS.items():
        lines.append("")
        lines.append(f"    {section} settings (or settings={{'{section}.NAME': value}}):")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            text = " ".join(field_help(cls, f.name).split())
            lines.append(f"        {f.name} (default {default!r}){': ' + text if text else ''}")
    return "\n".join(lines) + "\n"


train.__doc__ = (train.__doc__ or "") + _settings_help()


# ---------------------------------------------------------------------------------------------
# lr_find, tune, compare
# ---------------------------------------------------------------------------------------------

def lr_find(preset_or_config: str | os.PathLike | Mapping | Sequence | Config | None = None, *,
            dataset: str | os.PathLike | None = None, start: float = 1e-7, end: float = 10.0, steps: int = 200,
            plot: str | os.PathLike | None = None, limit_per_class: int | None = None,
            settings: Mapping[str, Any] | None = None, verbose: bool = True, **setting_values: Any):
    """The learning-rate range test, as `cnnlab lr-find` runs it: a copy of the network trains for
    `steps` steps while the rate rises from `start` to `end`; the suggestion is fastai's "valley".

    Args:
        preset_or_config, dataset, limit_per_class, settings, **setting_values: as `train` takes them.
        start, end, steps: the sweep.
        plot: write the loss-against-rate plot to this PNG file.
        verbose: print what it does.

    Returns:
        A `lr_range.RangeTest`: `.suggestion` (the rate to try), `.lrs`, `.losses`, `.smoothed`,
        `.stopped` ("end" or "diverged"), `.to_dict()`.
    """
    from .lr_range import find_lr

    if limit_per_class is not None:
        setting_values = {**setting_values, "limit_per_class": limit_per_class}
    config = _resolve(preset_or_config, _overrides(None, dataset, settings, setting_values), "lr_find")
    result, _ = find_lr(config, start, end, steps, plot, log=print if verbose else (lambda *_: None))
    return result


def tune(space: str | os.PathLike, trials: int, *, workers: int = 1, out: str | os.PathLike | None = None,
         storage: str | None = None, study: str | None = None, data_root: str | None = None,
         threads: int | None = None, limit_per_class: int | None = None) -> Path:
    """Search hyper-parameters with Optuna, as `cnnlab tune SPACE.yaml --trials N` does (it prints the
    same lines); needs the optuna package.

    Args:
        space: the SPACE.yaml file (base preset or config, fixed settings, the search space).
        trials: finished trials the study should hold (a second call continues the same study).
        workers: worker processes on this machine.
        out: the study folder (default: runs/<the file's name>).
        storage, study, data_root, threads: as `cnnlab tune --help` describes them.
        limit_per_class: train every trial on at most this many images of each class.

    Returns:
        The study folder: trials.md (the table), best.yaml (`cnnlab.train(folder / "best.yaml")`
        trains the best settings), history.png and importance.png.

    Raises:
        CnnlabError: a mistake in the space file, or the study stopped before `trials` finished
            (call again to continue).
    """
    from .tuning import tune as run_study

    study_dir = Path(out).expanduser() if out else Path("runs") / (study or Path(space).stem)
    code = run_study(space, trials, workers, storage, study, study_dir, data_root, threads,
                     limit_per_class=limit_per_class)
    if code != 0:
        raise CnnlabError(f"tune: the study in {study_dir} stopped before {trials} trials finished; call again to continue",
                          code)
    return study_dir


def compare(*runs: str | os.PathLike, html: str | os.PathLike | None = None) -> dict[str, Any]:
    """Runs side by side, as `cnnlab compare` shows them.

    Args:
        *runs: run folders or glob patterns ("runs/*-tutorial").
        html: also write a self-contained HTML page with the curves overlaid.

    Returns:
        A dict, as `cnnlab compare --json` prints it: "differing_settings" and per run its
        "settings", "final" metrics and times.
    """
    from .comparison import comparison, read_runs, write_html

    if not runs:
        raise CnnlabError("compare: give at least one run folder or pattern")
    opened = read_runs([os.fspath(run) for run in runs])
    if html is not None:
        if Path(html).suffix.lower() not in (".html", ".htm"):
            raise CnnlabError(f"compare: html={os.fspath(html)!r}: the page is HTML; use a .html file name")
        write_html(opened, html)
    return comparison(opened)


# ---------------------------------------------------------------------------------------------
# load and Model
# ---------------------------------------------------------------------------------------------

def load(path: str | os.PathLike, device: str = "cpu") -> Model:
    """Open a trained model: a run folder or a model .safetensors file.

    Args:
        path: the run folder (as `cnnlab train` writes it) or its model.safetensors.
        device: where the model runs: "cpu", "cuda", or "auto" (CUDA when present).

    Returns:
        A `Model`.

    Raises:
        CnnlabError: no such file or folder, not a cnnlab model, weights and layer spec disagree.
    """
    from .runtime import resolve_device

    return Model(open_run(path, resolve_device(device)))


class Model:
    """A trained model, ready to use from Python: `predict`, `show`, `evaluate`, `export`.

    It is the Python face of the `runs.Run` that every command opens (`.run`: the PyTorch module,
    layer spec, preprocessing, classes, training config, metrics, history and test data).
    """

    def __init__(self, run: Run, dataset: str | None = None, data_root: str | None = None):
        """Wrap the opened `run`; `dataset`/`data_root` choose the test data for evaluate and show
        (default: the data it was trained on)."""
        self.run = run
        if dataset or data_root:
            run.dataset_override, run.data_root = dataset, data_root
        self._predictor: Predictor | None = None

    # what it is ---------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The model .safetensors file."""
        return self.run.path

    @property
    def run_dir(self) -> Path:
        """The run folder holding the model file, config.json and metrics.jsonl."""
        return self.run.run_dir

    @property
    def name(self) -> str:
        """The run folder's name (or the model file's, outside a run folder)."""
        return self.run.name

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the model's outputs."""
        return self.run.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's input."""
        return self.run.input_shape

    @property
    def config(self) -> Config | None:
        """The resolved training configuration."""
        return self.run.config

    @property
    def module(self) -> torch.nn.Module:
        """The PyTorch module (a `layers.CNN`), in eval mode."""
        return self.run.model

    @property
    def metrics(self) -> Metrics:
        """The last epoch's metrics as saved by training; `accuracy` and `loss` are those on the test split."""
        saved = dict(self.run.metrics)
        test = {"accuracy": saved["test_accuracy"]} if "test_accuracy" in saved else {}
        if "test_loss" in saved:
            test["loss"] = saved["test_loss"]
        return Metrics({**test, **saved})

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics of the run (metrics.jsonl), oldest first."""
        return self.run.history()

    def summary(self) -> NetworkSummary:
        """Its layer-by-layer table (`cnnlab summary RUN`)."""
        return summary(self)  # type: ignore[return-value]

    # using it -----------------------------------------------------------------------------------

    def predict(self, inputs: Any, top_k: int = 1) -> Predictions:
        """Classify images, as `cnnlab predict` does (the model's own preprocessing included).

        Args:
            inputs: one image or a list of them. An image is a file path (a folder: every file in
                it), a PIL image, a numpy array ((H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA;
                a 3-D array that is not (H, W, 3|4) is a batch of grey images, a 4-D one a batch
                of (H, W, C)), or a torch tensor ((H, W), (C, H, W), or a batch (N, C, H, W)).
                Integer arrays hold 0..255, float arrays 0..1.
            top_k: also list the `top_k` most likely classes of each image.

        Returns:
            A list of `predict.Prediction` (`.label`, `.confidence`, `.index`, `.top_k`), one per
            image in order; `.sources` names each image.

        Raises:
            CnnlabError: an image that cannot be read, with the reason (as `cnnlab predict` prints it).
        """
        from .predict import batch_size_for

        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise CnnlabError(f"top_k must be at least 1, got {shorten(top_k)}")
        predictor = self._get_predictor()
        expanded = _expand(inputs)
        sources = [source for source, _ in expanded]
        inputs_uint8 = [self._prepare(source, item) for source, item in expanded]
        predictions = []
        batch = batch_size_for(predictor.input_shape)
        for start in range(0, len(inputs_uint8), batch):
            probabilities = predictor.probabilities(torch.stack(inputs_uint8[start:start + batch]))
            predictions += [predictor.top_k(p, top_k) for p in probabilities]
        return Predictions(predictions, sources)

    def show(self, kind: str, image: Any = None, *, layer: int | str | None = None, index: int = 0, maps: int = 8,
             normalize: bool = False, count: int = 24, target: int | str | None = None) -> Figure:
        """A picture of the model, as `cnnlab show KIND RUN` draws it; Jupyter shows it inline.

        Args:
            kind: "feature-maps" (every conv/activation/pool layer's maps for one image),
                "filters" (a conv layer's learned kernels), "curves" (loss and accuracy per epoch),
                "confusion" (the confusion matrix on the test split), "mistakes" (the most
                confidently wrong test images), or an explanation of one image: "gradcam",
                "saliency", "integrated-gradients", "occlusion" (as `cnnlab explain` draws it).
            image: feature-maps: the image (anything `predict` takes); default: test image `index`.
            layer: filters: the conv layer's number in the summary, "5.1" inside a residual block
                (default: the first conv); gradcam: the layer it looks at.
            index: feature-maps: the test image to use when no `image` is given.
            maps: feature-maps: maps shown per layer.
            normalize: confusion: show each row as percentages.
            count: mistakes: how many images.
            target: gradcam, saliency, integrated-gradients, occlusion (`explain`'s methods, one
                image): the class to explain (default: the predicted one).

        Returns:
            A matplotlib `Figure` (save it with `fig.savefig("x.png")`).
        """
        from . import visualize

        show_figures_inline()
        run = self.run
        if kind == "filters":
            return visualize.filters_figure(self.run, layer)
        if kind == "feature-maps":
            if image is None:
                picture, caption = visualize.pick_test_image(run, index)
            else:
                images = _expand(image)
                if len(images) != 1:
                    raise CnnlabError(f"feature-maps: give one image, got {len(images)}")
                source, item = images[0]
                picture, caption = self._prepare(source, item), Path(source).name
            return visualize.feature_maps_figure(self.run, picture, caption, maps)
        if kind == "curves":
            return visualize.curves_figure(run.history(), f"Training curves of {self.name}")
        if kind == "confusion":
            metrics = run.evaluate()
            return visualize.confusion_figure(metrics["confusion"], self.classes,
                                              visualize.confusion_title(self.name, metrics), normalize)
        if kind == "mistakes":
            data = run.data()
            return visualize.mistakes_figure(data.test.images, data.test.labels, run.test_logits(), self.classes,
                                             f"Most confident mistakes of {self.name}", count)
        if kind in EXPLAIN_METHODS:
            if image is None:
                picture, caption = visualize.pick_test_image(run, index)
                inputs = [(caption, picture)]
            else:
                inputs = _expand(image)
                if len(inputs) != 1:
                    raise CnnlabError(f"{kind}: give one image, got {len(inputs)}")
                caption = Path(inputs[0][0]).name
            from .explain import explanation_figure

            prepared, explanation = self._explain(inputs, kind, target, layer)
            return explanation_figure(prepared[0], explanation, 0, self.classes, caption)
        raise CnnlabError(f"show: unknown picture {shorten(kind)} (choose {', '.join(PICTURES + tuple(EXPLAIN_METHODS))})")

    def explain(self, inputs: Any, method: str = "gradcam", *, target: int | str | None = None,
                layer: int | None = None) -> "Explanation":
        """Which pixels made the model decide, as `cnnlab explain` computes it (without writing pictures).

        Args:
            inputs: one image or several: file paths, folders, PIL images, numpy arrays, tensors
                (as `predict` takes them).
            method: "gradcam" (default), "saliency", "integrated-gradients" or "occlusion".
            target: explain this class (a name or index) instead of each image's predicted class.
            layer: Grad-CAM's layer, by its number in the summary (default: the last conv block
                with at least 2x2 outputs).

        Returns:
            An `explain.Explanation`: `.maps` (B, H, W), `.probabilities`, `.predicted`, `.target`,
            and `.item(i, model.classes)`, one image's result as a dict. `model.show(method, image)`
            draws one.
        """
        return self._explain(_expand(inputs), method, target, layer)[1]

    def _explain(self, inputs: list[tuple[str, Any]], method: str, target, layer) -> tuple[torch.Tensor, "Explanation"]:
        """(the model's uint8 inputs, their explanation); a test image (uint8, the input shape) is used as it is."""
        from .explain import check_captum, explain

        check_captum()
        prepared = torch.stack([item if isinstance(item, torch.Tensor) and item.dtype == torch.uint8
                                and tuple(item.shape) == tuple(self.input_shape) else self._prepare(source, item)
                                for source, item in inputs])
        return prepared, explain(self.run, prepared, method, target, layer)

    def evaluate(self, dataset: str | None = None, data_root: str | None = None, *,
                 limit_per_class: int | None = None) -> Metrics:
        """Loss, accuracy, per-class metrics and confusion matrix on a test split (`cnnlab evaluate`).

        Args:
            dataset: evaluate on this dataset's test split ("mnist", "folder:PATH"; same classes);
                default: the one it was trained on.
            data_root: the folder holding named datasets (default: $CNNLAB_DATA, else ~/.cache/cnnlab).
            limit_per_class: at most this many test images of each class (a seeded draw): a quick look.

        Returns:
            `Metrics`, a dict: accuracy, "loss", "count", "macro_f1", "per_class", "confusion", "classes".
        """
        if dataset is None and data_root is None and limit_per_class is None:
            return Metrics(self.run.evaluate())
        return Metrics(self.run.evaluate(self.run.load_test_data(dataset, data_root, limit_per_class=limit_per_class)))

    def export(self, format: str = "onnx", path: str | os.PathLike | None = None, *, tolerance: float | None = None,
               check_real: bool = True) -> dict[str, Any]:
        """Write the model as ONNX or a torch.export program, checked against the original (`cnnlab export`).

        Args:
            format: "onnx" or "pt2".
            path: the file to write (default: beside the model, model.onnx / model.pt2).
            tolerance: the largest logit difference allowed between the file and the model.
            check_real: also compare on real test images, not only random inputs.

        Returns:
            The report `cnnlab export --json` prints: path, "bytes", "max_abs_diff", ...
        """
        from .export import TOLERANCE, export_model

        if not self.path.is_file():
            raise CnnlabError(f"{self.path}: the model is not saved as a file; save it before exporting")
        return export_model(self.path, format, path, TOLERANCE if tolerance is None else tolerance, check_real)

    # display ------------------------------------------------------------------------------------

    def _facts(self) -> dict[str, Any]:
        shape = "x".join(map(str, self.input_shape))
        classes = ", ".join(self.classes[:10]) + (f", ... ({len(self.classes)})" if len(self.classes) > 10 else "")
        facts = {"model": str(self.path), "dataset": self.run.dataset, "input": f"{shape} (channels x height x width)",
                 "classes": classes, "parameters": sum(p.numel() for p in self.module.parameters()),
                 "preprocessing": self.run.preprocessing.kind}
        if self.run.epoch is not None:
            facts["epochs trained"] = self.run.epoch
        if "test_accuracy" in self.run.metrics:
            facts["test accuracy"] = f"{100 * self.run.metrics['test_accuracy']:.2f}%"
        return facts

    def __repr__(self) -> str:
        facts = self._facts()
        width = max(len(k) for k in facts)
        lines = [f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}" for k, v in facts.items()]
        return f"cnnlab Model {self.name!r}\n" + "\n".join(lines)

    def _repr_html_(self) -> str:
        from .formatting import html_table, key_value_rows

        return html_table(key_value_rows(self._facts()), caption=f"cnnlab Model {self.name!r}")

    # internals ----------------------------------------------------------------------------------

    def _get_predictor(self) -> Predictor:
        from .predict import Predictor

        if self._predictor is None:
            self._predictor = Predictor(self.run, next(self.module.parameters()).device)
        return self._predictor

    def _prepare(self, source: str, item: Any) -> torch.Tensor:
        """One image -> the model's uint8 input (C, H, W), through the model's preprocessing."""
        from .predict import BadImage

        predictor = self._get_predictor()
        try:
            return predictor.prepare(_to_image(item, predictor))
        except BadImage as exc:  # the line `cnnlab predict` prints for a file it cannot read
            raise CnnlabError(f"{source}: {exc}", exc.exit_code) from None


# ---------------------------------------------------------------------------------------------
# Images given from Python
# ---------------------------------------------------------------------------------------------

def _expand(inputs: Any) -> list[tuple[str, Any]]:
    """One input or a list of them -> (name, single image) pairs: folders and batches expanded."""
    from .predict import iter_files

    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    out: list[tuple[str, Any]] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item).expanduser()
            out += [(str(p), p) for p in iter_files([path])]
        elif isinstance(item, (np.ndarray, torch.Tensor)) and _is_batch(item):
            out += [(f"image {len(out) + n}", one) for n, one in enumerate(item)]
        else:
            out.append((f"image {len(out)}", item))
    if not out:
        raise CnnlabError(f"no images in {shorten(inputs)}")
    return out


def _is_batch(array: np.ndarray | torch.Tensor) -> bool:
    if array.ndim == 4:
        return True
    # a 3-D numpy array is an (H, W, C) image when its last axis can be colour; a 3-D tensor is (C, H, W)
    return isinstance(array, np.ndarray) and array.ndim == 3 and array.shape[2] not in (1, 3, 4)


def _to_image(item: Any, predictor: Predictor) -> Image.Image:
    """A path, PIL image, array or tensor -> a PIL image; `predict.BadImage` for what is not an image."""
    from .predict import BadImage

    if isinstance(item, Path):
        return predictor.load(item)  # size limits and decoder errors, as `cnnlab predict` checks them
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, torch.Tensor):
        array = item.detach().cpu().numpy()
        if array.ndim == 3:
            if array.shape[0] not in (1, 3, 4):
                raise BadImage(f"a tensor image is (C, H, W) with 1, 3 or 4 channels, got shape {tuple(item.shape)}")
            array = array.transpose(1, 2, 0)
        item = array
    if isinstance(item, np.ndarray):
        return _array_to_image(item)
    raise BadImage(f"not an image: {type(item).__name__} (give file paths, PIL images, numpy arrays or tensors)")


def _array_to_image(array: np.ndarray) -> Image.Image:
    from .predict import BadImage

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise BadImage(f"an image array is (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.nan_to_num(array.astype(np.float32)), 0, 1) * 255  # floats are 0..1, as ToTensor gives
    elif not np.issubdtype(array.dtype, np.integer):
        raise BadImage(f"an image array holds numbers, got dtype {array.dtype}")
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
