"""train a CNN (a preset, a config file, MNIST or a folder of images)"""

from __future__ import annotations

import argparse
import os
import textwrap

from ..errors import CnnlabError

DESCRIPTION = "Train a CNN. Example: cnnlab train --preset tutorial --epochs 2"

DATASET_HELP = ("{names}, or folder:PATH (a folder, .zip, .tar.gz or .tgz with one sub-folder of images per class); "
                "named ones are downloaded into the cache when missing and the machine has internet")
DATA_ROOT_HELP = ("folder holding named datasets in torchvision's layout (MNIST/raw, cifar-10-batches-py, ...; "
                  "default: $CNNLAB_DATA, then the cache ~/.cache/cnnlab)")
SET_METAVAR = "SECTION.KEY=VALUE"
LIMIT_HELP = ("use at most N images of each class in every split (a seeded draw): try a recipe small first "
              "(data.limit_per_class)")


def field_help(cls, name: str) -> str:
    """A flag's help: the config field's docstring (argparse formats help with %: a literal % is doubled)."""
    from ..config import field_help as docstring

    return docstring(cls, name).replace("%", "%%")


def add_data_arguments(parser: argparse.ArgumentParser, dataset_help: str | None = None) -> None:
    """--dataset and --data-root, as train, evaluate and lr-find take them."""
    from ..data.catalog import DATASET_NAMES

    parser.add_argument("--dataset", help=dataset_help or DATASET_HELP.format(names=", ".join(DATASET_NAMES)))
    parser.add_argument("--data-root", help=DATA_ROOT_HELP)
    parser.add_argument("--limit-per-class", type=int, metavar="N", help=LIMIT_HELP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import OPTIMIZERS, PRECISIONS, DataConfig, TrainConfig, settings_help
    from ..presets import PRESETS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the settings list keeps its lines
    parser.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                        help=f"architecture + recipe: {', '.join(PRESETS)} (listed below). Without one: "
                             "'default' for the named datasets; for a folder of colour photos, 'photos' (ImageNet's "
                             "EfficientNet-Lite0, when cnnlab[pretrained] is installed); for grey images or with "
                             "--scratch, a network and recipe fitted to what is in it; said in one line when training starts")
    parser.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON file with model/data/train settings")
    add_data_arguments(parser)
    parser.add_argument("--image-size", type=int, help=field_help(DataConfig, "image_size"))
    parser.add_argument("--epochs", type=float, help=field_help(TrainConfig, "epochs"))
    parser.add_argument("--batch-size", type=int, help=field_help(TrainConfig, "batch_size"))
    parser.add_argument("--lr", type=float, help=field_help(TrainConfig, "lr"))
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help=field_help(TrainConfig, "optimizer"))
    parser.add_argument("--seed", type=int, help=field_help(TrainConfig, "seed"))
    parser.add_argument("--device", help=field_help(TrainConfig, "device"))
    parser.add_argument("--threads", type=int, help=field_help(TrainConfig, "threads"))
    parser.add_argument("--compile", action="store_true", default=None, help=field_help(TrainConfig, "compile"))
    parser.add_argument("--precision", choices=PRECISIONS, help=field_help(TrainConfig, "precision"))
    parser.add_argument("--set", action="append", default=[], metavar=SET_METAVAR,
                        help="any other setting, e.g. --set train.shift=2 --set train.schedule=onecycle "
                             "--set model.3.out_channels=64 (layers numbered as `cnnlab summary` numbers them; "
                             "all the settings below)")
    # The epilog is printed as it is (argparse %-formats only help strings and text with "%(prog)").
    width = max(len(name) for name in PRESETS)
    listing = "\n".join(textwrap.fill(p["description"], 100, initial_indent=f"  {name:<{width}}  ",
                                       subsequent_indent=" " * (width + 4)) for name, p in PRESETS.items())
    parser.epilog = f"presets:\n{listing}\n\n{settings_help()}"
    parser.add_argument("--out", metavar="RUN_DIR", help="run folder (default: a new timestamped folder under runs/)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out replace the run already in that folder (its files are removed first); "
                             "without it such an --out is refused")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run after its last completed epoch")
    parser.add_argument("--init", metavar="RUN_OR_FILE",
                        help="start from a trained model's weights (fine-tuning): its layers, input size and recipe unless "
                             "--preset/--config say otherwise; other classes get a new last layer")
    parser.add_argument("--freeze", metavar="N|features",
                        help="keep the first N layers (as `cnnlab summary` numbers them) or all features fixed")
    parser.add_argument("--scratch", action="store_true",
                        help="a colour folder with no preset: train a network from scratch (fitted to the folder) "
                             "instead of starting from ImageNet's pretrained weights (the photos preset)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, one line per epoch")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files (RUN/tb/)")


def overrides(args: argparse.Namespace) -> dict[str, dict]:
    """`resolve_config`'s overrides from the train flags in `args` (other commands, lr-find, define only
    some of them); `--set` items win over the named flags."""
    from ..config import parse_overrides

    def flag(name: str):
        return getattr(args, name, None)

    sections = parse_overrides(flag("set") or [])
    train = {name: flag(name) for name in ("epochs", "batch_size", "lr", "optimizer", "seed", "device", "threads",
                                           "compile", "precision", "init", "freeze")}
    train["tensorboard"] = False if flag("no_tensorboard") else None
    data = {"dataset": flag("dataset"), "root": flag("data_root"), "image_size": flag("image_size"),
            "limit_per_class": flag("limit_per_class")}
    return {"train": {**train, **sections["train"]}, "data": {**data, **sections["data"]}, "model": sections["model"]}


def chosen_preset(args: argparse.Namespace) -> str | None:
    """--preset, else for a folder with nothing else chosen the pretrained `photos` preset where it applies (said in
    one line, with how to train from scratch instead)."""
    from ..config import folder_path
    from ..recipes import folder_default

    dataset = args.dataset or ""
    if args.preset or args.config or args.init or folder_path(dataset) is None:
        if args.scratch:
            raise CnnlabError("--scratch chooses the network for a folder with no --preset, --config or --init")
        return args.preset
    if args.scratch:
        return None
    preset, line = folder_default(dataset)
    if line and int(os.environ.get("RANK", "0")) == 0:
        print(line)
    return preset


def run(args: argparse.Namespace) -> int:
    from ..config import resolve_config
    from ..runs import load_run_config
    from ..training import fit

    if args.resume:
        config = load_run_config(args.resume)
        for name in ("preset", "config", "dataset", "batch_size", "lr", "optimizer", "seed", "out", "init", "freeze",
                     "limit_per_class", "scratch", "overwrite"):
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
        config = resolve_config(chosen_preset(args), args.config, overrides(args))
        out = args.out
    result = fit(config, out, resume=bool(args.resume), progress=not args.no_progress, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        metrics = result["metrics"]
        if "test_accuracy" in metrics:
            epochs = result["epochs"]
            kept = f" (the model of epoch {metrics['best_epoch']})" if "best_epoch" in metrics else ""
            print(f"test accuracy {100 * metrics['test_accuracy']:.2f}%{kept} after {epochs:g} "
                  f"epoch{'' if epochs == 1 else 's'}, {result['seconds']:.1f}s")
        print(f"run saved to {result['run_dir']}")
        print(f"next: cnnlab evaluate {result['run_dir']}   |   cnnlab report {result['run_dir']}")
    return 0
