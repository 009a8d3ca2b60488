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
from pathlib import Path
from typing import Any

import torch

from .errors import CnnlabError
from .layers import CNN, build_model, parse_layers, trace

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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CNN, dict[str, Any]]:
    """Rebuild the model from its layer spec and load the weights; checks that both agree."""
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
    return model.to(device), meta


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
