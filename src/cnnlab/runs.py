"""One run folder, opened: the one object that evaluate, report, show, predict, serve, export,
explain, compare and the Python API work from.

A run folder holds (every name is spelled here and nowhere else):

    config.json          the resolved config (dataclasses -> file -> CLI, then saved here)
    model.safetensors    weights + metadata JSON in the header (`checkpoint.py`: the format and this name)
    model.json           the same metadata, readable
    resume.safetensors   optimizer, EMA and random state for `train --resume`
    metrics.jsonl        one line of metrics per epoch
    init.json            what a fine-tuned run started from (`--init`, pretrained backbones)
    split.json           which training images were held out for validation
    tb/                  TensorBoard event files
    report.html          `cnnlab report`
    explorer.html        `cnnlab explorer`
    explain-check.json   `cnnlab explain RUN --check`
    .lock                held by the process training the run (`RunWriter`)

`Run(path)` reads nothing until asked: `history()` and `settings()` read the small JSON files
(compare needs no weights); `model`, `layers`, `classes`, ... load the model file once, checking
metadata and weights against each other before anything large is allocated. A bare model file
(`exported/model.safetensors`) opens the same way, without the run's other files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import FORMAT, MODEL_FILE, load_resume_state, read_metadata, read_weights, save_model, save_resume_state
from .config import Config, DataConfig, config_from_dict, flat_settings, stored_model
from .errors import CnnlabError
from .files import atomic_write_text, read_bytes_bounded, read_json, remove_stale_temp_files
from .layers import CNN, build_model, parse_layers, trace

if TYPE_CHECKING:
    from .evaluate import EvalSettings

MODEL_JSON = "model.json"
RESUME_FILE = "resume.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
INIT_FILE = "init.json"
SPLIT_FILE = "split.json"
TENSORBOARD_DIR = "tb"
REPORT_FILE = "report.html"
EXPLORER_FILE = "explorer.html"
CHECK_FILE = "explain-check.json"


class Run:
    """A run folder (or a model file) and what is stored in it, each part loaded on first use."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dataset: str | None = None,
                 data_root: str | None = None, data: Any = None):
        path = Path(path).expanduser()
        self.given = path
        self.root = path if path.is_dir() or path.suffix != ".safetensors" else path.parent
        self.path = path / MODEL_FILE if path.is_dir() else path  # the model file
        self.device = device
        self.dataset_override, self.data_root = dataset, data_root
        self._data = data
        self._logits: torch.Tensor | None = None
        self._history: list[dict[str, Any]] | None = None
        self.label = self.name  # how tables and legends name it (compare adds the parent folder to twins)

    # -- the files ------------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        """The path of one of the run's files (`Run.file(METRICS_FILE)`), whether or not it exists."""
        return self.root / name

    @property
    def name(self) -> str:
        return self.root.name if self.path.name == MODEL_FILE else self.path.stem

    @property
    def run_dir(self) -> Path:
        return self.root

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics from metrics.jsonl (empty if the run has none; read once)."""
        if self._history is None:
            self._history = read_history(self.root)
        return self._history

    def saved_config(self) -> dict[str, Any]:
        """config.json as saved (a mapping), without loading the model; an error naming a missing file."""
        path = self.file(CONFIG_FILE)
        if not path.is_file():
            raise CnnlabError(f"{self.root}: no {CONFIG_FILE} (is it a cnnlab run folder?)")
        raw = read_json(path, CONFIG_FILE)
        if not isinstance(raw, dict):
            raise CnnlabError(f"{path}: expected a mapping of settings")
        return raw

    def settings(self) -> dict[str, Any]:
        """config.json flattened to `section.key` settings (what compare lines up)."""
        return flat_settings(self.saved_config())

    def final_metrics(self) -> dict[str, Any]:
        """The last epoch's metrics, test values from the last epoch that was evaluated."""
        history = self.history()
        if not history:
            return {}
        final = dict(history[-1])
        tested = [m for m in history if "test_accuracy" in m]
        if tested and "test_accuracy" not in final:
            final.update({k: tested[-1][k] for k in ("test_accuracy", "test_loss")})
        return final

    # -- the model, loaded once -------------------------------------------------------------------

    @cached_property
    def meta(self) -> dict[str, Any]:
        """The raw metadata stored with the weights (validated keys; see `checkpoint.read_metadata`)."""
        if self.given.is_dir() and not self.path.exists():
            if self.file(CONFIG_FILE).exists() and not self.history():
                again = (f"continue it with: cnnlab train --resume {self.root}" if self.file(RESUME_FILE).exists()
                         else "train it again (it stopped before it could save where it was)")
                raise CnnlabError(f"{self.root}: training was interrupted before its first epoch ended, so there is "
                                  f"no model yet (no {MODEL_FILE}); {again}")
        return read_metadata(self.given)

    @cached_property
    def _loaded(self) -> dict[str, Any]:
        return _load(self.path, self.meta, self.device)

    model = property(lambda self: self._loaded["model"], doc="the `CNN`, in eval mode, on `device`")
    layers = property(lambda self: self._loaded["layers"], doc="the parsed layer spec")
    preprocessing = property(lambda self: self._loaded["preprocessing"], doc="decode, resize, normalise")
    classes = property(lambda self: self._loaded["classes"], doc="class names, in output order")
    input_shape = property(lambda self: self._loaded["input_shape"], doc="(C, H, W)")
    config = property(lambda self: self._loaded["config"], doc="the training config (None if not stored)")
    metrics = property(lambda self: _mapping(self.meta.get("metrics")), doc="the saved epoch's metrics")
    versions = property(lambda self: _mapping(self.meta.get("versions")), doc="library versions at saving")

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

    # -- its data and evaluation ----------------------------------------------------------------

    def load_test_data(self, dataset: str | None = None, root: str | None = None, progress: bool = False,
                       limit_per_class: int | None = None):
        """The dataset this model was trained on (or `dataset`), its test split held out as training held
        it out (at most `limit_per_class` images of a class); the classes must match the model's."""
        from .data import load_dataset

        saved = self.config.data if self.config else DataConfig()
        name = dataset or self.dataset
        # --data-root, then the root it was trained with by name, then $CNNLAB_DATA, then where training
        # found it (`make demo` sets CNNLAB_DATA for itself alone), then the cache
        remembered = None if os.environ.get("CNNLAB_DATA") or name != self.dataset else self.meta.get("data_root")
        remembered = remembered if isinstance(remembered, str) and Path(remembered).is_dir() else None
        config = DataConfig(dataset=name, root=root or saved.root or remembered, image_size=self.input_shape[1],
                            channels=self.input_shape[0], test_fraction=saved.test_fraction, val_fraction=0,
                            limit_per_class=limit_per_class)
        data = load_dataset(config, seed=self.config.train.seed if self.config else 0, progress=progress)
        if list(data.classes) != self.classes:
            raise CnnlabError(f"{name}: its classes {data.classes[:5]}... differ from the model's {self.classes[:5]}...")
        return data

    def data(self):
        """The run's dataset (its test split is what evaluate, report and show use), loaded once."""
        if self._data is None:
            self._data = self.load_test_data(self.dataset_override, self.data_root)
        return self._data

    def test_logits(self, images: torch.Tensor | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """Logits for uint8 images (default: the whole test split, computed once) with this model's own
        evaluation settings (test-time augmentation included)."""
        from .evaluate import infer

        if images is not None:
            return infer(self.model, images, self.preprocessing, self.evaluation, device or _device_of(self.model))
        if self._logits is None:
            self._logits = self.test_logits(self.data().test.images, device)
        return self._logits

    def evaluate(self, data=None, device: str | torch.device | None = None) -> dict[str, Any]:
        """Metrics on the test split of `data` (default: the model's own dataset, loaded once)."""
        from .evaluate import compute_metrics

        if data is None:
            data = self.data()
            return compute_metrics(self.test_logits(device=device), data.test.labels, self.classes)
        return compute_metrics(self.test_logits(data.test.images, device), data.test.labels, self.classes)

    def with_model(self, model: torch.nn.Module) -> "Run":
        """The same run with another module in place of its model (a private copy for a server's
        explanations, a re-initialised one for the randomisation check); files and data are shared."""
        import copy

        other = copy.copy(self)
        other.__dict__["_loaded"] = {**self._loaded, "model": model}
        return other

    @classmethod
    def from_module(cls, model: torch.nn.Module, metadata: dict[str, Any], path: str | Path = MODEL_FILE) -> "Run":
        """A `Run` for a model already in memory and the metadata `checkpoint.save_model` would store with it."""
        from .data.preprocess import Preprocessing

        run = cls(path)
        meta = {"format": FORMAT, **metadata}
        run.__dict__["meta"] = meta
        run.__dict__["_loaded"] = {
            "model": model.eval(), "layers": parse_layers(meta["layers"]),
            "preprocessing": Preprocessing.from_dict(meta["preprocessing"]),
            "classes": [str(c) for c in meta["classes"]],
            "input_shape": tuple(int(v) for v in meta["input_shape"]), "config": _stored_config(meta)}
        return run


def open_run(path: str | Path, device: str | torch.device = "cpu", dataset: str | None = None,
             data_root: str | None = None, data: Any = None) -> Run:
    """Open a run folder or a model file and load its model now (so a bad file fails here, once)."""
    run = Run(path, device, dataset, data_root, data)
    run.model  # noqa: B018 - loads and checks it now: a bad file fails here, with its name
    return run


def _load(path: Path, meta: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """Rebuild the model from its layer spec, load the weights and check that both agree."""
    from .data.preprocess import Preprocessing

    layers, shape, classes = stored_model(path, meta)  # checked before anything is allocated
    try:
        model: CNN = build_model(layers, shape, len(classes))
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
    model.load_state_dict(read_weights(path, model.state_dict()))
    model.eval()
    return {"model": model.to(device), "layers": layers, "preprocessing": prep, "classes": classes,
            "input_shape": shape, "config": config}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _stored_config(meta: dict[str, Any]) -> Config | None:
    raw = meta.get("config")
    if not isinstance(raw, dict):
        return None
    return config_from_dict({**raw, "model": raw.get("model") or meta["layers"]})


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


MAX_HISTORY_BYTES = 256 << 20  # a line is ~300 bytes an epoch: a larger file is not a run's history


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl as a list of per-epoch dicts; damaged lines are skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    text = read_bytes_bounded(path, MAX_HISTORY_BYTES, METRICS_FILE).decode("utf-8", errors="replace")
    history = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line must not hide the rest of the history
        if isinstance(item, dict) and "epoch" in item:
            history.append(item)
    return history


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was trained with (its config.json), for `train --resume`."""
    return config_from_dict(Run(run_dir).saved_config())


# -- making a new run folder ------------------------------------------------------------------------

def new_run_dir(preset: str | None) -> Path:
    """runs/<date>-<time>-<preset>, numbered when that name is taken."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{preset or 'custom'}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def check_writable(run_dir: Path) -> None:
    """Make the folder and prove a file can be written there, before any work is done (a full disk
    exits 4, as it does at an epoch's save)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        try:
            probe.write_bytes(b"0" * 1024)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise CnnlabError(f"run folder {run_dir} is not writable ({exc.strerror or exc})"
                          + ("; free some space or choose another --out" if full else ""),
                          exit_code=4 if full else 2) from None


# -- the one writer of a run folder ----------------------------------------------------------------

LOCK_FILE = ".lock"  # held (fcntl) by the process writing the run; the kernel drops it when that process dies
# What makes a folder a run: any of these replaced by a new run would lose the old one (and `--overwrite`
# removes them all, so no report, explorer or explanation check of the old model stays beside the new one).
RUN_FILES = (CONFIG_FILE, MODEL_FILE, MODEL_JSON, RESUME_FILE, METRICS_FILE, INIT_FILE, SPLIT_FILE, TENSORBOARD_DIR,
             REPORT_FILE, EXPLORER_FILE, CHECK_FILE)


def existing_run_files(run_dir: Path) -> list[str]:
    """The run files already in `run_dir` (none for a new or empty folder)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()] if run_dir.is_dir() else []


def refuse_existing_run(run_dir: Path, overwrite: bool) -> None:
    """A new run's `--out` that already holds a run is refused, touching nothing, unless `overwrite`;
    one being written by another process is refused either way."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise CnnlabError(f"run folder {run_dir} is being written by another cnnlab process ({holder}); "
                          "wait for it to end, or choose another --out")
    _refuse_run_files(run_dir, overwrite)


def _refuse_run_files(run_dir: Path, overwrite: bool) -> None:
    found = existing_run_files(run_dir)
    if found and not overwrite:
        resumable = f"continue it with: cnnlab train --resume {run_dir}, " if RESUME_FILE in found else ""
        raise CnnlabError(f"--out {run_dir} already holds a run ({', '.join(found[:4])}); {resumable}choose another "
                          "--out, or replace it with --overwrite")


def lock_holder(run_dir: Path) -> str | None:
    """'process PID' when a live process holds `run_dir`'s lock, else None. Reads only."""
    import fcntl

    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no writer (or a folder we cannot read, which the write checks report)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe_holder(fd)
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return None


def _describe_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").split()
    except OSError:
        text = []
    return f"process {text[0]}" if text else "a process that has not written its pid yet"


class RunWriter:
    """The one writer of a run folder while it trains: it holds the folder's lock (a second writer, or a
    resume of a live run, is refused naming the process), replaces an old run only when told to, and
    writes every file of the run atomically (`files.py`).

        with RunWriter(run_dir, resume=False, overwrite=False) as writer:
            writer.write_config(config.to_dict()); writer.write_model(model, metadata); ...
    """

    def __init__(self, root: Path, resume: bool = False, overwrite: bool = False):
        self.root, self.resume, self.overwrite = Path(root), resume, overwrite
        self._fd: int | None = None

    def __enter__(self) -> "RunWriter":
        import fcntl

        if not self.resume:
            refuse_existing_run(self.root, self.overwrite)
        check_writable(self.root)
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CnnlabError(f"run folder {self.root}: cannot create its lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe_holder(fd)
            os.close(fd)
            what = "resumed" if self.resume else "written"
            raise CnnlabError(f"run folder {self.root} cannot be {what}: another cnnlab process ({holder}) is "
                              "training it now; wait for it to end, or stop it first") from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the pid; only the message naming the holder is poorer
        try:
            if not self.resume:
                # again under the lock: a run that ended between the first look and the lock is not replaced
                _refuse_run_files(self.root, self.overwrite)
                if self.overwrite:
                    self._clear()
            remove_stale_temp_files(self.root)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a new writer)
            self._fd = None

    def _clear(self) -> None:
        """`--overwrite`: the old run's files go, so nothing of it (old TensorBoard events) mixes with the new."""
        for name in existing_run_files(self.root):
            path = self.root / name
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as exc:
                raise CnnlabError(f"--overwrite: cannot remove {path} ({exc.strerror or exc})") from None

    # -- the files --------------------------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.root / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    def write_split(self, split: Any) -> None:
        atomic_write_text(self.root / SPLIT_FILE, json.dumps(split) + "\n")

    def write_model(self, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
        save_model(self.root / MODEL_FILE, model, metadata)

    def write_history(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.root / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history))

    def write_resume(self, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None, info: dict[str, Any],
                     model_state: dict[str, torch.Tensor], rng: dict[str, torch.Tensor] | None = None) -> None:
        save_resume_state(self.root / RESUME_FILE, optimizer, ema, info, model_state, rng)

    def write_init(self, start: dict[str, Any]) -> None:
        """How a run started from loaded weights (`finetune.Start`), needed again to resume it."""
        atomic_write_text(self.root / INIT_FILE, json.dumps(start, indent=2) + "\n")

    def has_resume(self) -> bool:
        return (self.root / RESUME_FILE).exists()

    def read_model_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The saved model file's weights, checked against `model` (`checkpoint.read_weights`)."""
        return read_weights(self.root / MODEL_FILE, model.state_dict())


def read_resume(run_dir: str | Path):
    """(path, (optimizer state, EMA tensors, model tensors, info)) of a run's resume file, checked
    (`checkpoint.load_resume_state`: its checksum, its structure)."""
    path = Path(run_dir) / RESUME_FILE
    if not path.exists():
        raise CnnlabError(f"{run_dir}: nothing to resume (no {RESUME_FILE}; did the first epoch finish?)")
    return path, load_resume_state(path)


def read_init(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's init.json (how it started from loaded weights), or None where it has none; a bounded read."""
    from .files import read_bytes_bounded

    path = Path(run_dir) / INIT_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(read_bytes_bounded(path, 16 << 20, "init.json"))
    except (OSError, ValueError) as exc:
        raise CnnlabError(f"{path}: cannot read how this run started ({str(exc)[:100]}); it is needed to resume a run "
                          "that started from train.init") from None
    if not isinstance(raw, dict):
        raise CnnlabError(f"{path}: expected a JSON object")
    return raw


def remove_if_unused(run_dir: Path) -> None:
    """Remove a folder a failed start created, if nothing but its lock file is in it."""
    try:
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:
        pass


def check_free_space(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse now rather than after an epoch's work when one epoch's files cannot fit: the model twice
    (deliverable + resume), optimizer state (up to 2 tensors per weight), a temporary copy while renaming."""
    needed = 6 * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (1 << 20)
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return
    if free < needed:
        raise CnnlabError(f"run folder {run_dir}: only {free / 1e6:.1f} MB free, a checkpoint needs about "
                          f"{needed / 1e6:.1f} MB; free some space or choose another --out", exit_code=4)


__all__ = ["CHECK_FILE", "CONFIG_FILE", "EXPLORER_FILE", "INIT_FILE", "LOCK_FILE", "METRICS_FILE", "MODEL_FILE", "MODEL_JSON", "REPORT_FILE",
           "RESUME_FILE", "SPLIT_FILE", "TENSORBOARD_DIR", "Run", "RunWriter", "load_run_config", "new_run_dir",
           "open_run", "read_history", "read_init"]
