"""Shared test set-up: no network, a private cache, MNIST from ../shared/datasets, shared trained runs.

End-to-end tests that need real MNIST skip with a clear reason where the data is absent.
Trained runs are session fixtures so that the suite trains each model once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["CNNLAB_OFFLINE"] = "1"  # tests never touch the network

try:  # no per-example time limit in any property test: a busy machine must not fail a correct test
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("cnnlab", deadline=None)
    _hypothesis_settings.load_profile("cnnlab")
except ImportError:
    pass
_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
if not os.environ.get("CNNLAB_DATA") and (_SHARED / "MNIST" / "raw").is_dir():
    os.environ["CNNLAB_DATA"] = str(_SHARED)


def mnist_root() -> Path | None:
    root = Path(os.environ.get("CNNLAB_DATA", "")) / "MNIST" / "raw"
    return root.parent.parent if root.is_dir() else None


needs_mnist = pytest.mark.skipif(mnist_root() is None, reason="MNIST not found (set CNNLAB_DATA to the folder holding MNIST/raw)")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ["CNNLAB_CACHE"] = str(tmp_path_factory.mktemp("cnnlab-cache"))


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The `default` preset (the `make demo` model) trained once on real MNIST for the whole session."""
    if mnist_root() is None:
        pytest.skip("MNIST not found")
    from cnnlab.config import resolve_config
    from cnnlab.training import fit

    out = tmp_path_factory.mktemp("default-run")
    fit(resolve_config("default"), out, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def trained_mnist_run(default_run) -> Path:
    """A trained MNIST run (alias of `default_run`, kept for tests that just need a good digit model)."""
    return default_run
