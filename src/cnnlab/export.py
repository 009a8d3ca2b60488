"""Export a trained model to ONNX or a `torch.export` program (.pt2), checked against the original.

    cnnlab export runs/mnist --format onnx            # -> runs/mnist/model.onnx
    cnnlab export runs/mnist --format pt2 --out m.pt2

Both formats take normalised float32 images (N, C, H, W) with a dynamic batch dimension N and
return logits (N, classes). BatchNorm layers that follow a conv or linear layer are folded into
its weights first. The preprocessing (kind, input size, mean/std) and the class names travel
with the file: in the ONNX model's metadata (`metadata_props`, key `cnnlab`), and for .pt2 in
the archive (`extra/cnnlab.json`) plus a readable `FILE.json` beside it.

After writing, the exported model is run beside the original (onnxruntime for ONNX) on random
inputs and on real test images; if any logit differs by more than `TOLERANCE` the file is
removed and the command fails. TorchScript is deprecated in the PyTorch we use: not offered.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .errors import CnnlabError, shorten
from .layers import spec_to_list

if TYPE_CHECKING:
    from .runs import Run

FORMATS = ("onnx", "pt2")
TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int, int]:
    """A copy of `model` (eval mode) with every BatchNorm that directly follows a conv or linear
    layer folded into that layer's weights; returns (model, folded, left over).

    A BatchNorm after an activation cannot be folded exactly (zero padding of the next conv
    would see shifted values) and stays as its own operation.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    folded_model = copy.deepcopy(model).eval()
    folded = 0
    for sequential in [m for m in folded_model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(sequential) - 1):
            layer, norm = sequential[i], sequential[i + 1]
            if isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                sequential[i] = fuse_conv_bn_eval(layer, norm)
            elif isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d) and norm.track_running_stats:
                sequential[i] = fuse_linear_bn_eval(layer, norm)
            else:
                continue
            sequential[i + 1] = nn.Identity()
            folded += 1
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded_model.modules())
    return folded_model, folded, left


def export_metadata(bundle: "Run", source: str) -> dict[str, Any]:
    """What a user of the exported file needs: input layout, preprocessing, class names, the spec."""
    prep = bundle.preprocessing
    return {
        "format": "cnnlab-export/1",
        "source": source,
        "input": {"name": INPUT_NAME, "shape": ["N", *bundle.input_shape], "dtype": "float32",
                  "normalisation": "(pixel / 255 - mean) / std, per channel"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(bundle.classes)], "meaning": "logits; softmax gives probabilities"},
        "classes": list(bundle.classes),
        "input_shape": list(bundle.input_shape),
        "preprocessing": prep.to_dict(),
        "mean": prep.mean,
        "std": prep.std,
        "layers": spec_to_list(bundle.layers),
        "metrics": bundle.metrics,
        "versions": bundle.versions,
    }


def _example_input(input_shape: tuple[int, ...]) -> torch.Tensor:
    # Batch 2, not 1: an example batch of 1 lets the tracer specialise the batch size away.
    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and warnings meant for their developers; keep ours clean."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, metadata: dict[str, Any]) -> int:
    """Write an ONNX file with a dynamic batch and `metadata` in its `metadata_props`; returns the opset."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        try:
            torch.onnx.export(model, (_example_input(input_shape),), str(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},))
        except Exception as exc:  # the exporter's own failures are many types; name the one that happened
            raise CnnlabError(f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}") from None
    proto = onnx.load(str(path))
    proto.doc_string = (f"cnnlab model from {metadata['source']}: {INPUT_NAME} float32 (N, "
                        f"{', '.join(map(str, input_shape))}) normalised as (pixel/255 - mean)/std -> "
                        f"{OUTPUT_NAME} (N, {len(metadata['classes'])})")
    del proto.metadata_props[:]
    for key, value in {"cnnlab": json.dumps(metadata), "classes": json.dumps(metadata["classes"]),
                       "input_shape": json.dumps(metadata["input_shape"]), "mean": json.dumps(metadata["mean"]),
                       "std": json.dumps(metadata["std"]), "preprocessing": metadata["preprocessing"]["kind"]}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def export_pt2(model: nn.Module, input_shape: tuple[int, ...], path: Path, metadata: dict[str, Any]) -> None:
    """Write a `torch.export` ExportedProgram with a dynamic batch; metadata goes into the archive."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        try:
            program = torch.export.export(model, (_example_input(input_shape),), dynamic_shapes=({0: batch},))
        except Exception as exc:  # torch.export raises many types; name the one that happened
            raise CnnlabError(f"torch.export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}") from None
        torch.export.save(program, str(path), extra_files={"cnnlab.json": json.dumps(metadata)})


def run_exported(path: Path, fmt: str, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file for `inputs` (B, C, H, W) float32, run by its own runtime."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy().astype(np.float32)})
        return torch.from_numpy(logits)
    # Our own file, just written: loading the ExportedProgram is safe here.
    with _quiet():
        program = torch.export.load(str(path))
    with torch.inference_mode():
        return program.module()(inputs)


def real_inputs(bundle: "Run", count: int = 64) -> tuple[torch.Tensor | None, str]:
    """Up to `count` test images of the model's dataset, normalised; (None, reason) when unavailable."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            data = bundle.load_test_data()
    except (CnnlabError, OSError, TypeError, ValueError) as exc:
        return None, f"{bundle.dataset} test images not available ({str(exc).splitlines()[0][:120]})"
    images = data.test.images[:count]
    if tuple(images.shape[1:]) != tuple(bundle.input_shape):
        return None, f"{bundle.dataset} images are {tuple(images.shape[1:])}, the model takes {tuple(bundle.input_shape)}"
    return bundle.preprocessing.normalize(images), f"{len(images)} {bundle.dataset} test images"


def check_parity(original: nn.Module, path: Path, fmt: str, input_shape: tuple[int, ...],
                 real: torch.Tensor | None) -> dict[str, float]:
    """Max |logit difference| between the exported file and the original model, per input set.

    Random inputs come in batches of 1 and 5 (the dynamic batch at work) and at two scales;
    real inputs in one batch.
    """
    generator = torch.Generator().manual_seed(1)
    sets = {"random": [torch.randn(1, *input_shape, generator=generator),
                       3 * torch.randn(5, *input_shape, generator=generator)]}
    if real is not None and len(real):
        sets["real"] = [real.float()]
    differences: dict[str, float] = {}
    original = original.eval()
    for name, batches in sets.items():
        worst = 0.0
        for x in batches:
            with torch.inference_mode():
                expected = original(x).float()
            got = run_exported(path, fmt, x.contiguous())
            if tuple(got.shape) != tuple(expected.shape):
                raise CnnlabError(f"{path}: the exported model gives shape {tuple(got.shape)} for a batch of {len(x)}, "
                                  f"the original {tuple(expected.shape)}")
            worst = max(worst, float((got.float() - expected).abs().max()))
        differences[name] = worst
    return differences


def export_model(model_path: str | Path, fmt: str, out: str | Path | None = None,
                 tolerance: float = TOLERANCE, check_real: bool = True) -> dict[str, Any]:
    """Export, check parity, and move the file into place; returns a report of what was done.

    Raises `CnnlabError` (and leaves no file behind) if the export fails or the exported model's
    logits differ from the original's by more than `tolerance`.
    """
    from .runs import open_run

    if fmt not in FORMATS:
        raise CnnlabError(f"unknown export format {shorten(fmt)} (choose {' or '.join(FORMATS)})")
    bundle = open_run(model_path)
    source = bundle.path
    model = bundle.model
    target = Path(out) if out else source.with_suffix(f".{fmt}")
    if target.is_dir():
        target = target / f"model.{fmt}"
    if target.suffix.lower() != f".{fmt}":
        raise CnnlabError(f"--out {target}: a {fmt} file should end in .{fmt}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"--out {target}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(target.parent, os.W_OK):
        raise CnnlabError(f"--out {target}: its folder is not writable")
    input_shape = bundle.input_shape
    folded, folded_count, left = fold_batchnorm(model)
    metadata = export_metadata(bundle, source.name)
    metadata["batchnorm_folded"] = folded_count

    # Write beside the target and rename only after the parity check: a failed export never
    # replaces a good file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{fmt}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        opset = None
        if fmt == "onnx":
            opset = export_onnx(folded, input_shape, tmp, metadata)
        else:
            export_pt2(folded, input_shape, tmp, metadata)
        real, real_note = real_inputs(bundle) if check_real else (None, "real images not requested")
        differences = check_parity(model, tmp, fmt, input_shape, real)
        worst = max(differences.values())
        if not worst <= tolerance:  # also catches NaN
            details = ", ".join(f"{k} inputs {v:.2e}" for k, v in differences.items())
            raise CnnlabError(f"parity check failed: the exported model's logits differ from the original's by up to "
                              f"{worst:.2e} (limit {tolerance:.0e}; {details}); no file written")
        os.replace(tmp, target)
        _chmod_like_new_file(target)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = None
    if fmt == "pt2":
        sidecar = target.with_name(target.name + ".json")
        from .files import atomic_write_text

        atomic_write_text(sidecar, json.dumps(metadata, indent=2) + "\n")  # a full disk leaves no half file
    return {"path": str(target), "format": fmt, "opset": opset, "bytes": target.stat().st_size,
            "batchnorm_folded": folded_count, "batchnorm_left": left, "max_abs_diff": differences,
            "real_inputs": real_note, "tolerance": tolerance, "metadata_file": str(sidecar) if sidecar else None,
            "input_shape": list(input_shape), "classes": len(bundle.classes), "preprocessing": bundle.preprocessing.to_dict()}


def _chmod_like_new_file(path: Path) -> None:
    # mkstemp creates files readable by their owner only; an export is meant to be shared.
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
