"""TensorBoard event files for a run, in `RUN/tb/`, written through `torch.utils.tensorboard`.

Per step: the training loss and the learning rate (`step/loss`, `step/lr`). Per epoch: every value
of that epoch's line in metrics.jsonl (`epoch/train_loss`, `epoch/test_accuracy`, ...). At the end of
the run: the hyper-parameters with the final metrics (the HParams view), the confusion matrix and
the most confidently wrong test images as pictures, and the configuration as text.

`fit()` opens one with `tensorboard_log(...)` and calls `step`, `epoch` and `finish`; that is all
training knows about TensorBoard. Where tensorboard is not installed, training says so once and
goes on without it.

Cost (it must stay under 2% of the `fast` preset's time, see benchmarks/tensorboard_cost.py):
- importing torch.utils.tensorboard takes ~0.1 s (tensorboard's TensorFlow stubs): `start_import`
  begins it in a thread while the data loads, which is mostly time outside the interpreter lock;
- per-step values are kept in memory and written every `STEP_FLUSH` steps, one event per step
  holding both values, so a step pays for appending two numbers, and a GPU is synchronised once
  per flush rather than every step;
- the pictures are drawn with PIL (milliseconds), not matplotlib (whose import alone costs more
  than the budget), and the mistakes are picked with NumPy (torch's threads cost more than the
  work for 10,000 x 10 logits).
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .runs import TENSORBOARD_DIR

if TYPE_CHECKING:
    from .config import Config


STEP_FLUSH = 50       # steps kept in memory between writes
MISTAKES = 16         # most confident mistakes shown
_warned = False       # the "not installed" warning is given once per process


def start_import() -> None:
    """Begin importing torch.utils.tensorboard in a background thread (fit() calls it first thing).
    `tensorboard_log` then finds it imported, or waits for the rest; a failure is reported there."""
    def load():
        try:
            import torch.utils.tensorboard  # noqa: F401
        except Exception:  # ImportError without tensorboard: tensorboard_log says so once
            pass

    threading.Thread(target=load, name="cnnlab-import-tensorboard", daemon=True).start()


def _survives_write_errors(method):
    """TensorBoard's events are a view of the run, not the run: a write that fails (a full disk, a
    read-only folder; the writer thread raises it on the next call) becomes one warning, the log goes
    quiet and training goes on. The run's own files then meet the same fault at the next save and
    stop it with the proper line (exit 4)."""

    @functools.wraps(method)
    def guarded(self: "TensorBoardLog", *args, **kwargs):
        if self.failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            self.failed = True
            self._steps.clear()
            self.log(f"warning: TensorBoard logs stopped: cannot write to {self.folder} ({exc.strerror or exc}); "
                     "training goes on")
            return None

    return guarded


class TensorBoardLog:
    """Writes one run's events; `step`, `epoch` and `finish` are called by `fit()`."""

    def __init__(self, writer, config: "Config", log=print):
        self.writer = writer
        self.config = config
        self.log = log
        self.folder = getattr(writer, "log_dir", TENSORBOARD_DIR)
        self.failed = False  # a write failed: the log is off for the rest of the run (one warning)
        self._steps: list[tuple[int, torch.Tensor, float, float]] = []  # (step, loss, lr, wall time)

    @_survives_write_errors
    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """After optimizer step `step` (1-based): its loss (a detached scalar tensor) and learning rate."""
        self._steps.append((step, loss, lr, time.time()))
        if len(self._steps) >= STEP_FLUSH:
            self._flush_steps()

    def _flush_steps(self) -> None:
        if not self._steps:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        losses = torch.stack([loss.float() for _, loss, _, _ in self._steps]).tolist()  # one device sync
        for (step, _, lr, wall), loss in zip(self._steps, losses):
            # what add_scalar writes, both values in one event (add_scalar would write two)
            values = [Summary.Value(tag="step/loss", simple_value=loss), Summary.Value(tag="step/lr", simple_value=lr)]
            self.writer.file_writer.add_summary(Summary(value=values), step, wall)
        self._steps.clear()

    @_survives_write_errors
    def epoch(self, metrics: dict[str, Any]) -> None:
        """One epoch's metrics (a metrics.jsonl line), plotted against the epoch number."""
        self._flush_steps()
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()  # a TensorBoard that is watching shows each epoch as it ends

    @_survives_write_errors
    def finish(self, metrics: dict[str, Any], evaluation: dict[str, Any], images: torch.Tensor, labels: torch.Tensor,
               logits: torch.Tensor, classes: list[str]) -> None:
        """The end of a completed run: HParams with the final metrics, confusion matrix, mistakes, config.

        `evaluation` is `compute_metrics`' result for the test split (`images`, `labels`, `logits`)."""
        self._flush_steps()
        self._write_hparams(metrics)
        step = int(metrics.get("step", 0))
        self.writer.add_image("test/confusion_matrix", confusion_picture(evaluation["confusion"], classes), step,
                              dataformats="HWC")
        self.writer.add_image("test/most_confident_mistakes", mistakes_picture(images, labels, logits, classes), step,
                              dataformats="HWC")
        self.writer.add_text("config", "```\n" + json.dumps(self.config.to_dict(), indent=2) + "\n```", step)

    def _write_hparams(self, metrics: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        final = {f"hparam/{key}": float(metrics[key]) for key in
                 ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "elapsed_seconds")
                 if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])}
        experiment, start, end = hparams(hyperparameters(self.config), final)
        for summary in (experiment, start, end):  # add_hparams would start a second run in a sub-folder
            self.writer.file_writer.add_summary(summary)
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, int(metrics.get("epoch", 0)))

    @_survives_write_errors
    def close(self) -> None:
        try:
            self._flush_steps()
        finally:
            self.writer.close()


def hyperparameters(config: "Config") -> dict[str, Any]:
    """The settings shown in the HParams view: preset, dataset, every training setting, the layer spec."""
    values: dict[str, Any] = {"preset": config.preset or "custom", "data.dataset": config.data.dataset}
    if config.data.image_size is not None:
        values["data.image_size"] = config.data.image_size
    for key, value in config.to_dict()["train"].items():
        if isinstance(value, (bool, int, float, str)):
            values[f"train.{key}"] = value
    values["model"] = json.dumps(config.model, separators=(",", ":"))
    return values


@contextmanager
def tensorboard_log(run_dir: str | Path, config: "Config", start_step: int = 0, enabled: bool = True,
                    log=print) -> Iterator[TensorBoardLog | None]:
    """A `TensorBoardLog` writing to RUN/tb/ (None when off or when tensorboard is not installed).

    Resuming after step `start_step` purges the events the interrupted run wrote after it (TensorBoard
    hides them), so a redone step is not plotted twice. Closed (all events on disk) when the block ends,
    however it ends.
    """
    global _warned

    if not enabled:
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard is an extra; torch's module raises ImportError without it
        if not _warned:
            log(f"warning: no TensorBoard logs: tensorboard cannot be imported ({exc}); "
                "install it (pip install tensorboard) or turn the logs off with --no-tensorboard")
            _warned = True
        yield None
        return
    # a large queue: a flush of STEP_FLUSH steps never waits for the writer thread
    # steps are numbered from 1: a run resumed after step s logs s + 1 first
    try:
        writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None,
                               max_queue=1000)
    except OSError as exc:  # a read-only or full disk: the run's own files say so at their first save
        log(f"warning: no TensorBoard logs: cannot write to {Path(run_dir) / TENSORBOARD_DIR} ({exc.strerror or exc})")
        yield None
        return
    logger = TensorBoardLog(writer, config, log)
    try:
        yield logger
    finally:
        logger.close()


# ---------------------------------------------------------------------------------------------
# Pictures (HWC uint8 arrays), drawn with PIL
# ---------------------------------------------------------------------------------------------

def confusion_picture(confusion: list[list[int]], classes: list[str]) -> np.ndarray:
    """The confusion matrix as a heatmap with counts: rows true class, columns predicted class.

    Cells are shaded by the share of their row (the true class), so a weak class shows even when
    classes differ in size."""
    from PIL import Image, ImageDraw

    matrix = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    cell = 34 if n <= 20 else max(6, 680 // max(n, 1))
    label_width = 8 + 6 * min(12, max((len(c) for c in classes), default=1))
    top = 30
    width, height = label_width + n * cell + 10, top + label_width + n * cell + 10
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((label_width, 4), "true class (rows) vs predicted class (columns)", fill="black")
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    for r in range(n):
        for c in range(n):
            x, y = label_width + c * cell, top + label_width + r * cell
            shade = int(255 * (1 - 0.85 * share[r, c]))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(220, 220, 220))
            if n <= 20 and matrix[r, c]:
                draw.text((x + 3, y + cell // 2 - 5), str(matrix[r, c]), fill="white" if share[r, c] > 0.5 else "black")
    if n <= 40:
        for i, name in enumerate(classes):
            draw.text((4, top + label_width + i * cell + cell // 2 - 5), name[:12], fill="black")      # rows
            column = Image.new("RGB", (label_width, cell), "white")                                       # columns, turned
            ImageDraw.Draw(column).text((4, cell // 2 - 5), name[:12], fill="black")
            picture.paste(column.rotate(90, expand=True), (label_width + i * cell, top))
    return np.asarray(picture)


def mistakes_picture(images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: list[str],
                     count: int = MISTAKES, columns: int = 8) -> np.ndarray:
    """The test images most confidently misclassified, each captioned 'true -> predicted confidence'."""
    from PIL import Image, ImageDraw

    scores = logits.float().cpu().numpy()
    predicted = scores.argmax(1)
    wrong = np.flatnonzero(predicted != labels.cpu().numpy())
    shifted = np.exp(scores[wrong] - scores[wrong].max(1, keepdims=True))
    confidence = np.zeros(len(scores))
    confidence[wrong] = 1.0 / shifted.sum(1)  # the softmax of the predicted (largest) logit
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    if len(order) == 0:
        picture = Image.new("RGB", (320, 40), "white")
        ImageDraw.Draw(picture).text((8, 14), f"no mistakes on {len(labels):,} test images", fill="black")
        return np.asarray(picture)
    side = max(56, images.shape[-1])  # small images are scaled up so that digits can be seen
    caption = 26
    columns = min(columns, len(order))
    rows = math.ceil(len(order) / columns)
    picture = Image.new("RGB", (columns * (side + 6) + 6, rows * (side + caption + 6) + 6), "white")
    draw = ImageDraw.Draw(picture)
    for slot, index in enumerate(order.tolist()):
        array = images[index].cpu().numpy()  # (C, H, W) uint8
        tile = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
        tile = tile.convert("RGB").resize((side, side), Image.NEAREST)
        x = 6 + (slot % columns) * (side + 6)
        y = 6 + (slot // columns) * (side + caption + 6)
        picture.paste(tile, (x, y))
        draw.text((x, y + side + 1), f"true {classes[int(labels[index])][:8]}", fill="black")
        draw.text((x, y + side + 13), f"{classes[int(predicted[index])][:6]} {100 * confidence[index]:.0f}%",
                  fill=(178, 34, 34))
    return np.asarray(picture)
