"""cnnlab: learn, train, inspect and ship convolutional neural networks that classify images.

From Python:

    import cnnlab
    cnnlab.summary("tutorial")                                # the network, layer by layer
    model = cnnlab.train("tutorial", epochs=1, out="runs/t1")  # any setting by name: lr=0.001, ...
    model = cnnlab.load("runs/t1")
    model.predict(["digit.png"], top_k=3)
    model.show("feature-maps", image="digit.png")

`summary`, `train`, `load` and `Model` live in `cnnlab.api` and are imported on first use
(PEP 562), so `import cnnlab` is quick and does not import PyTorch. Mistakes raise
`cnnlab.CnnlabError` with the one-line message the `cnnlab` command prints.
"""

import sys
import types

from .errors import CnnlabError

__version__ = "0.1.0"
__all__ = ["CnnlabError", "Model", "load", "summary", "train"]

# public name -> the module that defines it, imported on first use
_LAZY = {"summary": "cnnlab.api", "train": "cnnlab.api", "load": "cnnlab.api", "Model": "cnnlab.api"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # the next access finds it directly
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps `cnnlab.train` and `cnnlab.summary` the public functions.

    Modules of the same names exist (cnnlab/train.py, cnnlab/summary.py), and importing a
    submodule makes Python bind it as an attribute of its package, which would replace the
    function. For these names that binding is skipped: reach the modules by their full name,
    `from cnnlab.train import fit` or `importlib.import_module("cnnlab.train")`
    (`from cnnlab import train` and `import cnnlab.train as t` give the function).
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
