"""Data: MNIST and image folders as in-memory uint8 tensors, plus the preprocessing stored with each model."""

from .datasets import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset"]
