"""Where cnnlab keeps what it can make again: downloads, decoded folders, unpacked archives."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$CNNLAB_CACHE, else ~/.cache/cnnlab."""
    return Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab").expanduser()


def downloads_allowed() -> bool:
    """False when CNNLAB_OFFLINE is set (tests set it): nothing may touch the network."""
    return not os.environ.get("CNNLAB_OFFLINE")
