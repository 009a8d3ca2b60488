"""The `cnnlab` command: one subcommand per task.

Each subcommand is a module of `cnnlab.commands` (see its docstring): adding a command is adding
one file there. This module finds them, builds the parser and runs the chosen one. User mistakes
(`CnnlabError`) print one line and exit non-zero; nothing else is caught.
"""

from __future__ import annotations

import argparse
import ast
import errno
import gc
import importlib
import importlib.util
import os
import pkgutil
import sys

from .errors import CnnlabError


def command_modules() -> dict[str, str]:
    """{command name: module name} of every command in `cnnlab.commands`, in `cnnlab --help` order
    (`commands.ORDER`, then the others alphabetically). Nothing is imported but the package itself."""
    from . import commands

    found = {info.name.replace("_", "-"): f"{commands.__name__}.{info.name}"
             for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_")}
    order = [name for name in commands.ORDER if name in found] + sorted(set(found) - set(commands.ORDER))
    return {name: found[name] for name in order}


def help_line(module_name: str) -> str:
    """The first line of a command module's docstring, read from its source without importing it
    (its imports, FastAPI or matplotlib say, would slow every start)."""
    spec = importlib.util.find_spec(module_name)
    doc = None
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        with open(spec.origin, encoding="utf-8") as source:
            doc = ast.get_docstring(ast.parse(source.read(), spec.origin))
    else:  # not a source file (compiled only, or made in memory): import it
        doc = importlib.import_module(module_name).__doc__
    return (doc or "").strip().split("\n")[0]


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser. Only the `selected` command's module is imported; its sub-parser alone gets
    arguments (the others show their help line in `cnnlab --help`)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="cnnlab",
        description="Learn, train, inspect and ship convolutional neural networks that classify images.",
        epilog="Start with: cnnlab train --preset tutorial   (then: cnnlab summary --preset tutorial)")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in command_modules().items():
        if name != selected:
            sub.add_parser(name, help=help_line(module_name))
            continue
        module = importlib.import_module(module_name)
        help_text = (module.__doc__ or "").strip().split("\n")[0]
        command = sub.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text))
        module.add_arguments(command)
        command.set_defaults(handler=module.run, command_parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage and a near option, not the top-level usage
        _unknown_arguments(getattr(args, "command_parser", None) or parser, extra)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the handler below, not at exit
        return code
    except CnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        from .files import FULL, write_error

        if exc.errno not in (*FULL, errno.EPIPE, errno.EROFS):
            raise  # anything else is a bug: keep its traceback
        # A write the command did not guard (stdout into a full disk or a closed pipe, most often):
        # one line, and stdout silenced so that Python's exit does not fail on the same buffer again.
        _silence_stdout()
        error = write_error(exc.filename or "standard output", exc)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a test's capture): nothing to silence
        pass


def _unknown_arguments(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    import difflib

    options = [option for action in parser._actions for option in action.option_strings]
    hints = [f"{word} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(word.split("=")[0], options, 1, 0.75))
             else word for word in extra]
    parser.error(f"unrecognized arguments: {' '.join(hints)}; see {parser.prog} --help")


def run() -> None:
    """The `cnnlab` program (console script and `python -m cnnlab`)."""
    exit_process(main())


def exit_process(code: int) -> None:
    """Exit with `code`; a torchrun worker skips the interpreter's shutdown.

    DistributedDataParallel keeps the gloo process group alive to the end (destroy_process_group cannot
    free it), and a gloo thread that releases its last tensors while Python shuts down needs the GIL and
    aborts the process ("terminate called without an active exception", SIGABRT), about one run in ten
    on a loaded machine. Everything is written and flushed by now, so ending the process here is safe.
    """
    train = sys.modules.get("cnnlab.runtime")
    if train is not None and train.process_group_used:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # Python's shutdown collects garbage, walking the hundreds of thousands of objects that importing
    # torch made: 0.2-0.3 s of `fast`'s 5 s. Frozen objects are skipped by the collector; everything
    # is still closed and freed as usual.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
