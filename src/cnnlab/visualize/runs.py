"""A trained run opened once for pictures and reports: its model bundle, its test data and test
logits (loaded on first use) and its training history."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CnnlabError

if TYPE_CHECKING:
    from ..checkpoint import ModelBundle


@dataclass
class RunContext:
    """A trained run opened for pictures and reports; the test data and logits load on first use."""

    path: Path
    bundle: "ModelBundle"
    dataset: str | None = None
    data_root: str | None = None
    _data: Any = None
    _logits: torch.Tensor | None = None
    _history: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    @property
    def meta(self) -> dict[str, Any]:
        return self.bundle.meta

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def name(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def run_dir(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def data(self):
        """The run's dataset (test split used), as `evaluate` loads it."""
        if self._data is None:
            self._data = self.bundle.load_test_data(self.dataset, self.data_root)
        return self._data

    def test_logits(self) -> torch.Tensor:
        """Logits (N, classes) of the whole test split, with the model's own evaluation settings."""
        if self._logits is None:
            self._logits = self.bundle.test_logits(self.data().test.images)
        return self._logits

    def metrics(self) -> dict[str, Any]:
        """Test metrics from `test_logits`: the numbers `cnnlab evaluate` prints for this run."""
        from ..evaluate import compute_metrics

        return compute_metrics(self.test_logits(), self.data().test.labels, self.classes)

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics from metrics.jsonl (empty if the run has none)."""
        if self._history is None:
            self._history = read_history(self.run_dir)
        return self._history


def open_run(path: str | Path, dataset: str | None = None, data_root: str | None = None, data=None) -> RunContext:
    """Load a run folder (or a model file) for pictures; `data` may be given directly (tests, report)."""
    from ..checkpoint import load_model

    return RunContext(Path(path).expanduser(), load_model(path), dataset, data_root, _data=data)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl as a list of per-epoch dicts; damaged lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    history = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line must not hide the rest of the history
        if isinstance(item, dict) and "epoch" in item:
            history.append(item)
    return history


def pick_test_image(context: RunContext, index: int = 0) -> tuple[torch.Tensor, str]:
    """Test image number `index` (uint8 C, H, W) and a caption naming it and its true class."""
    data = context.data()
    if not 0 <= index < len(data.test):
        raise CnnlabError(f"--index {index}: the test split has images 0 to {len(data.test) - 1}")
    return data.test.images[index], f"test image #{index} (true class {context.classes[int(data.test.labels[index])]})"

