"""Configuration: typed dataclasses → optional YAML/TOML/JSON file → CLI flags → saved with the run.

Configuration flows one way. `resolve_config` starts from the dataclass defaults, applies a
preset (a named layer spec plus its recipe), then a config file, then command-line overrides,
and validates the result. Unknown keys and bad values are `CnnlabError`s that name the key.
The resolved config is written to the run folder as `config.json` and into every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import CnnlabError, shorten
from .layers import classifier_index, layer_kind, parse_layers

FOLDER = "folder:"  # how a dataset value names a folder (or archive) of images rather than a dataset by name


def folder_path(dataset: object) -> Path | None:
    """The folder (or archive) a `folder:PATH` dataset names, ~ expanded; None for anything else (a dataset by
    name, or `folder:` with no path, which `DataConfig` refuses)."""
    if isinstance(dataset, str) and dataset.startswith(FOLDER) and dataset[len(FOLDER):]:
        return Path(dataset[len(FOLDER):]).expanduser()
    return None


@dataclass
class DataConfig:
    dataset: str = "mnist"
    """A dataset by name (`data.catalog.DATASET_NAMES`: mnist, cifar10, ...), or `folder:PATH` for a folder (or a
    .zip/.tar.gz/.tgz archive) with one sub-folder of images per class."""
    root: str | None = None
    """Where datasets by name live, in torchvision's layout (ROOT/MNIST/raw, ROOT/cifar-10-batches-py, ...);
    default $CNNLAB_DATA, then the cache (~/.cache/cnnlab, where they are downloaded)."""
    image_size: int | None = None
    """Side length images are resized to (default: a named dataset's own, 32 for folders)."""
    channels: int | None = None
    """1 (grey) or 3 (RGB); default: what the data holds."""
    test_fraction: float = 0.1
    """Folder datasets without a test/ folder: the seeded fraction of each class held out for testing."""
    val_fraction: float | None = None
    """The seeded, stratified fraction of the training images held out for validation (listed in RUN/split.json):
    each epoch is scored on it, the run keeps its best epoch by it and train.patience stops on it, while the
    test split is used once, at the end. A val/ folder beside train/ is used instead when present. Default
    (None): 0.1 for folders, 0 (no validation split) for datasets by name, whose recipes are fixed."""
    limit_per_class: int | None = None
    """Use at most this many images of each class in every split (the first N of a seeded shuffle): try a
    recipe small first."""
    balance: str = "none"
    """Classes out of balance: none, sampler (draw each class equally often) or weights (weigh the loss of
    each class by 1 / its share of the training images)."""
    normalize: bool = True
    """Standardise inputs with the training data's per-channel mean/std (off: pixels in 0..1, as ToTensor gives)."""
    max_decoded_mb: float = 64
    """Folder datasets: the most memory one image may take once decoded (width x height x bytes per pixel, read
    from its header before decoding); a larger image is an error naming it, or skipped with data.skip_bad."""
    skip_bad: bool = False
    """Folder datasets: skip images over data.max_decoded_mb (with one summary warning) instead of stopping."""

    def __post_init__(self):
        from .data.catalog import DATASET_NAMES  # here: the data package imports this module

        if not (self.dataset in DATASET_NAMES or self.dataset.startswith(FOLDER)):
            guess = difflib.get_close_matches(self.dataset.lower(), DATASET_NAMES, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise CnnlabError(f"data.dataset: expected {', '.join(DATASET_NAMES)} or folder:PATH, got {shorten(self.dataset)}{hint}")
        if self.dataset.startswith(FOLDER) and folder_path(self.dataset) is None:
            raise CnnlabError("data.dataset: 'folder:' needs a path, e.g. folder:/data/pets")
        _check(self.image_size is None or 4 <= self.image_size <= 1024, "data.image_size", self.image_size, "between 4 and 1024")
        _check(self.channels in (None, 1, 3), "data.channels", self.channels, "1 or 3")
        _check(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "between 0 and 1")
        _check(self.val_fraction is None or 0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction,
               "at least 0 and below 1")
        _check(self.limit_per_class is None or (isinstance(self.limit_per_class, int) and self.limit_per_class >= 1),
               "data.limit_per_class", self.limit_per_class, "a whole number of at least 1")
        _check(self.balance in BALANCES, "data.balance", self.balance, ", ".join(BALANCES))
        _check(isinstance(self.max_decoded_mb, (int, float)) and not isinstance(self.max_decoded_mb, bool)
               and 0 < self.max_decoded_mb < 1e6, "data.max_decoded_mb", self.max_decoded_mb, "a number of MB above 0")
        _check(isinstance(self.skip_bad, bool), "data.skip_bad", self.skip_bad, "true or false")


OPTIMIZERS = ("adam", "adamw", "sgd")
BALANCES = ("none", "sampler", "weights")
SCHEDULES = ("constant", "onecycle", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: float = 10
    """Passes over the training data (a fraction like 0.5 trains on part of one epoch)."""
    batch_size: int = 100
    """Images per optimizer step. With torchrun it is the global batch: each of N processes takes 1/N of it, so
    the run learns the same whatever N is."""
    lr: float = 0.01
    """Peak learning rate."""
    optimizer: str = "adam"
    """adam, adamw or sgd (with Nesterov momentum)."""
    momentum: float = 0.9
    """sgd: momentum (Nesterov)."""
    weight_decay: float = 0.0
    """L2 penalty on the weights (see weight_decay_all for biases and BatchNorm)."""
    schedule: str = "onecycle"
    """Learning-rate schedule: constant, onecycle (warm up then anneal), linear (decay to 0), cosine. The default
    anneals because a model evaluated at a still-high constant rate scores points lower (a residual MNIST net
    after 1 epoch: 96.8% constant, 99.1% onecycle; benchmarks/NOTES.md); the tutorial preset keeps constant."""
    warmup: float = 0.1
    """Fraction of training spent warming up (onecycle/linear/cosine)."""
    lr_start: float = 0.0
    """onecycle: the learning rate the warm-up starts from, as a fraction of the peak."""
    lr_end: float = 0.02
    """onecycle: the learning rate at the last step, as a fraction of the peak."""
    norm_lr_scale: float = 1.0
    """Learning-rate multiplier for BatchNorm parameters (airbench: 64). Their weight decay is divided by it,
    so its strength per step stays that of the other weights."""
    weight_decay_all: bool = False
    """Decay biases and BatchNorm parameters too (by default only weights with 2+ dimensions decay)."""
    lookahead: bool = False
    """Lookahead averaging (airbench): from 30% of training, every 5 steps the weights move to a slow average
    whose decay rises as 0.95^5·(step/steps)^3; each epoch ends, and is evaluated and saved, on that average."""
    whiten_bias_epochs: float = 0.0
    """A whitening first layer's bias trains for this many epochs, then stays (0 = trains throughout)."""
    label_smoothing: float = 0.0
    """Cross-entropy against targets with this much probability spread over all classes."""
    shift: int = 0
    """Augmentation: random translation by up to this many pixels, per image."""
    shift_padding: str = "zeros"
    """What a shift moves into view: zeros (black borders) or reflect (the image mirrored at its edge)."""
    rotate: float = 0.0
    """Augmentation: random rotation by up to this many degrees, per image (digits: about 10)."""
    scale: float = 0.0
    """Augmentation: random zoom in or out by up to this fraction, per image (0.1: 90% to 110% of the size)."""
    flip: bool = False
    """Augmentation: random horizontal flips (natural images, not digits)."""
    flip_alternate: bool = False
    """With flip: draw each image's flip once, then mirror every image on alternate epochs (airbench), so each
    image is seen both ways in turn instead of by chance."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights used for evaluation (0 = off)."""
    tta: bool = False
    """Test-time augmentation: also evaluate the flipped image and average (with flip)."""
    tta_shift: int = 0
    """Test-time augmentation: also evaluate copies shifted by this many pixels (0 = off)."""
    eval_every: int = 1
    """Evaluate every N epochs (the last epoch always): on the validation split when there is one, else on the
    test split."""
    patience: int = 0
    """With a validation split: stop when its accuracy has not improved for this many epochs (0 = never stop early)."""
    eval_batch_size: int = 1000
    """Images per batch when evaluating."""
    seed: int = 0
    """Seeds the initial weights, the order of the batches and the augmentation: the same seed, the same run."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    threads: int = 0
    """CPU threads for PyTorch (0 = one per physical core)."""
    channels_last: bool = False
    """Train in the channels-last memory layout (faster for some conv kernels)."""
    precision: str = "auto"
    """Arithmetic for training: fp32, bf16 (autocast), or auto (bf16 on CUDA, fp32 on a CPU). A CPU without
    native bf16 instructions trains in fp32 with a warning: emulated bf16 is slower than fp32."""
    compile: bool = False
    """torch.compile the model (falls back to eager with a warning if compiling fails)."""
    tensorboard: bool = True
    """Write TensorBoard event files to the run folder's tb/ (per-step loss and lr, per-epoch metrics, HParams,
    confusion matrix and mistakes); skipped with one warning where tensorboard is not installed."""
    init: str | None = None
    """Start from a trained cnnlab model's weights (a run folder or model .safetensors file). Without a preset or
    model of its own, the run takes that model's layers, input size and recipe; a different set of classes gets a
    new last linear layer. The model's normalisation comes with it."""
    freeze: str | None = None
    """Keep layers fixed while training: N (the first N layers of the spec, as `cnnlab summary` numbers them) or
    features (everything before the head). Frozen BatchNorm layers keep their statistics."""
    init_lr_scale: float = 1.0
    """Learning-rate multiplier for the layers whose weights were loaded (train.init, pretrained backbones), e.g.
    0.1 to move them ten times slower than the new head."""
    probe_epochs: int = 0
    """Before the epochs, fit the new head alone on the frozen loaded layers (a pretrained backbone): each training
    image runs through them once per view (itself, and its mirror image with train.flip), the features are kept in
    memory and the head trains on them for this many passes, in seconds. Scored on the validation split as epoch 0,
    so a run whose later epochs do not beat it keeps it (0 = off)."""
    cache_features: bool = True
    """With everything before the head frozen (train.freeze: features, or the probe of train.probe_epochs): run the
    frozen layers once per image and view and train the head on their kept outputs (off: run them every epoch)."""
    keep_norm_stats: bool = False
    """BatchNorm layers of loaded weights keep their running statistics (they normalise as at test time) while their
    scale and shift train: fine-tuning on a few hundred images moves them badly otherwise."""

    def __post_init__(self):
        _check(0 < self.epochs <= 10_000, "train.epochs", self.epochs, "a positive number")
        _check(1 <= self.batch_size <= 1_000_000, "train.batch_size", self.batch_size, "a positive whole number")
        _check(0 < self.lr < 1e3, "train.lr", self.lr, "a positive number below 1000")
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, " or ".join(OPTIMIZERS))
        _check(self.schedule in SCHEDULES, "train.schedule", self.schedule, ", ".join(SCHEDULES))
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.warmup < 1, "train.warmup", self.warmup, "in [0, 1)")
        _check(0 <= self.lr_start <= 1, "train.lr_start", self.lr_start, "in [0, 1]")
        _check(0 <= self.lr_end <= 1, "train.lr_end", self.lr_end, "in [0, 1]")
        _check(0 < self.norm_lr_scale <= 1e4, "train.norm_lr_scale", self.norm_lr_scale, "a positive number up to 10000")
        _check(self.whiten_bias_epochs >= 0, "train.whiten_bias_epochs", self.whiten_bias_epochs, ">= 0")
        if self.lookahead and self.ema > 0:
            raise CnnlabError("train.lookahead and train.ema both average the weights: choose one")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "in [0, 1)")
        if self.flip_alternate and not self.flip:
            raise CnnlabError("train.flip_alternate changes how train.flip flips: set train.flip: true too")
        _check(0 <= self.shift <= 64, "train.shift", self.shift, "between 0 and 64")
        _check(0 <= self.rotate <= 180, "train.rotate", self.rotate, "between 0 and 180 degrees")
        _check(0 <= self.scale < 1, "train.scale", self.scale, "in [0, 1)")
        _check(self.shift_padding in ("zeros", "reflect"), "train.shift_padding", self.shift_padding, "zeros or reflect")
        _check(0 <= self.tta_shift <= 8, "train.tta_shift", self.tta_shift, "between 0 and 8")
        _check(0 <= self.ema < 1, "train.ema", self.ema, "in [0, 1)")
        _check(self.eval_every >= 1, "train.eval_every", self.eval_every, ">= 1")
        _check(isinstance(self.patience, int) and self.patience >= 0, "train.patience", self.patience, "a whole number >= 0")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "train.device",
               self.device, "auto, cpu or cuda")
        _check(self.threads >= 0, "train.threads", self.threads, ">= 0")
        _check(self.precision in PRECISIONS, "train.precision", self.precision, ", ".join(PRECISIONS))
        _check(self.freeze is None or self.freeze == "features" or self.freeze.isdecimal(), "train.freeze", self.freeze,
               "a number of layers or 'features'")
        _check(0 < self.init_lr_scale <= 1e4, "train.init_lr_scale", self.init_lr_scale, "a positive number up to 10000")
        _check(isinstance(self.probe_epochs, int) and not isinstance(self.probe_epochs, bool) and 0 <= self.probe_epochs <= 1000,
               "train.probe_epochs", self.probe_epochs, "a whole number from 0 to 1000")
        _check(isinstance(self.cache_features, bool), "train.cache_features", self.cache_features, "true or false")
        _check(isinstance(self.keep_norm_stats, bool), "train.keep_norm_stats", self.keep_norm_stats, "true or false")


@dataclass
class Config:
    preset: str | None = None
    """The preset this configuration started from."""
    model: list = field(default_factory=list)
    """The layer spec (see cnnlab.layers)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fitted: list[str] = field(default_factory=list)
    """Training settings left to be fitted to the data once it is loaded (`recipes.fit_recipe`): the ones the
    default recipe for a folder chose and the user did not set."""

    def __post_init__(self):
        if not self.model:
            raise CnnlabError("model: no layers given; use --preset or a config file with a 'model' list")
        parse_layers(self.model)  # validates every layer on its own; shapes are checked once data is known

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise CnnlabError(f"{key}: expected {expected}, got {shorten(value)}")


# ---------------------------------------------------------------------------------------------

def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into a dict (by extension; YAML is the default)."""
    from .files import read_bytes_bounded

    path = Path(path)
    if not path.exists():
        raise CnnlabError(f"{path}: config file not found")
    text = read_bytes_bounded(path, MAX_CONFIG_BYTES, "config file").decode("utf-8", errors="replace")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = load_yaml(text, str(path))
    except CnnlabError:
        raise
    except RecursionError:
        raise CnnlabError(f"{path}: cannot parse config: it is nested deeper than cnnlab follows (hundreds of levels); "
                          "a real config has a handful") from None
    except Exception as exc:  # parse errors of three libraries: report them alike, where they are
        raise CnnlabError(f"{path}: cannot parse config: {_parse_error(exc)}") from None
    return config_mapping(data, str(path))


def _parse_error(exc: Exception) -> str:
    """A parser's error in one line, with the line and column where the library knows them."""
    mark = getattr(exc, "problem_mark", None)  # PyYAML
    if mark is not None:
        problem = getattr(exc, "problem", None) or "invalid YAML"
        context = getattr(exc, "context", None)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
    text = str(exc).strip()  # tomllib says "(at line L, column C)" itself
    return text.splitlines()[0] if text else type(exc).__name__


MAX_CONFIG_BYTES = 4 << 20
MAX_YAML_NODES = 100_000  # values in a YAML file once its aliases are expanded; a real config has hundreds


def load_yaml(text: str, where: str = "config") -> Any:
    """YAML text -> Python values (safe types only), refusing aliases that expand past `MAX_YAML_NODES`
    values (a "billion laughs" file of 390 bytes expands to 10^9) before anything is built from it."""
    loader = _strict_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_yaml_nodes(node, where)
        return loader.construct_document(node)
    except CnnlabError as exc:
        if str(exc).startswith("line "):  # a duplicate key: name the file too
            raise CnnlabError(f"{where}: {exc}") from None
        raise
    finally:
        loader.dispose()


def _strict_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently,
    so a second `lr:` would quietly win over the first)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if first is not key_node.start_mark:
                    raise CnnlabError(f"line {key_node.start_mark.line + 1}, column {key_node.start_mark.column + 1}: "
                                      f"key {shorten(key)} is given twice (first on line {first.line + 1})")
            return super().construct_mapping(node, deep)

    return StrictLoader


def _count_yaml_nodes(root, where: str) -> int:
    """Values under `root` with every alias expanded, counted without expanding them (each node once)."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise CnnlabError(f"{where}: a YAML alias refers to a value that contains it (a recursive structure)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_YAML_NODES:
            raise CnnlabError(f"{where}: YAML aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?); "
                              "refused")
        sizes[key] = total
        return total

    return size(root)


def config_mapping(data: Any, where: str = "config") -> dict[str, Any]:
    """A config file's content (a mapping of sections, or a bare list of layers) as a mapping."""
    if data is None:
        data = {}
    if isinstance(data, (list, tuple)):  # a bare list of layers is a model spec
        data = {"model": list(data)}
    if not isinstance(data, dict):
        raise CnnlabError(f"{where}: expected a mapping of settings at the top level")
    return dict(data)


def _merge_section(cls, base: dict[str, Any], updates: dict[str, Any], section: str) -> dict[str, Any]:
    if not isinstance(updates, dict):
        raise CnnlabError(f"{section}: expected a mapping of settings, got {shorten(updates)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    merged = dict(base)
    for key, value in updates.items():
        if key not in names:
            guess = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known: {', '.join(names)})"
            name = f"{section}.{key}" if str(key).isidentifier() else f"{section}.{shorten(str(key))}"  # stay one line
            raise CnnlabError(f"{name}: unknown setting{hint}")
        merged[key] = _coerce(f"{section}.{key}", value, hints[key])
    return merged


def _coerce(key: str, value, hint) -> Any:
    """Check a value against the dataclass field's type, converting the harmless cases (2 -> 2.0)."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise CnnlabError(f"{key}: a value is required")
    if "bool" in text and "int" not in text:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise CnnlabError(f"{key}: expected true or false, got {shorten(value)}")
    if "float" in text:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise CnnlabError(f"{key}: expected a number, got {shorten(value)}")
        return number
    if "int" in text:
        if isinstance(value, bool):
            raise CnnlabError(f"{key}: expected a whole number, got {shorten(value)}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdecimal():
            value = int(value)
        if not isinstance(value, int):
            raise CnnlabError(f"{key}: expected a whole number, got {shorten(value)}")
        return value
    if "str" in text:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise CnnlabError(f"{key}: expected text, got {shorten(value)}")
        return str(value)
    return value


def resolve_config(preset: str | None = None, config_file: str | Path | dict | list | None = None,
                   overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults → preset → file → overrides, validated. `overrides` is {"train": {...}, "data": {...},
    "model": {"3.out_channels": 64}} (layer settings by number, as `parse_overrides` gives them);
    `config_file` may also be a file's content given from Python (a mapping, or a list of layers)."""
    from .presets import get_preset

    if isinstance(config_file, (dict, list, tuple)):
        file_data, where, config_file = config_mapping(config_file), "config", None
    else:
        file_data = read_config_file(config_file) if config_file else {}
        where = str(config_file) if config_file else "config"
    file_data = {k: v for k, v in file_data.items() if k != "fitted"}  # a saved config.json's note, not a setting
    unknown = [k for k in file_data if k not in ("preset", "model", "data", "train")]
    if unknown:
        guess = difflib.get_close_matches(str(unknown[0]), ["preset", "model", "data", "train"], n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else " (known: preset, model, data, train)"
        raise CnnlabError(f"{where}: unknown key {shorten(unknown[0])}{hint}")
    for section in ("data", "train"):  # checked here: the lines below look inside them
        if not isinstance(file_data.get(section) or {}, dict):
            raise CnnlabError(f"{where}: {section}: expected a mapping of settings, got {shorten(file_data[section])}")
    if not isinstance(file_data.get("preset"), (str, type(None))):
        raise CnnlabError(f"{where}: preset: expected a preset name, got {shorten(file_data['preset'])}")
    overrides = overrides or {}
    dataset = overrides.get("data", {}).get("dataset") or (file_data.get("data") or {}).get("dataset") or "mnist"
    from .data.catalog import NAMED_DATASETS

    # grey datasets get the MNIST network; folders are usually colour photos
    grey = str(dataset) in NAMED_DATASETS and NAMED_DATASETS[str(dataset)].shape[0] == 1
    fallback = "default" if grey else "rgb32"
    name = preset or file_data.get("preset") or (fallback if "model" not in file_data else None)
    base = get_preset(name) if name else {"model": [], "data": {}, "train": {}}
    init = overrides.get("train", {}).get("init") or (file_data.get("train") or {}).get("init")
    if init and not (preset or file_data.get("preset") or "model" in file_data):
        name, base = init_defaults(str(init))  # the model's own layers, input size and recipe

    data = _merge_section(DataConfig, dataclasses.asdict(DataConfig()), base.get("data", {}), "data")
    train = _merge_section(TrainConfig, dataclasses.asdict(TrainConfig()), base.get("train", {}), "train")
    model = base.get("model", [])
    data = _merge_section(DataConfig, data, file_data.get("data") or {}, "data")
    train = _merge_section(TrainConfig, train, file_data.get("train") or {}, "train")
    if "model" in file_data:
        model = file_data["model"]
        if isinstance(model, dict):
            if set(model) - {"layers"}:
                raise CnnlabError(f"{where}: model: expected a list of layers (or a mapping with 'layers')")
            model = model.get("layers")
        if not isinstance(model, (list, tuple, type(None))):
            raise CnnlabError(f"{where}: model: expected a list of layers, got {shorten(model)}")
    if overrides.get("model"):
        model = _apply_layer_settings(model, overrides["model"])
    data = _merge_section(DataConfig, data, {k: v for k, v in overrides.get("data", {}).items() if v is not None}, "data")
    train = _merge_section(TrainConfig, train, {k: v for k, v in overrides.get("train", {}).items() if v is not None}, "train")
    if (folder := folder_path(data["dataset"])) is not None:
        # saved as an absolute path: `evaluate`, `explain --check` and `--resume` find the folder from any directory
        data["dataset"] = FOLDER + os.path.abspath(folder)
    if data["image_size"] is None:  # a pretrained backbone's own resolution (None for cnnlab's own layers)
        from .layers.backbones import preferred_image_size

        data["image_size"] = preferred_image_size(model)
    if base.get("colour_folders") and data["dataset"] == "mnist" and "model" not in file_data:
        raise CnnlabError(f"preset {name} is for folders of colour images (e.g. CIFAR-10 as JPEGs): "
                          "add --dataset folder:PATH")
    fitted = []
    if not (preset or file_data.get("preset") or "model" in file_data or init) and folder_path(dataset) is not None:
        # A folder with nothing chosen: the recipe's batch, length and rate are fitted to what is in it
        # once it is loaded (recipes.fit_recipe), unless the user set them.
        given = {**(file_data.get("train") or {}), **{k: v for k, v in overrides.get("train", {}).items() if v is not None}}
        fitted = [key for key in ("batch_size", "epochs", "lr") if key not in given]
    try:
        return Config(preset=name, model=list(model or []), data=DataConfig(**data), train=TrainConfig(**train),
                      fitted=fitted)
    except CnnlabError as exc:
        if config_file and str(exc).startswith(("layer", "model")):
            raise CnnlabError(f"{config_file}: {exc}") from None
        raise


# Settings of a loaded model's run that belong to that run or machine, not to its recipe.
_NOT_RECIPE = ("init", "freeze", "init_lr_scale", "device", "threads", "seed")


def init_defaults(path: str) -> tuple[str | None, dict[str, Any]]:
    """(preset name, preset-like base) for a run that starts from model `path` with no preset or model of its own:
    that model's layers (the last linear layer sized by the new classes), input size and training recipe."""
    from .checkpoint import read_metadata, resolve_model_path  # the format only: config sits below the run folder

    meta = read_metadata(path)
    stored_model(resolve_model_path(path), meta)  # a hostile spec is refused here, before anything is built
    layers = [dict(layer) if isinstance(layer, dict) else layer for layer in meta["layers"]]
    last = classifier_index(layers)  # sized by the new classes
    if last is not None and isinstance(layers[last], dict):
        layers[last].pop(layer_kind(layers[last]).classes_key, None)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    train = {k: v for k, v in (config.get("train") or {}).items() if k not in _NOT_RECIPE}
    data = {"image_size": int(meta["input_shape"][1])}
    if not (config.get("data") or {}).get("normalize", True):
        data["normalize"] = False
    return config.get("preset"), {"model": layers, "data": data, "train": train}


def stored_model(path: Path, meta: dict[str, Any]) -> tuple[list, tuple[int, int, int], list[str]]:
    """(layers, input shape, classes) stored in model file `path`, checked before any tensor is made:
    a well-formed spec, a (C, H, W) input, classes, and no more weights than the file has bytes (a
    tampered spec could ask for billions). `open_run` and `train --init` both read a model through this."""
    from .layers import trace

    try:
        layers = parse_layers(meta["layers"])
        shape = tuple(int(v) for v in meta["input_shape"])
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape {shorten(meta['input_shape'])} is not (C, H, W) with positive sizes")
        if not isinstance(meta["classes"], list) or not meta["classes"]:
            raise CnnlabError(f"metadata 'classes' must be a non-empty list, got {shorten(meta['classes'])}")
        classes = [str(c) for c in meta["classes"]]
        needed = sum(info.params for info in trace(layers, shape, len(classes)))  # type: ignore[arg-type]
        if needed > path.stat().st_size:
            raise CnnlabError(f"the stored layer spec needs {needed:,} weights but the file holds only "
                              f"{path.stat().st_size:,} bytes; metadata and weights disagree")
    except CnnlabError as exc:
        raise CnnlabError(f"{path}: the stored layer spec is invalid: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise CnnlabError(f"{path}: the stored metadata is malformed ({first_line_of(exc)})") from None
    return layers, shape, classes  # type: ignore[return-value]


def first_line_of(exc: BaseException) -> str:
    text = str(exc).strip()
    return shorten(text.splitlines()[0], 160).strip("'\"") if text else type(exc).__name__


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a run folder's config.json."""
    if not isinstance(raw, dict):
        raise CnnlabError(f"saved config: expected a mapping of settings, got {shorten(raw)}")
    data = _merge_section(DataConfig, dataclasses.asdict(DataConfig()), raw.get("data", {}), "data")
    train = _merge_section(TrainConfig, dataclasses.asdict(TrainConfig()), raw.get("train", {}), "train")
    return Config(preset=raw.get("preset"), model=raw.get("model", []), data=DataConfig(**data), train=TrainConfig(**train))


def field_help(cls, name: str) -> str:
    """The docstring under a dataclass field (litgpt-style), used by `cnnlab train --help`."""
    return _field_docs(cls).get(name, "")


@functools.cache
def _field_docs(cls) -> dict[str, str]:
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    return {node.target.id: " ".join(str(after.value.value).split())
            for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant)}


def settings_help() -> str:
    """Every `--set` setting with its default and docstring, for `cnnlab train --help`."""
    import textwrap

    lines = ["settings for --set SECTION.KEY=VALUE (also the keys of a config file's data: and train: sections):"]
    for section, cls in (("data", DataConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            text = f"{section}.{f.name} (default {f.default!r}): {field_help(cls, f.name)}".rstrip(": ")
            lines += textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Settings by dotted name: `train.lr`, `data.dataset`, `model.4.out_channels`
# ---------------------------------------------------------------------------------------------
# Layers are numbered from 1, as `cnnlab summary` and every layer error message number them; a
# layer's list of sub-layers (`layers`) is numbered the same way: `model.3.layers.1.out_channels`, or
# as `cnnlab summary` shows it, `model.3.1.out_channels`.

def flat_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A config mapping (config.json, `Config.to_dict()`) as {dotted name: value}; layers with their
    defaults left out, so that two ways of writing the same layer compare equal."""
    from .layers import spec_to_list

    flat: dict[str, Any] = {"preset": config.get("preset")}
    for section in ("data", "train"):
        for key, value in (config.get(section) or {}).items():
            flat[f"{section}.{key}"] = value
    model = config.get("model") or []
    try:
        model = spec_to_list(parse_layers(model))
    except CnnlabError:  # shown as written
        pass
    _flatten_layers(model, "model", flat)
    return flat


def _flatten_layers(layers: list, prefix: str, flat: dict[str, Any]) -> None:
    for number, layer in enumerate(layers, start=1):
        if not isinstance(layer, dict):
            layer = {"type": layer}
        for key, value in layer.items():
            if key == "layers" and isinstance(value, list):
                _flatten_layers(value, f"{prefix}.{number}.layers", flat)
            else:
                flat[f"{prefix}.{number}.{key}"] = value


def set_setting(config: dict[str, Any], name: str, value: Any) -> None:
    """Set the dotted setting `name` in a config mapping, in place (a layer given by name becomes a
    mapping). Only the path is checked here; the value is checked when the config is built."""
    parts = name.split(".")
    if parts[0] in ("data", "train") and len(parts) == 2:
        config.setdefault(parts[0], {})[parts[1]] = value
        return
    if parts[0] != "model" or len(parts) < 3:
        raise CnnlabError(f"{name}: expected train.KEY, data.KEY or model.LAYER.KEY (LAYER numbered from 1)")
    layers = config.get("model")
    if isinstance(layers, dict):  # `model: {layers: [...]}` in a config file
        layers = layers.get("layers")
    path = parts[1:]
    while True:
        number, key = path[0], path[1] if len(path) > 1 else None
        if not isinstance(layers, list) or not number.isdecimal() or not 1 <= int(number) <= len(layers):
            count = len(layers) if isinstance(layers, list) else 0
            raise CnnlabError(f"{name}: no layer {shorten(number)} (the model has {count} layers, numbered from 1)")
        if key is None:
            raise CnnlabError(f"{name}: expected a layer setting after the layer number, e.g. {name}.out_channels")
        index = int(number) - 1
        if not isinstance(layers[index], dict):
            layers[index] = {"type": layers[index]}
        layer = layers[index]
        if key == "layers" and len(path) > 2:
            layers, path = layer.get("layers"), path[2:]
            continue
        if key.isdecimal() and len(path) > 2:  # `model.4.2.key`: sub-layer 2 of block 4, as `cnnlab summary` numbers it
            if not isinstance(layer.get("layers"), list):
                raise CnnlabError(f"{name}: layer {number} ({layer.get('type')}) has no layers inside it")
            layers, path = layer["layers"], path[1:]
            continue
        if len(path) > 2:
            raise CnnlabError(f"{name}: layer {number} has no nested setting {shorten('.'.join(path[1:]))}")
        layer[key] = value
        return


SETTING_SECTIONS = ("train", "data", "model")


def split_settings(settings: dict[str, Any], source: str = "settings") -> dict[str, dict[str, Any]]:
    """Settings by dotted name ({"train.lr": 0.1, "model.3.out_channels": 64}) as `resolve_config`'s
    overrides: {"train": {...}, "data": {...}, "model": {"3.out_channels": 64}}. Only the form of a
    name is checked here; unknown keys and bad values are named when the config is resolved."""
    sections: dict[str, dict[str, Any]] = {section: {} for section in SETTING_SECTIONS}
    for key, value in settings.items():
        section, dot, name = str(key).partition(".")
        if not dot or section not in sections or not name:
            raise CnnlabError(f"{source} {shorten(key)}: expected SECTION.NAME with SECTION train, data or model, "
                              "e.g. 'train.shift' or 'model.3.out_channels'")
        sections[section][name] = value
    return sections


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`--set SECTION.KEY=VALUE` items (values read as YAML: `2`, `true`, `[3, 3]`) as `resolve_config`'s
    overrides; the one parser of `--set` for every command that takes it."""
    import yaml

    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise CnnlabError(f"--set {shorten(item)}: expected SECTION.KEY=VALUE with SECTION train, data or model")
        try:
            settings[key] = yaml.safe_load(value) if value else value
        except yaml.YAMLError:  # not YAML (control characters, an open bracket): the text itself, checked later
            settings[key] = value
    return split_settings(settings, "--set")


def _apply_layer_settings(model: list[Any], settings: dict[str, Any]) -> list[Any]:
    """A copy of the layer list `model` with {"N.key": value} settings (layers numbered from 1) applied."""
    holder = {"model": copy.deepcopy(list(model or []))}  # presets and the caller's lists stay as they are
    for name, value in settings.items():
        set_setting(holder, f"model.{name}", value)
    try:
        parse_layers(holder["model"])
    except CnnlabError as exc:  # "layer 3 (maxpool): unknown key ...": say which setting made it so
        words = str(exc).split(" ", 2)
        changed = [name for name in settings if words[0] == "layer" and name.split(".")[0] == words[1].split(".")[0]]
        if changed:
            raise CnnlabError(f"model.{changed[0]}: {exc}") from None
        raise
    return holder["model"]
