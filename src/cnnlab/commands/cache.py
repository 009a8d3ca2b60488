"""what cnnlab keeps in its cache (decoded folders, unpacked archives, downloads): list or clear it"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import CnnlabError

DESCRIPTION = ("List or clear cnnlab's cache ($CNNLAB_CACHE, else ~/.cache/cnnlab): decoded image folders, unpacked "
               "archives, downloaded datasets and packaged pretrained weights converted to safetensors (weights). "
               "Everything in it is made again when needed. Unpacked archives are "
               "trimmed to CNNLAB_CACHE_MAX_GB (default 20) on their own. "
               "Examples: cnnlab cache list   |   cnnlab cache clear archives")

PARTS = ("folders", "archives")  # what `clear` removes by default; downloads are named explicitly


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "clear"], help="list: each part and its size; clear: remove")
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"clear: which parts ({', '.join(PARTS)}, weights, or a download folder's name such as MNIST); "
                             f"default {' and '.join(PARTS)}")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run(args: argparse.Namespace) -> int:
    from ..runtime import cache_root

    root = cache_root()
    entries = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    if args.action == "list":
        if args.parts:
            raise CnnlabError("cnnlab cache list takes no PART")
        total = 0
        for entry in entries:
            size = _size(entry)
            total += size
            count = sum(1 for p in entry.iterdir() if not p.name.startswith(".")) if entry.is_dir() else 1
            print(f"{entry.name:<12} {size / 1e6:>10,.1f} MB  {count:>6} entries")
        print(f"{'total':<12} {total / 1e6:>10,.1f} MB  in {root}")
        return 0
    names = {entry.name for entry in entries}
    wanted = args.parts or [part for part in PARTS if part in names]
    unknown = [part for part in wanted if part not in names and part not in PARTS]
    if unknown or any("/" in part or part in ("", ".", "..") for part in wanted):
        raise CnnlabError(f"cnnlab cache clear: no part {unknown[0] if unknown else wanted[0]!s:.60} in {root} "
                          f"(it holds: {', '.join(sorted(names)) or 'nothing'})")
    freed = 0
    for part in wanted:
        path = root / part
        if path.exists():
            freed += _size(path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"cleared {', '.join(wanted) or 'nothing'} ({freed / 1e6:,.1f} MB) from {root}")
    return 0
