"""Evaluation: `infer()` returns logits; every metric is computed from them.

`compute_metrics` gives loss, accuracy, per-class precision/recall/F1 and the confusion matrix
(rows: true class, columns: predicted class); `format_metrics` prints them as tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .data.tensors import normalize

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data.preprocess import Preprocessing


@dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated: the one definition used by training, `evaluate`, `report` and `show`.

    Test-time augmentation averages the logits of several views: `tta_flip` adds the mirror image;
    `tta_shift` s adds copies moved s pixels up-left and down-right (reflect-padded), weighted
    1/4 each against 1/2 for the unshifted view, as airbench does.
    """

    tta_flip: bool = False
    tta_shift: int = 0
    batch_size: int = 1000
    channels_last: bool = False

    @classmethod
    def from_train(cls, train: "TrainConfig") -> "EvalSettings":
        """A model's settings follow from its training config: flips at test time only if it trained on them."""
        return cls(tta_flip=bool(train.tta and train.flip), tta_shift=int(train.tta_shift),
                   batch_size=int(train.eval_batch_size), channels_last=bool(train.channels_last))


@torch.inference_mode()
def infer(model: torch.nn.Module, images: torch.Tensor, preprocessing: "Preprocessing",
          settings: EvalSettings = EvalSettings(), device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 images (N, C, H, W), in large batches."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    mean, std = preprocessing.stats(device)
    outputs = []
    use_bf16 = device.type == "cuda"
    for start in range(0, images.shape[0], settings.batch_size):
        x = normalize(images[start:start + settings.batch_size].to(device, non_blocking=True), mean, std,
                      settings.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = _views_logits(model, x, settings.tta_flip)
            if settings.tta_shift:
                s = settings.tta_shift
                h, w = x.shape[-2:]
                padded = torch.nn.functional.pad(x, (s, s, s, s), mode="reflect" if s < min(h, w) else "replicate")
                logits = 0.5 * logits + 0.25 * (_views_logits(model, padded[..., :h, :w], settings.tta_flip)
                                                + _views_logits(model, padded[..., 2 * s:, 2 * s:], settings.tta_flip))
        outputs.append(logits.cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros((0, 0))


def _views_logits(model: torch.nn.Module, x: torch.Tensor, flip: bool) -> torch.Tensor:
    logits = model(x).float()
    return 0.5 * (logits + model(x.flip(3)).float()) if flip else logits


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    index = labels.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    labels = labels.cpu()
    n = len(classes)
    if logits.shape[0] == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "count": 0, "per_class": [], "confusion": [], "classes": classes}
    loss = F.cross_entropy(logits, labels).item()
    predictions = logits.argmax(1)
    confusion = confusion_matrix(predictions, labels, n)
    true_positive = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), torch.zeros_like(predicted))
    recall = torch.where(actual > 0, true_positive / actual.clamp_min(1), torch.zeros_like(actual))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(precision))
    per_class = [{"class": classes[i], "precision": round(precision[i].item(), 6), "recall": round(recall[i].item(), 6),
                  "f1": round(f1[i].item(), 6), "support": int(actual[i].item())} for i in range(n)]
    return {
        "loss": round(loss, 6),
        "accuracy": round((predictions == labels).double().mean().item(), 6),
        "count": int(labels.shape[0]),
        "macro_f1": round(f1.mean().item(), 6),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": classes,
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics as readable tables: summary, per-class metrics, confusion matrix."""
    from .formatting import text_table

    classes = [str(c) for c in metrics["classes"]]
    lines = [f"images     {metrics['count']:,}",
             f"loss       {metrics['loss']:.4f}",
             f"accuracy   {100 * metrics['accuracy']:.2f}%",
             ""]
    per_class = [{"class": str(row["class"]), "precision": f"{100 * row['precision']:.2f}%",
                  "recall": f"{100 * row['recall']:.2f}%", "f1": f"{100 * row['f1']:.2f}%",
                  "support": f"{row['support']:,}"} for row in metrics["per_class"]]
    lines.append(text_table(per_class, right=("precision", "recall", "f1", "support")))
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    # columns are the predicted classes, their names cut to 9 characters so that the matrix stays narrow
    short = list(dict.fromkeys(c[:9] for c in classes))
    short = short if len(short) == len(classes) else [str(i) for i in range(len(classes))]
    matrix = [{"true": name, **{s: str(v) for s, v in zip(short, row)}} for name, row in zip(classes, metrics["confusion"])]
    lines.append(text_table(matrix, right=short, columns=["true", *short]))
    return "\n".join(lines)
