"""The datasets cnnlab knows by name, and where torchvision keeps their files (no heavy imports here:
the command line lists the names in its help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class NamedDataset:
    """One dataset cnnlab knows by name, and where torchvision keeps its files."""

    name: str                      # as given to --dataset
    torchvision_class: str         # its class in torchvision.datasets
    folder: str                    # where its files lie under a root ("" = the root itself)
    files: tuple[str, ...]         # the files expected there
    reader: str                    # "idx" (read here), "cifar" or "svhn" (read through torchvision)
    shape: tuple[int, int, int]    # (C, H, W) of its images
    num_classes: int
    preprocess_kind: str           # "digit" (MNIST's own recipe) or "resize"
    classes: tuple[str, ...] = ()  # empty: read from the data (CIFAR's meta file)

    def folder_in(self, root: Path) -> Path:
        return root / self.folder if self.folder else root

    def present_in(self, root: Path) -> bool:
        """All of its files are in `root` (the MNIST family's may be gzipped)."""
        folder = self.folder_in(root)
        if self.reader == "idx":
            return all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in self.files)
        return all((folder / name).is_file() for name in self.files)


_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

# The one list of dataset names: config validation, --help and the errors all read it.
# fashion-mnist and kmnist are 28x28 grey like MNIST but not digits: they are prepared by resizing
# (the identity at 28x28), not by MNIST's digit recipe (cropping to the ink, centring by mass).
NAMED_DATASETS: dict[str, NamedDataset] = {d.name: d for d in (
    NamedDataset("mnist", "MNIST", "MNIST/raw", IDX_FILES, "idx", (1, 28, 28), 10, "digit", DIGITS),
    NamedDataset("fashion-mnist", "FashionMNIST", "FashionMNIST/raw", IDX_FILES, "idx", (1, 28, 28), 10, "resize",
                 ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
    NamedDataset("kmnist", "KMNIST", "KMNIST/raw", IDX_FILES, "idx", (1, 28, 28), 10, "resize",
                 ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
    NamedDataset("cifar10", "CIFAR10", "cifar-10-batches-py", _CIFAR10_FILES, "cifar", (3, 32, 32), 10, "resize"),
    NamedDataset("cifar100", "CIFAR100", "cifar-100-python", ("train", "test", "meta"), "cifar", (3, 32, 32), 100, "resize"),
    NamedDataset("svhn", "SVHN", "", ("train_32x32.mat", "test_32x32.mat"), "svhn", (3, 32, 32), 10, "resize", DIGITS),
)}
DATASET_NAMES = tuple(NAMED_DATASETS)
