"""The checkpoint format: safetensors weights + JSON metadata. Nothing is ever unpickled.

- A model file holds the weights and, in the safetensors header, the metadata JSON (layer spec,
  classes, input shape, preprocessing, training config, epoch, metrics, versions), so one file is
  the whole model and one atomic rename replaces it; a readable `.json` copy sits beside it.
- A resume file holds the model, optimizer, EMA and random-generator tensors plus JSON (epoch,
  step) for `train --resume`.
- Both carry a SHA-256 of their tensors in the header (`cnnlab-sha256`): safetensors checks the
  offsets, not the bytes, so bit rot would otherwise load as a model that quietly answers wrong.

This module reads and writes those two formats and checks what it reads; it knows nothing of
layers or runs. `runs.Run` builds the model from what is read here.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from .errors import CnnlabError, first_line, shorten
from .files import atomic_write_bytes, atomic_write_text

FORMAT = "cnnlab-model/1"
MODEL_FILE = "model.safetensors"  # the model file of a run folder: `--init RUN` and `runs.Run` look for it


def versions() -> dict[str, str]:
    # The installed distributions' versions: importing torchvision only for its version string
    # costs about a second of every training run (and this module sits below the package's __init__).
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"cnnlab": installed("cnnlab"), "torch": torch.__version__, "torchvision": installed("torchvision"),
            "python": platform.python_version()}


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # torch.compile wraps the model; DDP too. Save the underlying module's names.
    module = getattr(model, "_orig_mod", model)
    module = getattr(module, "module", module)
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_model(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """Write weights + metadata atomically to `path` (a .safetensors file) and a readable .json beside it."""
    from safetensors.torch import save

    meta = {"format": FORMAT, **metadata, "versions": versions()}
    text = json.dumps(meta, indent=2, sort_keys=False)
    state = plain_state(model)
    atomic_write_bytes(path, save(state, metadata={"cnnlab": json.dumps(meta), CHECKSUM_KEY: tensor_checksum(state)}))
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


def read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a model file, checked against the model they are for (`expected`: its state
    dict): every name present, no extra one, the same shapes and dtypes, no NaN or infinity."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get(CHECKSUM_KEY)
    except Exception as exc:  # truncated data section, bad offsets
        raise CnnlabError(f"{path}: cannot read the weights ({first_line(exc)})") from None
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CnnlabError(f"{path}: weights do not match the layer spec (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CnnlabError(f"{path}: weight {shorten(key)} has shape {tuple(tensor.shape)} but the layer spec needs "
                              f"{tuple(expected[key].shape)}")
        if tensor.dtype != expected[key].dtype:
            raise CnnlabError(f"{path}: weight {shorten(key)} is {str(tensor.dtype).replace('torch.', '')} but the model "
                              f"needs {str(expected[key].dtype).replace('torch.', '')}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CnnlabError(f"{path}: weight {shorten(key)} contains NaN or infinity")
    # Model files saved before checksums were kept, and weights from elsewhere, have none: checked as above only.
    if saved is not None and saved != tensor_checksum(state):
        raise CnnlabError(f"{path}: damaged file: its weights do not match the checksum saved with them (flipped bits "
                          "on the disk?)")
    return state


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored in a model file's header, validated; never executes anything."""
    from safetensors import safe_open

    path = resolve_model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # SafetensorError and friends: not a safetensors file, truncated, bad header
        raise CnnlabError(f"{path}: not a valid safetensors model file ({first_line(exc)})") from None
    if "cnnlab" not in header:
        raise CnnlabError(f"{path}: a safetensors file, but without cnnlab metadata (not saved by cnnlab)")
    try:
        meta = json.loads(header["cnnlab"])
    except json.JSONDecodeError as exc:
        raise CnnlabError(f"{path}: the cnnlab metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CnnlabError(f"{path}: unknown model format {shorten(meta.get('format') if isinstance(meta, dict) else None)} (expected {FORMAT})")
    for key in ("layers", "input_shape", "classes", "preprocessing"):
        if key not in meta:
            raise CnnlabError(f"{path}: metadata is missing {shorten(key)}")
    return meta


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
    atomic_write_bytes(path, save(tensors, metadata={"cnnlab-resume": json.dumps(meta), CHECKSUM_KEY: tensor_checksum(tensors)}))


CHECKSUM_KEY = "cnnlab-sha256"  # of a resume file's tensors: safetensors checks offsets, not the bytes themselves


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order: flipped bits in a file's
    data section change it (a torn or bit-rotted resume file would otherwise train on as garbage)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


def load_resume_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(optimizer state_dict, EMA tensors, model tensors, info) from `save_resume_state`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            meta = json.loads(header["cnnlab-resume"])
        tensors = load_file(str(path))
    except Exception as exc:
        raise CnnlabError(f"{path}: cannot read the resume state ({first_line(exc) or type(exc).__name__}): a damaged "
                          "or foreign file") from None
    saved = header.get(CHECKSUM_KEY)  # files written before checksums were kept have none
    if saved is not None and saved != tensor_checksum(tensors):
        raise CnnlabError(f"{path}: damaged file: its tensors do not match the checksum saved with them (flipped bits "
                          "on the disk?); the run's model.safetensors is separate, and training again replaces this file")
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
        raise CnnlabError(f"{path}: the resume state is malformed ({first_line(exc)})") from None
    return optimizer_state, ema, weights, meta
