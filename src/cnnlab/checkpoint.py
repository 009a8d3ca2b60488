"""Self-describing model bundles: safetensors weights + JSON metadata. Nothing is ever unpickled.

A run folder holds:
- `model.safetensors`: the weights, with the metadata JSON (layer spec, classes, input shape,
  preprocessing, training config, epoch, metrics, versions) in the safetensors header, so one
  file is the whole model and one atomic rename replaces it;
- `model.json`: the same metadata, readable;
- `resume.safetensors`: optimizer and EMA tensors plus JSON (epoch, step) for `train --resume`;
- `config.json` and `metrics.jsonl`.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the
target: a kill at any moment leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import CnnlabError
from .config import Config
from .layers import CNN, LayerSpec, build_model, parse_layers, trace

if TYPE_CHECKING:
    from .data.preprocess import Preprocessing
    from .evaluate import EvalSettings

FORMAT = "cnnlab-model/1"
MODEL_FILE = "model.safetensors"
RESUME_FILE = "resume.safetensors"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a model file is as shareable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def versions() -> dict[str, str]:
    # The installed distribution's version: importing torchvision only for its version string
    # costs about a second of every training run.
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        torchvision_version = version("torchvision")
    except PackageNotFoundError:
        torchvision_version = "not installed"
    return {"cnnlab": __version__, "torch": torch.__version__, "torchvision": torchvision_version,
            "python": platform.python_version()}


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # torch.compile wraps the model; DDP too. Save the underlying module's names.
    module = getattr(model, "_orig_mod", model)
    module = getattr(module, "module", module)
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_model(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """Write weights + metadata atomically to `path` (a .safetensors file) and a readable .json beside it."""
    from safetensors.torch import save

    meta = {"format": FORMAT, **metadata, "versions": versions()}
    text = json.dumps(meta, indent=2, sort_keys=False)
    atomic_write_bytes(path, save(_plain_state(model), metadata={"cnnlab": json.dumps(meta)}))
    atomic_write_text(Path(path).with_suffix(".json"), text + "\n")


def resolve_model_path(path: str | Path) -> Path:
    """A run folder or a .safetensors file -> the model file; clear errors otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.exists():
            raise CnnlabError(f"{path}: no {MODEL_FILE} in this folder (is it a cnnlab run folder?)")
        return candidate
    if not path.exists():
        raise CnnlabError(f"{path}: no such model file or run folder")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored in a model file's header, validated; never executes anything."""
    from safetensors import safe_open

    path = resolve_model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # SafetensorError and friends: not a safetensors file, truncated, bad header
        raise CnnlabError(f"{path}: not a valid safetensors model file ({_first_line(exc)})") from None
    if "cnnlab" not in header:
        raise CnnlabError(f"{path}: a safetensors file, but without cnnlab metadata (not saved by cnnlab)")
    try:
        meta = json.loads(header["cnnlab"])
    except json.JSONDecodeError as exc:
        raise CnnlabError(f"{path}: the cnnlab metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CnnlabError(f"{path}: unknown model format {meta.get('format') if isinstance(meta, dict) else None!r} (expected {FORMAT})")
    for key in ("layers", "input_shape", "classes", "preprocessing"):
        if key not in meta:
            raise CnnlabError(f"{path}: metadata is missing {key!r}")
    return meta


@dataclass
class ModelBundle:
    """A trained model and everything stored with it, typed: what every command works from.

    `load_model` builds it once; evaluate, report, show, export, predict and serve read these fields
    instead of the raw metadata dict (`meta`, kept for the few keys that have no field).
    """

    path: Path                          # the model .safetensors file
    model: CNN                          # in eval mode, on the device asked for
    layers: list[LayerSpec]             # the parsed layer spec
    preprocessing: "Preprocessing"
    classes: list[str]
    input_shape: tuple[int, int, int]   # (C, H, W)
    config: Config | None               # the resolved training config (None in files saved without one)
    metrics: dict[str, Any]             # the last epoch's metrics
    versions: dict[str, str]
    meta: dict[str, Any]                # the raw metadata

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.run_dir.name if self.path.name == MODEL_FILE else self.path.stem

    @property
    def dataset(self) -> str:
        """The dataset it was trained on (`mnist`, `folder:PATH`)."""
        return str(self.meta.get("dataset") or (self.config.data.dataset if self.config else "mnist"))

    @property
    def epoch(self) -> int | None:
        return self.meta.get("epoch")

    @property
    def evaluation(self) -> "EvalSettings":
        """How this model is evaluated (test-time augmentation included), from its training config."""
        from .evaluate import EvalSettings

        return EvalSettings.from_train(self.config.train) if self.config else EvalSettings()

    def infos(self):
        """The traced layers (`layers.trace`): shapes, formulas, parameters for this model's input."""
        return trace(self.layers, self.input_shape, len(self.classes))

    def load_test_data(self, dataset: str | None = None, root: str | None = None, progress: bool = False):
        """The dataset this model was trained on (or `dataset`), loaded as training loaded it; the
        classes must match the model's."""
        from .config import DataConfig
        from .data import load_dataset

        saved = self.config.data if self.config else DataConfig()
        name = dataset or self.dataset
        config = DataConfig(dataset=name, root=root or saved.root, image_size=self.input_shape[1],
                            channels=self.input_shape[0], val_fraction=saved.val_fraction)
        data = load_dataset(config, seed=self.config.train.seed if self.config else 0, progress=progress)
        if list(data.classes) != self.classes:
            raise CnnlabError(f"{name}: its classes {data.classes[:5]}... differ from the model's {self.classes[:5]}...")
        return data

    def test_logits(self, images: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """Logits for uint8 test images with this model's own evaluation settings (TTA included)."""
        from .evaluate import infer

        return infer(self.model, images, self.preprocessing, self.evaluation, device or _device_of(self.model))

    def evaluate(self, data=None, device: str | torch.device | None = None) -> dict[str, Any]:
        """Metrics on the test split of `data` (default: the model's own dataset)."""
        from .evaluate import compute_metrics

        data = data if data is not None else self.load_test_data()
        return compute_metrics(self.test_logits(data.test.images, device), data.test.labels, self.classes)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild the model from its layer spec, load the weights and check that both agree."""
    from safetensors.torch import load_file

    from .data.preprocess import Preprocessing

    path = resolve_model_path(path)
    meta = read_metadata(path)
    try:
        layers = parse_layers(meta["layers"])
        shape = tuple(int(v) for v in meta["input_shape"])
        if not isinstance(meta["classes"], list) or not meta["classes"]:
            raise CnnlabError(f"{path}: metadata 'classes' must be a non-empty list, got {meta['classes']!r:.80}")
        classes = [str(c) for c in meta["classes"]]
        # Before allocating anything: a tampered spec could ask for billions of weights.
        needed = sum(info.params for info in trace(layers, shape, len(classes)))  # type: ignore[arg-type]
        if needed > path.stat().st_size:
            raise CnnlabError(f"{path}: the stored layer spec needs {needed:,} weights but the file holds only "
                              f"{path.stat().st_size:,} bytes; metadata and weights disagree")
        model = build_model(layers, shape, len(classes))  # type: ignore[arg-type]
    except CnnlabError as exc:
        raise CnnlabError(f"{path}: the stored layer spec is invalid: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CnnlabError(f"{path}: the stored metadata is malformed ({exc})") from None
    try:
        prep = Preprocessing.from_dict(meta["preprocessing"])  # validates
        config = _stored_config(meta)
    except CnnlabError as exc:
        raise CnnlabError(f"{path}: {exc}") from None
    if prep.channels != shape[0] or tuple(prep.size) != shape[1:]:
        raise CnnlabError(f"{path}: the preprocessing makes {prep.channels}x{prep.size[0]}x{prep.size[1]} inputs "
                          f"but the model takes {'x'.join(map(str, shape))}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # truncated data section, bad offsets
        raise CnnlabError(f"{path}: cannot read the weights ({_first_line(exc)})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CnnlabError(f"{path}: weights do not match the layer spec (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CnnlabError(f"{path}: weight {key!r} has shape {tuple(tensor.shape)} but the layer spec needs "
                              f"{tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CnnlabError(f"{path}: weight {key!r} contains NaN or infinity")
    model.load_state_dict(state)
    model.eval()
    return ModelBundle(path=path, model=model.to(device), layers=layers, preprocessing=prep, classes=classes,
                       input_shape=shape, config=config, metrics=_mapping(meta.get("metrics")),  # type: ignore[arg-type]
                       versions=_mapping(meta.get("versions")), meta=meta)


def bundle_from_module(model: torch.nn.Module, metadata: dict[str, Any], path: str | Path = "model.safetensors") -> ModelBundle:
    """A `ModelBundle` for a model already in memory and the metadata `save_model` would store with it."""
    from .data.preprocess import Preprocessing

    meta = {"format": FORMAT, **metadata}
    classes = [str(c) for c in meta["classes"]]
    config = _stored_config(meta)
    return ModelBundle(path=Path(path), model=model.eval(), layers=parse_layers(meta["layers"]),
                       preprocessing=Preprocessing.from_dict(meta["preprocessing"]), classes=classes,
                       input_shape=tuple(int(v) for v in meta["input_shape"]), config=config,  # type: ignore[arg-type]
                       metrics=_mapping(meta.get("metrics")), versions=_mapping(meta.get("versions")), meta=meta)


def _stored_config(meta: dict[str, Any]) -> Config | None:
    from .config import config_from_dict

    raw = meta.get("config")
    if not isinstance(raw, dict):
        return None
    return config_from_dict({**raw, "model": raw.get("model") or meta["layers"]})


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def save_resume_state(path: str | Path, optimizer: torch.optim.Optimizer, ema_state: dict[str, torch.Tensor] | None,
                      info: dict[str, Any], model_state: dict[str, torch.Tensor],
                      rng_state: dict[str, torch.Tensor] | None = None) -> None:
    """Model weights + optimizer state (tensors flattened into names) + EMA weights + JSON info, in one atomic file.

    `rng_state` (random generator states, for a mid-epoch stop) comes back as `info["rng"]`."""
    from safetensors.torch import save

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    for name, value in (ema_state or {}).items():
        tensors[f"ema.{name}"] = value.detach().cpu().contiguous()
    for name, value in model_state.items():
        tensors[f"model.{name}"] = value
    for name, value in (rng_state or {}).items():
        tensors[f"rng.{name}"] = value.detach().cpu().contiguous()
    meta = {"param_groups": state["param_groups"], "scalars": scalars, **info}
    atomic_write_bytes(path, save(tensors, metadata={"cnnlab-resume": json.dumps(meta)}))


def load_resume_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(optimizer state_dict, EMA tensors, model tensors, info) from `save_resume_state`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["cnnlab-resume"])
        tensors = load_file(str(path))
    except Exception as exc:
        raise CnnlabError(f"{path}: cannot read the resume state ({_first_line(exc)})") from None
    optim_state: dict[int, dict[str, Any]] = {}
    ema: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    try:
        for key, value in tensors.items():
            kind, rest = key.split(".", 1)
            if kind == "optim":
                index, name = rest.split(".", 1)
                optim_state.setdefault(int(index), {})[name] = value
            elif kind == "ema":
                ema[rest] = value
            elif kind == "rng":
                meta.setdefault("rng", {})[rest] = value
            else:
                weights[rest] = value
        for index, values in meta.pop("scalars").items():
            optim_state.setdefault(int(index), {}).update(values)
        optimizer_state = {"state": optim_state, "param_groups": meta.pop("param_groups")}
        int(meta["epoch"]), int(meta["step"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # a tampered or foreign file
        raise CnnlabError(f"{path}: the resume state is malformed ({_first_line(exc)})") from None
    return optimizer_state, ema, weights, meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
