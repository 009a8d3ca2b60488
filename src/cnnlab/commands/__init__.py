"""The `cnnlab` command's subcommands: one module per command, and the only place (with `cli.py`)
that knows argparse.

A command module `NAME.py` (NAME with '-' as '_': `lr_find.py` is `cnnlab lr-find`) has

- a docstring whose first line is the one-line help `cnnlab --help` shows;
- `DESCRIPTION` (optional): the longer text of `cnnlab NAME --help`;
- `add_arguments(parser)`: its flags, on an `argparse.ArgumentParser`;
- `run(args) -> int`: parse what argparse gave, call the library's typed functions, print; the exit code.

`cli.py` finds the modules with pkgutil and reads their help lines from the source, so only the
command that runs is imported (FastAPI, matplotlib and PyTorch load only for the commands that
need them). Adding a command is adding one file here. Modules whose name starts with `_` are not
commands.
"""

# The order `cnnlab --help` lists the commands in; a command not named here comes after these, alphabetically.
ORDER = ("train", "evaluate", "summary", "show", "report", "explorer", "predict", "explain", "export", "serve", "bench",
         "compare", "lr-find", "tune")
