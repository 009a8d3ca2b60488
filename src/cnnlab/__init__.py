"""cnnlab: learn, train, inspect and ship convolutional neural networks that classify images.

From Python:

    import cnnlab
    cnnlab.summary("tutorial")                                # the network, layer by layer
    model = cnnlab.train("tutorial", epochs=1, out="runs/t1")  # any setting by name: lr=0.001, ...
    model = cnnlab.load("runs/t1")
    model.predict(["digit.png"], top_k=3)
    model.show("feature-maps", image="digit.png")

`summary`, `train`, `load`, `Model`, `lr_find`, `tune` and `compare` live in `cnnlab.api` and are
imported on first use (PEP 562), so `import cnnlab` is quick and does not import PyTorch. No module
of the package is named like one of these functions (training lives in `cnnlab.training`, the
layer table in `cnnlab.summarize`), so importing a module never hides a function. Mistakes raise
`cnnlab.CnnlabError` with the one-line message the `cnnlab` command prints.
"""

from .errors import CnnlabError

__version__ = "0.1.0"
__all__ = ["CnnlabError", "Model", "compare", "load", "lr_find", "summary", "train", "tune"]

# public name -> the module that defines it, imported on first use
_LAZY = {name: "cnnlab.api" for name in ("summary", "train", "load", "Model", "lr_find", "tune", "compare")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # the next access finds it directly
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
