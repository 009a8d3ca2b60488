"""The `cnnlab` command: one subcommand per task.

`train` and `evaluate` live here. The other subcommands live in their own modules, each with
`add_arguments(parser)` and `run(args) -> int`, listed in `COMMANDS`; adding a command means
adding a module and one line there. User mistakes (`CnnlabError`) print one line and exit
non-zero; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from .errors import CnnlabError

# name -> (module, one-line help); each module defines add_arguments(parser) and run(args).
COMMANDS = {
    "summary": ("cnnlab.summarize", "layer-by-layer table: output-size formula, shapes, parameters, MACs, receptive field"),
    "show": ("cnnlab.visualize.cli", "pictures: samples, convolve, filters, feature-maps, curves, confusion, mistakes"),
    "report": ("cnnlab.report", "a self-contained HTML report of a run"),
    "explorer": ("cnnlab.commands.explorer", "the network explorer (feature maps, receptive fields, cell arithmetic) as one offline HTML file"),
    "predict": ("cnnlab.predict", "classify image files with a trained model"),
    "explain": ("cnnlab.explain", "which pixels made the model decide: Grad-CAM, saliency, integrated gradients, occlusion"),
    "export": ("cnnlab.export", "export a model to ONNX or torch.export (.pt2), checked against the original"),
    "serve": ("cnnlab.serve", "HTTP API and a drawing page for a trained model"),
    "bench": ("cnnlab.bench", "run the side-by-side training/inference benchmark (benchmarks/run.py of a checkout)"),
    "compare": ("cnnlab.comparison", "runs side by side: differing settings, final metrics, times; curves overlaid (--html)"),
    "lr-find": ("cnnlab.lr_range", "learning-rate range test: loss against an exponentially rising lr, a suggested lr"),
    "tune": ("cnnlab.tuning", "hyper-parameter search with Optuna over a SPACE.yaml; several processes or machines"),
}


DATASET_HELP = ("{names}, or folder:PATH (a folder, .zip, .tar.gz or .tgz with one sub-folder of images per class); "
                "named ones are downloaded into the cache when missing and the machine has internet")
DATA_ROOT_HELP = ("folder holding named datasets in torchvision's layout (MNIST/raw, cifar-10-batches-py, ...; "
                  "default: $CNNLAB_DATA, then the cache ~/.cache/cnnlab)")


def _help(cls, name: str) -> str:
    """A flag's help: the config field's docstring (argparse formats help with %%: a literal % is doubled)."""
    from .config import field_help

    return field_help(cls, name).replace("%", "%%")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from .data.catalog import DATASET_NAMES

    parser.add_argument("--dataset", help=DATASET_HELP.format(names=", ".join(DATASET_NAMES)))
    parser.add_argument("--data-root", help=DATA_ROOT_HELP)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import OPTIMIZERS, PRECISIONS, DataConfig, TrainConfig, settings_help
    from .presets import PRESETS

    presets = "; ".join(f"{name}: {p['description']}" for name, p in PRESETS.items()).replace("%", "%%")
    parser.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help=f"architecture + recipe ({presets})")
    parser.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON file with model/data/train settings")
    _add_data_arguments(parser)
    parser.add_argument("--image-size", type=int, help=_help(DataConfig, "image_size"))
    parser.add_argument("--epochs", type=float, help=_help(TrainConfig, "epochs"))
    parser.add_argument("--batch-size", type=int, help=_help(TrainConfig, "batch_size"))
    parser.add_argument("--lr", type=float, help=_help(TrainConfig, "lr"))
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help=_help(TrainConfig, "optimizer"))
    parser.add_argument("--seed", type=int, help=_help(TrainConfig, "seed"))
    parser.add_argument("--device", help=_help(TrainConfig, "device"))
    parser.add_argument("--threads", type=int, help=_help(TrainConfig, "threads"))
    parser.add_argument("--compile", action="store_true", default=None, help=_help(TrainConfig, "compile"))
    parser.add_argument("--precision", choices=PRECISIONS, help=_help(TrainConfig, "precision"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other setting, e.g. --set train.shift=2 --set train.schedule=onecycle (all of them below)")
    parser.epilog = settings_help().replace("%", "%%")
    parser.add_argument("--out", metavar="RUN_DIR", help="run folder (default: a new timestamped folder under runs/)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run after its last completed epoch")
    parser.add_argument("--init", metavar="RUN_OR_FILE",
                        help="start from a trained model's weights (fine-tuning): its layers, input size and recipe unless "
                             "--preset/--config say otherwise; other classes get a new last layer")
    parser.add_argument("--freeze", metavar="N|features",
                        help="keep the first N layers (as `cnnlab summary` numbers them) or all features fixed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, one line per epoch")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files (RUN/tb/)")


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    """The config overrides of the train flags in `args` (other commands may define only some of them)."""
    import yaml

    def flag(name: str):
        return getattr(args, name, None)

    train = {name: flag(name) for name in ("epochs", "batch_size", "lr", "optimizer", "seed", "device", "threads",
                                           "compile", "precision", "init", "freeze")}
    train["tensorboard"] = False if flag("no_tensorboard") else None
    data = {"dataset": flag("dataset"), "root": flag("data_root"), "image_size": flag("image_size")}
    sections = {"train": train, "data": data}
    for item in flag("set") or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in sections or not name:
            raise CnnlabError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION train or data")
        try:
            sections[section][name] = yaml.safe_load(value) if value else value
        except yaml.YAMLError:  # not YAML (control characters, an open bracket): the text itself, checked later
            sections[section][name] = value
    return sections


def run_train(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .runs import load_run_config
    from .training import fit

    if args.resume:
        config = load_run_config(args.resume)
        for name in ("preset", "config", "dataset", "batch_size", "lr", "optimizer", "seed", "out", "init", "freeze"):
            if getattr(args, name) not in (None, False):
                raise CnnlabError(f"--{name.replace('_', '-')} cannot change when resuming; "
                                  "the run's own config.json is used (only --epochs, --device, --threads and --precision may)")
        if args.epochs is not None:
            config.train.epochs = args.epochs
        if args.device:
            config.train.device = args.device
        if args.threads is not None:
            config.train.threads = args.threads
        if args.precision:
            config.train.precision = args.precision
        if args.no_tensorboard:
            config.train.tensorboard = False
        if args.data_root:
            config.data.root = args.data_root
        config.train.__post_init__()  # the changed values get the same checks as in a new run
        out = args.resume
    else:
        config = resolve_config(args.preset, args.config, _overrides(args))
        out = args.out
    result = fit(config, out, resume=bool(args.resume), progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        metrics = result["metrics"]
        if "test_accuracy" in metrics:
            print(f"test accuracy {100 * metrics['test_accuracy']:.2f}% after {metrics['epoch']} epoch(s), "
                  f"{result['seconds']:.1f}s")
        print(f"run saved to {result['run_dir']}")
        print(f"next: cnnlab evaluate {result['run_dir']}   |   cnnlab report {result['run_dir']}")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_DIR|MODEL", help="a run folder or a model .safetensors file")
    _add_data_arguments(parser)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run_evaluate(args: argparse.Namespace) -> int:
    from .runs import open_run
    from .evaluate import format_metrics
    from .runtime import resolve_device

    bundle = open_run(args.model, resolve_device(args.device))
    data = bundle.load_test_data(args.dataset, args.data_root)
    metrics = bundle.evaluate(data)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.model} on the {data.name} test split")
        print(format_metrics(metrics))
    return 0


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser. Only the `selected` command's module is imported (the others' imports,
    FastAPI or matplotlib say, would slow every start); its sub-parser alone gets arguments."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="cnnlab",
        description="Learn, train, inspect and ship convolutional neural networks that classify images.",
        epilog="Start with: cnnlab train --preset tutorial   (then: cnnlab summary --preset tutorial)")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a CNN (a preset, a config file, MNIST or a folder of images)",
                           description="Train a CNN. Example: cnnlab train --preset tutorial --epochs 2",
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # the settings list keeps its lines
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
    evaluate = sub.add_parser("evaluate", help="loss, accuracy, per-class metrics and confusion matrix of a model",
                              description="Evaluate a trained model on its dataset's test split.")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)
    for name, (module_name, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue  # that part of cnnlab is not installed
        if name != selected:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text))
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


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
    sys.exit(code)


if __name__ == "__main__":
    run()
