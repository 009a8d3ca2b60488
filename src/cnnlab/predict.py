"""Files -> preprocessing -> top-k: classify images with a trained model.

`Predictor` is the one inference path shared by `cnnlab predict` and the HTTP API: it decodes
untrusted image bytes through the image door (`data.decode.open_image`: size, pixel and
preprocessing limits, every decoder failure turned into a `BadImage` with a one-line reason), prepares them with the preprocessing stored in the
model (`Preprocessing.image_to_uint8` + `normalize`) and returns probabilities.

    cnnlab predict runs/mnist digits/ photo.jpg --top-k 3 --json

One line per image; a file that cannot be read, or a digit model's picture with no digit in it
(blank paper, an empty canvas: `no digit found`), gives one error line and the others are still
predicted; the exit code is 1 if any file failed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

# The image door (`data/decode.py`) opens every image; these names stay importable from here.
from .data.decode import MAX_FILE_BYTES, MAX_PIXELS, MIN_SIDE, BadImage, OutOfMemory, check_prepared, open_image  # noqa: F401
from .errors import CnnlabError, NoDigitFound, shorten

if TYPE_CHECKING:
    from .data.preprocess import Preprocessing
    from .runs import Run

BATCH_SIZE = 64
# Large inputs go in smaller batches (`batch_size_for`): EfficientNet-Lite0 at 224x224 on 1,000 photos, 2 cores, whole
# process: batch 2-8 6.1-6.5 s, 16 6.5-6.7 s, 32 7.1-7.3 s, 64 8.8-11 s and 2.5 GB against 1.0 GB (NOTES.md §20);
# 32x32 inputs: 32 and 64 the same, 16 slower.
BATCH_PIXELS = 64 * 64 * 64
# What runs the model: PyTorch, ONNX Runtime on the run's exported model.onnx, or auto: ONNX Runtime when
# that file is there and gives the model's own logits (about 2x PyTorch's throughput: NOTES.md §20), else PyTorch.
RUNTIMES = ("auto", "torch", "onnx")


def batch_size_for(input_shape: tuple[int, ...]) -> int:
    """Images per forward pass by default: `BATCH_SIZE` on inputs up to 64x64 pixels, about `BATCH_PIXELS`
    pixels' worth on larger ones (16 at 128x128, 5 at 224x224), at least 4."""
    pixels = input_shape[-1] * (input_shape[-2] if len(input_shape) > 1 else 1)
    return max(4, min(BATCH_SIZE, BATCH_PIXELS // max(1, pixels)))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return text or type(exc).__name__


def prepare_image(preprocessing: "Preprocessing", image: Image.Image, max_decoded_bytes: int) -> torch.Tensor:
    """`Predictor.prepare`: a decoded image -> its uint8 (C, H, W) model input, or `BadImage`."""
    # Images handed over in memory (the Python API) skipped the door's header checks: the same limit here.
    check_prepared(*image.size, preprocessing, max_decoded_bytes)
    try:
        return preprocessing.image_to_uint8(image)
    except NoDigitFound as exc:  # a readable picture with nothing to classify
        raise BadImage(str(exc), 422) from None
    except BadImage:
        raise
    except MemoryError:
        raise OutOfMemory() from None
    except CnnlabError as exc:
        raise BadImage(str(exc), 415) from None
    except (OSError, ValueError) as exc:  # lazy decoders can still fail while converting
        raise BadImage(f"cannot decode the image ({_reason(exc)})", 422) from None


def default_decodes() -> int:
    """Images decoded at once by default: one per core, at most 4 (each may take `max_decoded_bytes`
    and a few times that while it is converted)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class Prediction:
    """The model's answer for one image."""

    label: str
    index: int
    confidence: float
    top_k: list[dict[str, Any]] = field(default_factory=list)   # [{"label", "probability"}], best first

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "confidence": self.confidence, "top_k": self.top_k}


class Predictor:
    """A loaded model with its preprocessing: image -> input -> probabilities -> top-k.

    Safe to call from several threads at once (the model is only read). `max_decoded_bytes` bounds one
    decoded image (`data.decode`); `max_decodes` bounds how many images are decoded and prepared at
    once (`load_input`), so that many large uploads together cannot take the server's memory.
    `batches_at_once` > 1 (the `predict` command's 2) splits ONNX Runtime's threads between that many
    sessions' worth of batches run side by side (`predict_files`); with PyTorch it stays 1.
    """

    def __init__(self, run: "Run", device: str | torch.device = "cpu", max_decoded_bytes: int | None = None,
                 max_decodes: int | None = None, runtime: str = "torch", batches_at_once: int = 1):
        from .data.decode import limit_bytes

        self.max_decoded_bytes = limit_bytes(None) if max_decoded_bytes is None else max_decoded_bytes
        self.decode_slots = threading.BoundedSemaphore(max_decodes or default_decodes())
        self.device = torch.device(device)
        self.run = run
        self.model = run.model.to(self.device).eval()
        self.classes: list[str] = run.classes
        self.preprocessing = run.preprocessing
        self.input_shape = run.input_shape
        # CPU convolutions, pools and BatchNorm run several times faster on channels-last tensors (the
        # rgb32 network 3x at batch 64: benchmarks/NOTES.md §20); the weights are the same numbers.
        self.channels_last = self.device.type == "cpu" and len(self.input_shape) == 3 and \
            any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if runtime not in RUNTIMES:
            raise CnnlabError(f"unknown runtime {shorten(runtime)} (choose {' or '.join(RUNTIMES)})")
        self.session = None
        if runtime == "onnx" or (runtime == "auto" and self.device.type == "cpu" and run.path.with_suffix(".onnx").is_file()):
            try:
                self.session = _onnx_session(run, self.model, self.input_shape, _onnx_threads(batches_at_once))
            except CnnlabError as exc:
                if runtime == "onnx":
                    raise
                print(f"warning: {str(exc).replace('--runtime onnx: ', '')}; predicting with PyTorch", file=sys.stderr)
        self.runtime = "onnx" if self.session is not None else "torch"
        # PyTorch's forward passes share one OpenMP pool: side by side they would only wait for each other
        self.batches_at_once = max(1, int(batches_at_once)) if self.session is not None else 1

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu", runtime: str = "torch",
                  batches_at_once: int = 1) -> "Predictor":
        """Load a run folder or model .safetensors file."""
        from .runs import open_run

        return cls(open_run(path, device), device, runtime=runtime, batches_at_once=batches_at_once)

    @property
    def draft_side(self) -> int:
        """Largest side worth decoding: digits are worked on at <= 1024 px, other models need ~2x their input."""
        return 1024 if self.preprocessing.kind == "digit" else 2 * max(self.preprocessing.size)

    def load(self, source: bytes | str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """`open_image` with this model's decoding hints, decoded-size budget and preprocessing (so an image
        the resize would blow up is refused before decoding)."""
        return open_image(source, max_pixels, self.draft_side, self.max_decoded_bytes, self.preprocessing)

    def load_input(self, source: bytes | str | Path, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
        """`prepare(load(source))`, at most `max_decodes` at a time: the uint8 (C, H, W) model input."""
        with self.decode_slots:
            return self.prepare(self.load(source, max_pixels))

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> uint8 (C, H, W) model input before normalisation (what the model 'sees')."""
        return prepare_image(self.preprocessing, image, self.max_decoded_bytes)

    @torch.inference_mode()
    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> softmax probabilities (B, classes) on the CPU."""
        if inputs.shape[0] == 0:
            return torch.zeros((0, len(self.classes)))
        if self.session is not None:
            # numpy, one thread, for the small steps around ONNX Runtime: torch spreads every element-wise
            # op over its thread pool, which on a busy machine costs more than the op (NOTES.md §20)
            mean, std = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1) for v in
                         (self.preprocessing.mean, self.preprocessing.std))
            x = (inputs.numpy().astype(np.float32) / np.float32(255.0) - mean) / std
            (logits,) = self.session.run(None, {self.session.get_inputs()[0].name: x})
            logits = np.exp(logits - logits.max(axis=1, keepdims=True))
            return torch.from_numpy(logits / logits.sum(axis=1, keepdims=True))
        x = self.preprocessing.normalize(inputs.to(self.device))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.model(x).float(), dim=1).cpu()

    def top_k(self, probabilities: torch.Tensor, k: int = 1) -> Prediction:
        """One image's probabilities (classes,) -> its `Prediction` with the `k` most likely classes."""
        return self.top_k_batch(probabilities.unsqueeze(0), k)[0]

    def top_k_batch(self, probabilities: torch.Tensor, k: int = 1) -> list[Prediction]:
        """`top_k` for a batch (B, classes): one topk and one conversion to Python numbers for all
        (per image they cost as much as ONNX Runtime's forward pass of a small model)."""
        k = max(1, min(int(k), len(self.classes)))
        values, indices = probabilities.topk(k, dim=1)
        predictions = []
        for row_values, row_indices in zip(values.tolist(), indices.tolist()):
            top = [{"label": self.classes[i], "probability": round(v, 6)} for v, i in zip(row_values, row_indices)]
            predictions.append(Prediction(top[0]["label"], row_indices[0], top[0]["probability"], top))
        return predictions

    def predict_images(self, images: list[Image.Image], k: int = 1) -> list[Prediction]:
        """Classify decoded images in one batch."""
        if not images:
            return []
        inputs = torch.stack([self.prepare(image) for image in images])
        return [self.top_k(p, k) for p in self.probabilities(inputs)]

    def predict_bytes(self, data: bytes, k: int = 1, max_pixels: int = MAX_PIXELS) -> Prediction:
        """Classify one encoded image; raises `BadImage` for anything that is not a usable image."""
        inputs = self.load_input(data, max_pixels).unsqueeze(0)
        return self.top_k(self.probabilities(inputs)[0], k)


def _onnx_threads(batches_at_once: int) -> int:
    """ONNX Runtime's threads for one session: all cores (0: its default) for one batch at a time, else the
    cores split between the batches run side by side (at least one each)."""
    if batches_at_once <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) // batches_at_once)


def _onnx_session(run: "Run", model: torch.nn.Module, input_shape: tuple[int, ...], threads: int = 0):
    """An ONNX Runtime session on the run's exported model (`cnnlab export RUN`, beside model.safetensors),
    checked against `model` first: a file exported from other weights (the run trained on, or was
    replaced, after the export) gives other logits and is refused, as the export's parity check refuses.
    `threads`: its intra-op threads (0: ONNX Runtime's default, one per core)."""
    from .export import TOLERANCE

    path = run.path.with_suffix(".onnx")
    if not path.is_file():
        raise CnnlabError(f"--runtime onnx: {path} does not exist; write it first with: cnnlab export {run.root}")
    try:
        import onnxruntime
    except ImportError:
        raise CnnlabError("--runtime onnx needs onnxruntime (pip install onnxruntime)") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # No spinning between runs: cnnlab's decoders (processes in predict, threads in serve) share the cores with
    # ONNX Runtime's threads, and a thread spinning for the next batch takes a core from them (NOTES.md §20).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types: a corrupt or foreign file
        raise CnnlabError(f"--runtime onnx: cannot load {path} ({_reason(exc)})") from None
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x).float()
    try:
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        worst = float((torch.from_numpy(got).float() - expected).abs().max())
    except Exception as exc:  # a file for another input shape
        raise CnnlabError(f"--runtime onnx: {path} does not run on this model's inputs ({_reason(exc)})") from None
    if not worst <= TOLERANCE:
        raise CnnlabError(f"--runtime onnx: {path} gives logits up to {worst:.1e} away from {run.path.name}'s (limit "
                          f"{TOLERANCE:.0e}): it was exported from other weights; export again: cnnlab export {run.root}")
    return session


# What a folder's files must end in to be predicted (case does not matter): the formats `open_image` reads.
IMAGE_EXTENSIONS = frozenset((".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".pnm"))


def iter_files(paths: Iterable[str | Path], skipped: list[Path] | None = None) -> Iterator[Path]:
    """Each path as given; folders expanded to their image files (recursively, sorted, hidden ones skipped).

    A folder's files without an image extension (notes, JSON, a .DS_Store) go to `skipped` instead;
    a file named on its own is always tried, so a mistake in it is reported.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        yield Path(root) / name
                    elif skipped is not None:
                        skipped.append(Path(root) / name)
        else:
            yield path  # a missing file is reported as that file's error


def _chunks(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prepared_chunks(predictor: Predictor, paths: Iterable[str | Path], batch_size: int,
                    max_pixels: int = MAX_PIXELS, skipped: list[Path] | None = None
                    ) -> Iterator[list[tuple[Path, torch.Tensor | str]]]:
    """The files under `paths` (`iter_files`; a folder's non-image files go to `skipped`) in chunks of
    `batch_size`, in the order given: each file with its uint8 model input (C, H, W), or with the
    one-line reason it cannot be used (unreadable, or no digit in it).

    `predict` and `explain` read files through this, so both report bad files the same way."""
    files = list(iter_files(paths, skipped))
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    workers = default_decodes()
    if len(chunks) < 2 or workers < 2 or not sys.platform.startswith("linux"):
        for chunk in chunks:  # one batch or one core: nothing to overlap
            yield _received(_decode_chunk(chunk, max_pixels, _decoder_of(predictor)))
        return
    # Many files: worker processes decode whole chunks while this process runs the model, `workers`
    # chunks ahead (at most `workers` images decoded at once, as the decode slots allow). Processes, not
    # threads: most of a small JPEG's decoding is PIL's Python, which holds the GIL (NOTES.md §20).
    # Forked, as DataLoader's workers are: they inherit the preprocessing and import nothing.
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    decoder = _decoder_of(predictor)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_decoder_started) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_decode_chunk, chunk, max_pixels, decoder))
            if len(pending) > workers:
                yield _received(pending.popleft().result())
        while pending:
            yield _received(pending.popleft().result())


def _decoder_started() -> None:
    """A forked decoder runs torch on one thread, as DataLoader's workers do: the parent's OpenMP threads
    do not survive the fork, and a tensor op large enough to run in parallel (copying one 224x224 photo)
    would wait for them forever. (Measured: `predict` on a photos run hung on its first chunk.)"""
    torch.set_num_threads(1)


def _decoder_of(predictor: Predictor) -> tuple:
    return predictor.preprocessing, predictor.draft_side, predictor.max_decoded_bytes


def _decode_chunk(paths: list[Path], max_pixels: int, decoder: tuple) -> list[tuple[Path, Any]]:
    """Decode and prepare files (in a worker process or here): each path with its uint8 input as a numpy
    array (it pickles as plain bytes), or with the one-line reason it cannot be used."""
    preprocessing, draft_side, max_decoded_bytes = decoder
    out: list[tuple[Path, Any]] = []
    for path in paths:
        try:
            image = open_image(path, max_pixels, draft_side, max_decoded_bytes, preprocessing)
            out.append((path, prepare_image(preprocessing, image, max_decoded_bytes).numpy()))
        except BadImage as exc:
            out.append((path, str(exc)))
    return out


def _received(decoded: list[tuple[Path, Any]]) -> list[tuple[Path, torch.Tensor | str]]:
    return [(path, item if isinstance(item, str) else torch.from_numpy(item)) for path, item in decoded]


def finish_files(seen: int, failed: int, paths: Iterable[str | Path], as_json: bool,
                 skipped: list[Path] | None = None) -> int:
    """The exit code after `seen` files of which `failed` could not be used (1 if any failed); says
    how many non-image files a folder held; no image files at all is an error."""
    skipped = skipped or []
    if skipped:
        kinds = sorted({p.suffix.lower() or "no extension" for p in skipped})
        print(f"skipped {len(skipped)} file(s) whose extension is not an image's ({', '.join(kinds[:6])}"
              f"{', ...' if len(kinds) > 6 else ''})", file=sys.stderr)
    if seen == 0:
        what = f"no image files found (only {len(skipped)} that are not images)" if skipped else "no files found"
        raise CnnlabError(f"{what} in {', '.join(map(str, paths))}")
    if failed and not as_json:
        print(f"{failed} of {seen} file(s) could not be read or hold no digit", file=sys.stderr)
    return 1 if failed else 0


def predict_files(predictor: Predictor, paths: Iterable[str | Path], top_k: int = 1, batch_size: int | None = None,
                  max_pixels: int = MAX_PIXELS, skipped: list[Path] | None = None
                  ) -> Iterator[tuple[Path, Prediction | str]]:
    """Each file under `paths` (`iter_files`), in the order given, with its `Prediction` (the `top_k`
    most likely classes) or the one-line reason it cannot be used; `batch_size` files per forward pass
    (default `batch_size_for` the model's input), `predictor.batches_at_once` of them side by side."""
    batch_size = batch_size or batch_size_for(predictor.input_shape)
    chunks = prepared_chunks(predictor, paths, batch_size, max_pixels, skipped)
    at_once = predictor.batches_at_once
    if at_once < 2:
        for chunk in chunks:
            yield from _predict_chunk(predictor, chunk, top_k)
        return
    # Batches side by side in threads (ONNX Runtime lets go of the GIL), each session on its share of the
    # cores: one session on every core spends much of a small model's batch with a thread waiting for the
    # other, which the decoder processes keep busy (rgb32 on 2 cores: 4.0 s -> 3.3 s; NOTES.md §20). The
    # top-k and the caller's printing of one batch also overlap the next batch's forward pass.
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(at_once, thread_name_prefix="cnnlab-predict") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_predict_chunk, predictor, chunk, top_k))
            if len(pending) > at_once:  # one more waits its turn, so that no thread idles while the caller prints
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _predict_chunk(predictor: Predictor, chunk: list[tuple[Path, torch.Tensor | str]], top_k: int
                   ) -> list[tuple[Path, Prediction | str]]:
    decoded = [(path, item) for path, item in chunk if isinstance(item, torch.Tensor)]
    results: dict[Path, Prediction] = {}
    if decoded:
        probabilities = predictor.probabilities(torch.stack([tensor for _, tensor in decoded]))
        for (path, _), prediction in zip(decoded, predictor.top_k_batch(probabilities, top_k)):
            results[path] = prediction
    return [(path, item if isinstance(item, str) else results[path]) for path, item in chunk]


def print_error(path: Path, message: str, as_json: bool) -> None:
    """One file's error: a JSON line with --json, else `error: PATH: message` on stderr."""
    if as_json:
        print(json.dumps({"path": str(path), "error": message}))
    else:
        print(f"error: {path}: {message}", file=sys.stderr)
