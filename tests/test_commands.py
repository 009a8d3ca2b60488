"""The `cnnlab` commands: one module each in `cnnlab.commands`, found by `cli.py`; argparse nowhere
else; one `--set` parser that reaches every section, layers included."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import cnnlab.commands
from cnnlab.cli import build_parser, command_modules, help_line, main
from cnnlab.config import parse_overrides, resolve_config, split_settings
from cnnlab.errors import CnnlabError

SRC = Path(cnnlab.commands.__file__).resolve().parents[1]  # src/cnnlab


def command_module_names() -> list[str]:
    return [info.name for info in pkgutil.iter_modules(cnnlab.commands.__path__) if not info.name.startswith("_")]


def test_every_command_module_has_help_arguments_and_run():
    names = command_module_names()
    assert {"train", "evaluate", "summary", "show", "report", "predict", "explain", "export", "serve", "bench",
            "compare", "lr_find", "tune"} <= set(names)
    for name in names:
        module = importlib.import_module(f"cnnlab.commands.{name}")
        assert module.__doc__ and module.__doc__.strip().splitlines()[0], name
        assert callable(module.add_arguments) and callable(module.run), name
        assert help_line(module.__name__) == module.__doc__.strip().splitlines()[0]


def test_help_lists_every_command_with_its_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert exit_info.value.code == 0
    for name, module_name in command_modules().items():
        assert f" {name} " in out and " ".join(help_line(module_name).split()) in out, name
    assert list(command_modules())[:3] == ["train", "evaluate", "summary"]  # cnnlab.commands.ORDER


FAKE_COMMAND = '''"""say hello (a command added as one file)"""

DESCRIPTION = "Say hello to NAME."


def add_arguments(parser):
    parser.add_argument("name")


def run(args):
    print(f"hello {args.name}")
    return 7
'''


def test_a_new_module_is_a_new_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "say_hello.py").write_text(FAKE_COMMAND)
    monkeypatch.setattr(cnnlab.commands, "__path__", [*cnnlab.commands.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "cnnlab.commands.say_hello", raising=False)
    try:
        assert command_modules()["say-hello"] == "cnnlab.commands.say_hello"
        assert "say-hello" in build_parser().format_help()
        assert main(["say-hello", "world"]) == 7
        assert capsys.readouterr().out == "hello world\n"
        with pytest.raises(SystemExit):
            main(["say-hello", "--help"])
        assert "Say hello to NAME." in capsys.readouterr().out
    finally:
        sys.modules.pop("cnnlab.commands.say_hello", None)


def test_help_imports_neither_torch_nor_fastapi_nor_matplotlib():
    script = ("import sys\nimport cnnlab.cli\n"
              "try:\n    cnnlab.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'fastapi', 'matplotlib', 'uvicorn', 'optuna') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_argparse_only_in_commands_and_cli():
    users = sorted(path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py") if "argparse" in path.read_text())
    assert users, "the search found nothing: wrong folder?"
    assert [path for path in users if path != "cli.py" and not path.startswith("commands/")] == []


def test_train_help_shows_percent_signs_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "%" in out and "%%" not in out
    assert "model.3.out_channels" in out


def test_set_reaches_layers_and_sections():
    args = build_parser("train").parse_args(["train", "--set", "model.4.out_channels=64", "--set", "train.shift=2",
                                              "--set", "data.val_fraction=0.1", "--lr", "0.5"])
    from cnnlab.commands.train import overrides

    config = resolve_config("tutorial", None, overrides(args))
    assert config.model[3]["out_channels"] == 64 and config.model[0]["out_channels"] == 16
    assert (config.train.shift, config.train.lr, config.data.val_fraction) == (2, 0.5, 0.1)
    nested = resolve_config("resnet-mnist", None, parse_overrides(["model.4.1.out_channels=48"]))
    assert nested.model[3]["layers"][0]["out_channels"] == 48
    assert resolve_config("tutorial").model[3]["out_channels"] == 32  # the preset itself is unchanged


def test_set_values_are_yaml_and_flags_lose_to_set():
    assert parse_overrides(["train.shift=2", "train.schedule=onecycle", "model.1.kernel_size=[3, 3]", "train.compile=true"]) == {
        "train": {"shift": 2, "schedule": "onecycle", "compile": True}, "data": {}, "model": {"1.kernel_size": [3, 3]}}
    from cnnlab.commands.train import overrides

    args = build_parser("train").parse_args(["train", "--lr", "0.5", "--set", "train.lr=0.25"])
    assert overrides(args)["train"]["lr"] == 0.25


@pytest.mark.parametrize("item, message", [
    ("nonsense", "--set 'nonsense': expected SECTION.KEY=VALUE"),
    ("shift=2", "--set 'shift=2': expected SECTION.KEY=VALUE"),
    ("optim.lr=1", "--set 'optim.lr': expected SECTION.NAME with SECTION train, data or model"),
    ("model.99.out_channels=8", "model.99.out_channels: no layer '99' (the model has 8 layers"),
    ("model.3.out_channels=8", "model.3.out_channels: layer 3 (maxpool): unknown key 'out_channels'"),
    ("model.1.2.out_channels=8", "model.1.2.out_channels: layer 1 (conv) has no layers inside it"),
    ("train.lrr=1", "train.lrr: unknown setting (did you mean 'lr'?)"),
])
def test_set_mistakes_name_the_key_in_one_line(item, message, capsys):
    assert main(["train", "--preset", "tutorial", "--set", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_python_settings_use_the_same_names():
    assert split_settings({"model.3.out_channels": 64, "train.lr": 0.1}) == {
        "train": {"lr": 0.1}, "data": {}, "model": {"3.out_channels": 64}}
    with pytest.raises(CnnlabError, match="expected SECTION.NAME"):
        split_settings({"lr": 0.1})


def test_train_out_holding_a_run_needs_overwrite(tmp_path, capsys):
    """`cnnlab train --out RUN` on a finished run: refused (exit 2, the run untouched); `--overwrite` replaces it."""
    from cnnlab.cli import main
    from tests.support.run_folders import pattern_folder, write_config

    folder = pattern_folder(tmp_path / "patterns", n_per_class=10)
    config = write_config(tmp_path / "c.json", f"folder:{folder}", 1, tensorboard=False)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    model = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and (run / "model.safetensors").read_bytes() == model
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "--overwrite cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress", "--seed", "3", "--overwrite"]) == 0
    assert (run / "model.safetensors").read_bytes() != model
