"""`torchrun -m cnnlab train` with two CPU processes (gloo on 127.0.0.1).

The workers run the real CLI through a small wrapper that, after training, also writes each
rank's own weights, so the test can check that DistributedDataParallel kept the ranks identical
(cnnlab itself writes only from rank 0).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import needs_mnist
from tests.support.run_folders import (TINY_MODEL, check_run_folder, cnnlab_env, final_weights, pattern_folder, run_cnnlab,
                               same_weights, write_config)

pytestmark = [pytest.mark.slow,  # torchrun processes
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="this PyTorch has no gloo backend")]

WORKER = '''
import os, sys
from safetensors.torch import save_file
import importlib
from cnnlab.cli import exit_process, main

models = []
train_module = importlib.import_module("cnnlab.training")
train_one_epoch = train_module.train_one_epoch
def remember_model(state, *args, **kwargs):
    models.append(state.model)
    return train_one_epoch(state, *args, **kwargs)
train_module.train_one_epoch = remember_model

code = main(sys.argv[2:])
if models:
    module = getattr(models[-1], "module", models[-1])
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
              os.path.join(sys.argv[1], "rank%s.safetensors" % os.environ["RANK"]))
exit_process(code)  # as the cnnlab program ends
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, *cli_args: str, env: dict, **popen) -> subprocess.Popen:
    """Two CPU workers on loopback running `cnnlab <cli_args>`; each writes tmp_path/rank<N>.safetensors."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    for old in tmp_path.glob("rank*.safetensors"):
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), str(tmp_path), *cli_args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout}s:\n{stdout}\n{stderr}")
    return process.returncode, stdout, stderr


def rank_weights(tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]


@needs_mnist
def test_two_processes_train_mnist_like_one(tmp_path):
    """Part of an MNIST epoch on 2 ranks: identical weights on both, and the accuracy of 1 process (the
    global batch of 50 is shared, 25 images each: the same batches, the same averaged gradients)."""
    config = tmp_path / "mnist.json"
    config.write_text(json.dumps({"model": TINY_MODEL, "data": {"dataset": "mnist"},
                                  "train": {"epochs": 0.05, "batch_size": 50, "lr": 0.01, "threads": 1,
                                            "eval_batch_size": 2000}}))
    env = cnnlab_env()
    code, stdout, stderr = finish(torchrun(tmp_path, "train", "--config", str(config), "--no-progress",
                                           "--out", str(tmp_path / "two"), env=env))
    assert code == 0, stderr
    assert stdout.count("training custom on mnist") == 1 and "2 processes" in stdout  # rank 0 alone prints
    first, second = rank_weights(tmp_path)
    assert same_weights(first, second), "the two ranks ended with different weights"
    assert same_weights(first, final_weights(tmp_path / "two"))
    check_run_folder(tmp_path / "two")

    single = run_cnnlab("train", "--config", str(config), "--no-progress", "--out", str(tmp_path / "one"), env=env)
    assert single.returncode == 0, single.stderr
    accuracy = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]
                for name in ("one", "two")}
    print(f"\nMNIST, 0.05 epoch (3,000 images): test accuracy 1 process {accuracy['one']:.4f}, 2 processes {accuracy['two']:.4f}")
    assert accuracy["two"] > 0.75 and abs(accuracy["two"] - accuracy["one"]) < 0.005, accuracy
    assert json.loads((tmp_path / "two" / "model.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-torchrun"])
def test_distributed_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path, how):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to torchrun alone
    (as a scheduler sends it; torchrun passes it on) stops both ranks at the same step; `--resume`
    under torchrun then ends with the uninterrupted run's exact weights."""
    env = cnnlab_env(CNNLAB_CACHE=str(tmp_path / "cache"))
    folder = pattern_folder(tmp_path / "patterns", n_per_class=120)
    config = write_config(tmp_path / "config.json", f"folder:{folder}", 6, batch_size=4)  # 60 steps an epoch, 2 images of each batch per rank
    code, _, stderr = finish(torchrun(tmp_path, "train", "--config", str(config), "--no-progress",
                                      "--out", str(tmp_path / "reference"), env=env))
    assert code == 0, stderr
    reference = final_weights(tmp_path / "reference")

    run_dir = tmp_path / "interrupted"
    process = torchrun(tmp_path, "train", "--config", str(config), "--no-progress", "--out", str(run_dir), env=env,
                       start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("epoch 2/") or (not line and process.poll() is not None):
            break
    if how == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(process)
    assert code != 0, "the run was meant to be interrupted"
    errors = sorted({line for line in stderr.splitlines() if line.startswith("error: ")})
    print(f"\ntorchrun after {how}: exit {code}; worker messages: {errors}")
    assert len(errors) == 1, f"the ranks disagree: {errors}"
    state = check_run_folder(run_dir)
    assert 1 <= state["epoch"] < 6, state

    code, stdout, stderr = finish(torchrun(tmp_path, "train", "--resume", str(run_dir), "--no-progress", env=env))
    assert code == 0, stderr
    assert f"resuming {run_dir} " in stdout
    first, second = rank_weights(tmp_path)
    assert same_weights(first, second)
    assert same_weights(final_weights(run_dir), reference), "resumed distributed run differs from the uninterrupted one"
    assert check_run_folder(run_dir)["epoch"] == 6
