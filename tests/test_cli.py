"""The command line as a user meets it: exit codes, one-line errors, train → evaluate."""

import json
import os
import subprocess
import sys

import pytest

from cnnlab.cli import main

from tests.support.helpers import write_image_folder


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_impossible_layer_exits_2_naming_the_layer(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  - {type: conv, out_channels: 8, kernel_size: 5}\n  - {type: maxpool, kernel_size: 2}\n"
                      "  - {type: conv, out_channels: 8, kernel_size: 5}\n  - {type: maxpool, kernel_size: 2}\n"
                      "  - {type: conv, out_channels: 8, kernel_size: 5}\n  - flatten\n  - {type: linear}\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: layer 5 (conv 5x5, stride 1, padding 0): input 4x4 gives")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow  # Python processes
@pytest.mark.parametrize("in_process_group", [False, True])
def test_the_program_exits_with_mains_code_and_flushed_output(in_process_group):
    """`exit_process` ends a torchrun worker with os._exit (no interpreter shutdown, where gloo can abort):
    the code and everything printed, through a pipe's buffer, still come out."""
    script = ("import sys, importlib; from cnnlab.cli import exit_process\n"
              f"importlib.import_module('cnnlab.runtime').process_group_used = {in_process_group}\n"
              "print('to stdout', end=''); print('to stderr', end='', file=sys.stderr); exit_process(3)\n")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a pipe is by default
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=buffered)
    assert (result.returncode, result.stdout, result.stderr) == (3, "to stdout", "to stderr")
    assert run_cli("no-such-command").returncode == 2  # `python -m cnnlab` goes through the same exit


def test_unknown_key_and_bad_flag_values(tmp_path, capsys):
    assert main(["train", "--set", "train.lrr=0.1"]) == 2
    assert "train.lrr: unknown setting (did you mean 'lr'?)" in capsys.readouterr().err
    assert main(["train", "--set", "nonsense"]) == 2
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no such model file or run folder" in capsys.readouterr().err


@pytest.mark.slow  # `cnnlab train` and `cnnlab evaluate` processes
def test_train_and_evaluate_on_a_folder(tmp_path):
    data = write_image_folder(tmp_path / "images", n_per_class=20, size=16, rgb=True)
    spec = tmp_path / "net.yaml"
    spec.write_text("model:\n  - {type: conv, out_channels: 8, kernel_size: 3, padding: 1}\n  - batchnorm\n  - relu\n"
                    "  - {type: maxpool, kernel_size: 2}\n  - global_avg_pool\n  - {type: linear}\n"
                    "train: {epochs: 4, batch_size: 8, lr: 0.05, optimizer: sgd}\n")
    run = tmp_path / "run"
    result = run_cli("train", "--config", str(spec), "--dataset", f"folder:{data}", "--image-size", "16",
                     "--out", str(run), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "epoch 4/4" in result.stdout and f"run saved to {run}" in result.stdout
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["dataset"] == f"folder:{data}" and saved["train"]["epochs"] == 4
    evaluated = run_cli("evaluate", str(run), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["classes"] == ["horizontal", "square", "vertical"] and metrics["count"] == 6
    table = run_cli("evaluate", str(run))
    assert "confusion matrix" in table.stdout and "precision" in table.stdout


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "train" in out and "evaluate" in out
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nope"])


def test_every_command_has_working_help(capsys):
    from cnnlab.cli import command_modules

    for command in command_modules():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0, command
        assert "usage: cnnlab " + command in capsys.readouterr().out


def test_an_unknown_option_shows_the_commands_usage_and_a_near_option(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["lr-find", "--preset", "tutorial", "--plto", "x.png"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("usage: cnnlab lr-find ")
    assert "cnnlab lr-find: error: unrecognized arguments: --plto (did you mean --plot?) x.png" in err
    with pytest.raises(SystemExit):
        main(["summary", "--preset", "tutorial", "--zzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzz; see cnnlab summary --help" in err and "did you mean" not in err
