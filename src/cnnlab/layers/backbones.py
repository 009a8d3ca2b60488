"""Pretrained backbones from timm as one layer type: `{type: timm, name: resnet18, pretrained: true}`.

The layer is a timm model without its classifier and pooling (`timm.create_model(name,
num_classes=0, global_pool='')`): feature maps in, feature maps out, so the spec goes on with a
global pool and a linear layer as any other network:

    model:
      - {type: timm, name: resnet18, pretrained: true}   # 3x224x224 -> 512x7x7
      - global_avg_pool
      - {type: linear}

Building the layer makes the architecture only (random weights): `load_model` then fills in a
checkpoint's weights, and predict, export and serve never need the pretrained file. Training a new
run loads the pretrained weights (`load_pretrained`) through timm's own loader, from timm's download
(`pretrained: true`, only where downloads are allowed) or from a local safetensors file
(`pretrained: PATH`); the backbone's input size and normalisation become the run's preprocessing.

`cnnlab summary` shows the backbone at the granularity of its blocks (ResNet's conv1 ... layer4,
EfficientNet's blocks.0 ...), their shapes, parameters and multiply-adds recorded by forward hooks
on a shape-only ("meta") copy of the model. MACs count convolution and linear layers; the receptive
field is shown as the whole input (it is not traced through timm's modules).

timm is imported only when a spec uses this layer: the import takes seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CnnlabError, shorten
from ..pretrained import WEIGHTS, weights_file
from .registry import REQUIRED, LayerInfo, LayerSpec, LayerType, TraceState, _layer_error, _spatial, register

# Containers whose children are the blocks worth a row each (ResNet's layers are top-level already).
_BLOCK_CONTAINERS = ("blocks", "stages", "layers", "features")


@dataclass(frozen=True)
class _Block:
    name: str                  # its path in the timm model, e.g. "layer2" or "blocks.3"
    module: str                # its class, e.g. "Sequential" or "BasicBlock"
    out_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass(frozen=True)
class _Shape:
    out_shape: tuple[int, ...]
    params: int
    macs: int
    blocks: tuple[_Block, ...]


def _timm():
    try:
        import timm
    except ImportError:
        raise CnnlabError("the timm layer type needs the Python package timm (pip install timm)") from None
    return timm


def _create(name: str, in_channels: int, pretrained: bool = False,
            state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """timm's model `name` without classifier or pooling; pretrained through timm's own loader (its
    download, or `state_dict`: tensors cnnlab read itself, which timm adapts as it would a file's)."""
    timm = _timm()
    # Never timm's `file`: timm opens any file not named *.safetensors (case matters) with torch.load.
    overlay = {"state_dict": state_dict, "file": None, "url": None, "hf_hub_id": None, "source": ""} if state_dict else None
    return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=0,
                             global_pool="", in_chans=in_channels)


def _block_names(model: nn.Module) -> list[str]:
    names = []
    for name, child in model.named_children():
        if name in _BLOCK_CONTAINERS and isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


@lru_cache(maxsize=32)
def _trace_backbone(name: str, c: int, h: int, w: int) -> _Shape:
    """Shapes, parameters and MACs of the backbone and its blocks, from hooks on a shape-only forward."""
    with torch.device("meta"):
        model = _create(name, c).eval()
    names = _block_names(model)
    calls: list[tuple[str, tuple[int, ...]]] = []
    macs: dict[str, int] = {}

    def record(block: str):
        def hook(module, inputs, output):
            passes_through = all(isinstance(m, nn.Identity) for m in module.modules() if not list(m.children()))
            if isinstance(output, torch.Tensor) and not passes_through:  # the removed classifier and pooling
                calls.append((block, tuple(output.shape[1:])))
        return hook

    def count(block: str):
        def hook(module, inputs, output):
            per_output = module.in_features if isinstance(module, nn.Linear) else \
                (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            macs[block] = macs.get(block, 0) + output[0].numel() * per_output
        return hook

    hooks = []
    for block in names:
        module = model.get_submodule(block)
        hooks.append(module.register_forward_hook(record(block)))
        hooks += [m.register_forward_hook(count(block)) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, c, h, w), device="meta"))
    except Exception as exc:  # too small an input for its strides, an input size the model fixes, ...
        raise CnnlabError(f"timm {name} cannot take a {c}x{h}x{w} input ({str(exc).splitlines()[0][:120]})") from None
    finally:
        for hook in hooks:
            hook.remove()
    if out.dim() != 4:
        raise CnnlabError(f"timm {name} gives {tuple(out.shape[1:])} (tokens, not feature maps); use a convolutional "
                          "model (resnet, efficientnet, convnext, ...)")
    blocks = []
    for block, shape in calls:
        if any(b.name == block for b in blocks):
            continue  # a block called twice (weights shared): one row
        module = model.get_submodule(block)
        blocks.append(_Block(block, type(module).__name__, shape, sum(p.numel() for p in module.parameters()),
                             macs.get(block, 0)))
    return _Shape(tuple(out.shape[1:]), sum(p.numel() for p in model.parameters()), sum(macs.values()), tuple(blocks))


class TimmModel(nn.Module):
    """A timm model without classifier and pooling: (B, C, H, W) -> feature maps (B, C', H', W')."""

    def __init__(self, model: nn.Module, blocks: list[str]):
        super().__init__()
        self.model = model
        self.block_names = list(blocks)

    @property
    def body(self) -> list[nn.Module]:
        """Its blocks in the order they run (the rows of `cnnlab summary`); not registered twice."""
        return [self.model.get_submodule(name) for name in self.block_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, C', H', W')


@register
class Timm(LayerType):
    name = "timm"
    keys = {"name": REQUIRED, "pretrained": False, "in_channels": None}
    help = ("a timm model's feature extractor (classifier and pooling removed): name (e.g. resnet18, efficientnet_b0), "
            "pretrained: true (timm's download), false, packaged weights installed with cnnlab[pretrained] "
            "(efficientnet-lite0, for tf_efficientnet_lite0), or a .safetensors file")
    needs_maps = shows_maps = extracts_features = True

    def check(self, where: str, params: dict[str, Any]) -> None:
        name, pretrained = params["name"], params["pretrained"]
        if not isinstance(name, str) or not name.strip() or ":" in name:
            raise CnnlabError(f"{where}: name must be a timm model name such as resnet18, got {shorten(name)}")
        if not isinstance(pretrained, (bool, str)) or pretrained == "":
            raise CnnlabError(f"{where}: pretrained must be true, false or a .safetensors file, got {shorten(pretrained)}")
        if isinstance(pretrained, str) and pretrained in WEIGHTS:
            if WEIGHTS[pretrained].model != name:
                raise CnnlabError(f"{where}: pretrained {pretrained} holds the weights of timm {WEIGHTS[pretrained].model}, "
                                  f"not {shorten(name)}")
        elif isinstance(pretrained, str) and not pretrained.lower().endswith(".safetensors"):
            raise CnnlabError(f"{where}: pretrained {shorten(pretrained)}: expected true, false, a packaged weights name "
                              f"({', '.join(WEIGHTS)}) or a .safetensors file (other formats would be unpickled)")
        if params["in_channels"] is not None and not (isinstance(params["in_channels"], int)
                                                      and not isinstance(params["in_channels"], bool)
                                                      and params["in_channels"] >= 1):
            raise CnnlabError(f"{where}: in_channels must be a positive whole number, got {shorten(params['in_channels'])}")

    def trace(self, info: LayerInfo, p: dict[str, Any], state: TraceState) -> None:
        c, h, w = _spatial(info)
        if p["in_channels"] is not None and p["in_channels"] != c:
            raise _layer_error(info, f"in_channels is {p['in_channels']} but its input has {c} channels")
        if not _timm().is_model(p["name"]):
            raise _layer_error(info, f"timm has no model {shorten(p['name'])} (see timm.list_models())")
        try:
            shape = _trace_backbone(p["name"], c, h, w)
        except CnnlabError as exc:
            raise _layer_error(info, str(exc)) from None
        info.out_shape, info.params, info.macs = shape.out_shape, shape.params, shape.macs
        reduction = (max(1, h // shape.out_shape[1]), max(1, w // shape.out_shape[2]))
        info.formula = f"{c}x{h}x{w} → {'x'.join(map(str, shape.out_shape))} (timm {p['name']}, stride {reduction[0]})"
        start_jump = state.jump
        state.grow((h, w), reduction)  # the whole input, as far as this table can tell
        info.children = [LayerInfo(n, LayerSpec("timm_block", {"block": b.name, "module": b.module}), (), b.out_shape,
                                   params=b.params, macs=b.macs, receptive_field=state.receptive_field,
                                   jump=(start_jump[0] * max(1, h // b.out_shape[1]), start_jump[1] * max(1, w // b.out_shape[2]))
                                   if len(b.out_shape) == 3 else state.jump, path=f"{info.path}.{n}")
                         for n, b in enumerate(shape.blocks, start=1)]
        previous = info.in_shape
        for child in info.children:
            child.in_shape, previous = previous, child.out_shape
        p["in_channels"] = c

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        return TimmModel(_create(p["name"], p["in_channels"]), [child.spec.params["block"] for child in info.children])

    def has_pretrained(self, params: dict[str, Any]) -> bool:
        return params["pretrained"] is not False

    def load_pretrained(self, module: nn.Module, spec: LayerSpec, where: str) -> str:
        return load_pretrained(module, spec, where)

    def pretrained_normalisation(self, params: dict[str, Any], channels: int) -> tuple[list[float], list[float]]:
        return pretrained_normalisation(params["name"], channels)

    def describe(self, p: dict[str, Any]) -> str:
        pretrained = p["pretrained"]
        source = ("" if pretrained is False else ", pretrained" if pretrained is True
                  else f", pretrained: {pretrained if pretrained in WEIGHTS else Path(pretrained).name}")
        return f"timm {p['name']}{source}"


@register
class TimmBlock(LayerType):
    """One block of a timm layer, as `cnnlab summary` lists it: made by the timm layer's trace, never written."""

    name = "timm_block"
    keys = {"block": REQUIRED, "module": ""}
    help = "one block of a timm layer in `cnnlab summary` (written by cnnlab, not used in specs)"

    def check(self, where: str, params: dict[str, Any]) -> None:
        raise CnnlabError(f"{where}: timm_block rows are made by a timm layer; write {{type: timm, name: ...}} instead")

    def describe(self, p: dict[str, Any]) -> str:
        return f"{p['block']} ({p['module']})" if p.get("module") else str(p["block"])


# ---------------------------------------------------------------------------------------------
# Pretrained weights, input size and normalisation
# ---------------------------------------------------------------------------------------------

def data_config(name: str) -> dict[str, Any]:
    """timm's input size, mean and std for model `name` (its default pretrained weights)."""
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return {"input_size": tuple(cfg.input_size), "mean": list(cfg.mean), "std": list(cfg.std)}


def preferred_image_size(raw_layers: Any) -> int | None:
    """The input side length a spec that starts with a timm layer was pretrained at (None otherwise)."""
    first = raw_layers[0] if isinstance(raw_layers, (list, tuple)) and raw_layers else None
    if not (isinstance(first, dict) and str(first.get("type", "")).lower() == "timm" and isinstance(first.get("name"), str)):
        return None
    size = data_config(first["name"]).get("input_size")
    return int(size[1]) if size else None


def load_pretrained(module: nn.Module, spec: LayerSpec, where: str) -> str:
    """Fill a built timm layer with its pretrained weights; returns where they came from.

    `pretrained: true` is timm's download (only where downloads are allowed); a path is a local
    safetensors file, recognised by its content and read by cnnlab (`read_weight_file`), which must
    cover the model (`check_covers`); timm then adapts its tensors as it would a download's.
    """
    from ..runtime import downloads_allowed

    p = spec.params
    pretrained = p["pretrained"]
    hub = (_timm().models.get_pretrained_cfg(p["name"]) or {})
    hub_id = getattr(hub, "hf_hub_id", None) or p["name"]
    how = (f"download it on a machine with internet (e.g. python -c \"import timm; timm.create_model('{p['name']}', "
           f"pretrained=True)\" puts it in timm's cache, or the model.safetensors file of {hub_id} from timm's model hub) "
           f"and write pretrained: /path/to/model.safetensors")
    if pretrained is True:
        if not downloads_allowed():
            raise CnnlabError(f"{where}: pretrained: true needs timm's download and downloads are off "
                              f"(CNNLAB_OFFLINE is set); {how}")
        tensors = None
        file = _cached_hub_file(hub_id)
        source = "timm's download" if file is None else f"timm's cache ({file})"
        if file is None:
            # Without a network, huggingface_hub retries for about a minute before it fails; a short probe
            # of the hub says the same in seconds.
            endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
            reason = unreachable(endpoint)
            if reason:
                raise CnnlabError(f"{where}: pretrained: true downloads the weights from {endpoint}, which this machine "
                                  f"cannot reach ({reason}); {how}")
    else:
        path = (weights_file(pretrained, reference_state, where) if pretrained in WEIGHTS
                else Path(pretrained).expanduser())
        if not path.is_file():
            raise CnnlabError(f"{where}: pretrained weights file {path} not found; {how}")
        source = str(path)
        tensors = read_weight_file(path, where)
        check_covers(module.model, tensors, p["name"], where, path)
    try:
        loaded = _create(p["name"], p["in_channels"], pretrained=True, state_dict=tensors)
    except CnnlabError:
        raise
    except Exception as exc:  # no network, a file of another model, a damaged file: timm raises many types
        raise CnnlabError(f"{where}: cannot load the pretrained weights from {source} ({_words(exc)}); {how}") from None
    module.model.load_state_dict(loaded.state_dict())
    return source


def reference_state(name: str) -> dict[str, torch.Tensor]:
    """timm's whole model `name` (classifier included) as a state dict of shape-only tensors: the keys and shapes
    packaged weights are converted to (`pretrained.weights_file`)."""
    with torch.device("meta"):
        return _timm().create_model(name).state_dict()


SAFETENSORS_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header


def read_weight_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, recognised by its content (an 8-byte little-endian header
    length, then that many bytes of JSON), never by its name: anything else is refused unread, so a
    pickle named weights.SAFETENSORS is never handed to a loader that would unpickle it."""
    import json
    import struct

    from safetensors.torch import load_file

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            total = path.stat().st_size
            if not 2 <= size <= min(SAFETENSORS_HEADER_LIMIT, total - 8):
                raise ValueError("it does not start with a safetensors header")
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
        tensors = load_file(str(path))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise CnnlabError(f"{where}: pretrained {path} is not a safetensors file ({str(exc)[:120]}); "
                          "only safetensors weight files are read") from None
    except Exception as exc:  # safetensors' own errors for a damaged file
        raise CnnlabError(f"{where}: pretrained {path}: cannot read it as safetensors ({str(exc)[:120]})") from None
    return tensors


def check_covers(model: nn.Module, tensors: dict[str, torch.Tensor], name: str, where: str, path: Path) -> None:
    """A weights file must hold every tensor of the built backbone, floating point where the model's is,
    with the same shape (the first conv may differ in its input channels: timm adapts it)."""
    cfg = _timm().models.get_pretrained_cfg(name)
    first = getattr(cfg, "first_conv", None) or ()
    first_convs = {f"{c}.weight" for c in ([first] if isinstance(first, str) else first)}
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CnnlabError(f"{where}: pretrained {path} holds {len(expected) - len(missing)} of the {len(expected)} "
                          f"tensors timm {name} needs (missing e.g. {shorten(missing[0])}); weights of another model?")
    for key, wanted in expected.items():
        got = tensors[key]
        if wanted.is_floating_point() and not got.is_floating_point():
            raise CnnlabError(f"{where}: pretrained {path}: tensor {shorten(key)} is {str(got.dtype).replace('torch.', '')}, "
                              "expected floating point")
        same = tuple(got.shape) == tuple(wanted.shape) or (
            key in first_convs and got.dim() == wanted.dim() == 4 and got.shape[0] == wanted.shape[0]
            and got.shape[2:] == wanted.shape[2:])
        if not same:
            raise CnnlabError(f"{where}: pretrained {path}: tensor {shorten(key)} has shape {tuple(got.shape)}, "
                              f"timm {name} needs {tuple(wanted.shape)}")


def _words(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut at a word (not mid-word) when long."""
    text = " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def _cached_hub_file(hub_id: str) -> str | None:
    """The weights file of `hub_id` when huggingface_hub already holds it (no network needed), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    model_id, _, revision = hub_id.partition("@")
    found = try_to_load_from_cache(model_id, "model.safetensors", revision=revision or None)
    return found if isinstance(found, str) else None


def unreachable(url: str, seconds: float = 3.0) -> str | None:
    """Why `url`'s host cannot be reached within `seconds` (name lookup and TCP connect), or None when it can.

    The lookup runs in a daemon thread: `getaddrinfo` has no timeout of its own, and a machine without
    a network may take far longer than `seconds` to give up on a name.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=seconds):
                outcome.append(None)
        except socket.gaierror:
            outcome.append(f"cannot look up {host}: no network or no DNS")
        except TimeoutError:
            outcome.append(f"no answer from {host} within {seconds:g} s")
        except OSError as exc:
            outcome.append(f"cannot connect to {host}:{port}: {exc.strerror or type(exc).__name__}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds + 0.5)
    return outcome[0] if outcome else f"no answer from {host} within {seconds:g} s"


def pretrained_normalisation(name: str, channels: int) -> tuple[list[float], list[float]]:
    """The mean and std the backbone's pretrained weights expect, for `channels` input channels."""
    cfg = data_config(name)
    mean, std = list(cfg.get("mean", (0.5, 0.5, 0.5))), list(cfg.get("std", (0.5, 0.5, 0.5)))
    if channels != len(mean):  # grey input: timm sums the first conv's RGB weights, so the channel is their mean
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return mean, std
