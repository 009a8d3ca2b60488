"""Helpers for the reliability tests: run the real `cnnlab` command, and check a run folder file by file.

`check_run_folder` is the definition of "nothing in the run folder is corrupt": every file there
must load with the same code cnnlab itself uses, and the files must agree on the epoch they hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.support.helpers import write_image_folder

# A network small enough that an epoch on the pattern folder takes a fraction of a second.
TINY_MODEL = [{"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1}, "relu",
              {"type": "maxpool", "kernel_size": 2}, "flatten", {"type": "linear"}]


def cnnlab_env(**extra: str) -> dict[str, str]:
    """The environment for a `cnnlab` subprocess: offline, unbuffered, one thread, loopback only."""
    env = dict(os.environ)
    env.update({"CNNLAB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"})
    env.update(extra)
    return env


def run_cnnlab(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True,
                          env=env or cnnlab_env(), timeout=timeout)


def start_cnnlab(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or cnnlab_env(), **kwargs)


def pattern_folder(root: Path, n_per_class: int = 60) -> Path:
    """Three classes of 12x12 pattern images as PNG/JPEG files (from tests/support/helpers.py)."""
    if not root.exists():
        write_image_folder(root, n_per_class=n_per_class, size=12)
    return root


def write_config(path: Path, dataset: str, epochs: float, **train) -> Path:
    settings = {"epochs": epochs, "batch_size": 10, "lr": 0.01, "optimizer": "adam", "schedule": "constant",
                "threads": 1, **train}
    data = {"dataset": dataset, **({"image_size": 12} if dataset.startswith("folder:") else {})}
    path.write_text(json.dumps({"model": TINY_MODEL, "data": data, "train": settings}))
    return path


def one_error_line(stderr: str) -> str:
    """The `error: ...` line of a failed command; fails the test on a traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def check_run_folder(run_dir: Path) -> dict:
    """Load every file of a run folder as cnnlab would; return {'epoch': .., 'temp_files': [...]}.

    Hidden `.NAME.XXXX.tmp` files are atomic_write_bytes' temporaries: a kill -9 mid-write may
    leave one (the target file itself is untouched); the next run removes them. Anything else
    that does not load is corruption and fails the test.
    """
    from cnnlab.checkpoint import load_resume_state
    from cnnlab.runs import open_run
    from cnnlab.config import config_from_dict

    temp_files, epochs = [], {}
    for path in sorted(run_dir.iterdir()):
        name = path.name
        if name.startswith(".") and name.endswith(".tmp"):
            temp_files.append(name)
        elif name == "config.json":
            config_from_dict(json.loads(path.read_text()))
        elif name == "model.json":
            epochs["model.json"] = json.loads(path.read_text())["epoch"]
        elif name == "model.safetensors":
            epochs["model.safetensors"] = open_run(path).epoch
        elif name == "resume.safetensors":
            optimizer_state, _, weights, info = load_resume_state(path)
            assert weights and optimizer_state["state"], f"{path}: empty resume state"
            epochs["resume.safetensors"] = info["epoch"]
        elif name == ".lock":
            pass  # the writer's lock (runs.RunWriter): the kernel dropped it with its process
        elif name == "tb" and path.is_dir():
            pass  # TensorBoard's append-only event logs: its reader skips a record torn by a kill
        elif name == "split.json":
            assert isinstance(json.loads(path.read_text()), dict), f"{path}: not a JSON object"
        elif name == "metrics.jsonl":
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            assert [m["epoch"] for m in lines] == list(range(1, len(lines) + 1)), lines
            epochs["metrics.jsonl"] = len(lines)
        else:
            raise AssertionError(f"{path}: unexpected file in a run folder")
    # resume.safetensors is written last: every other file holds its epoch or a later one.
    if "resume.safetensors" in epochs:
        others = [v for k, v in epochs.items() if k != "resume.safetensors"]
        assert all(v >= epochs["resume.safetensors"] for v in others), epochs
    if "model.safetensors" in epochs and "model.json" in epochs:
        assert epochs["model.json"] in (epochs["model.safetensors"], epochs["model.safetensors"] - 1), epochs
    return {"epoch": epochs.get("resume.safetensors", 0), "epochs": epochs, "temp_files": temp_files}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
