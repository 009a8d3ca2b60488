"""Data: datasets by name, image folders and archives as in-memory uint8 tensors, plus the preprocessing
stored with each model.

`Dataset` and `load_dataset` are imported on first use: the dataset names (`catalog.py`) are needed by
every command's help, the loaders (torch, PIL) only by those that read data.
"""

__all__ = ["Dataset", "load_dataset"]


def __getattr__(name: str):
    if name in __all__:
        from . import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
