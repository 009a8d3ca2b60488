#!/usr/bin/env python3
"""The tutorial's recipe, as it describes it: the baseline every cnnlab preset is compared with.

torchvision MNIST + `ToTensor` + `DataLoader(batch_size=100, shuffle=True)`, the two-conv network,
Adam at lr 0.01, cross-entropy. Plain PyTorch and torchvision, no cnnlab; `benchmarks/run.py`
starts it in its own process and reads the lines it prints:

    python benchmarks/tutorial_baseline.py --root DATA --epochs 2
    EVAL {"epoch": 0.167, "test_accuracy": 0.9712, "seconds": 4.1}    # several times per epoch
    DONE {"images_per_second": 8955.0}

The clock starts at $CNNLAB_BENCH_STARTED (when the parent started this process) and pauses while
the model is evaluated, so "seconds" is the training time to that accuracy, imports and data
loading included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms


class CNN(nn.Module):
    """The tutorial's network: two conv blocks and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2))   # (B, 16, 14, 14)
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2))  # (B, 32, 7, 7)
        self.out = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        return self.out(self.conv2(self.conv1(x)).flatten(1))


def tutorial_baseline(epochs: float, root: str, evals_per_epoch: int, started: float) -> None:
    """Train as the tutorial does; prints EVAL/DONE lines with JSON for the parent."""
    torch.manual_seed(0)
    train_data = torchvision.datasets.MNIST(root, train=True, transform=transforms.ToTensor(), download=False)
    test_data = torchvision.datasets.MNIST(root, train=False, transform=transforms.ToTensor(), download=False)
    loader = DataLoader(train_data, batch_size=100, shuffle=True)
    # Evaluation goes through a DataLoader too, in large batches; its time is taken off the clock.
    test_loader = DataLoader(test_data, batch_size=1000)
    cnn = CNN()
    optimizer = torch.optim.Adam(cnn.parameters(), lr=0.01)
    loss_func = nn.CrossEntropyLoss()

    total_steps = max(1, round(epochs * len(loader)))
    eval_every = max(1, len(loader) // evals_per_epoch)
    paused, train_seconds, seen, step = 0.0, 0.0, 0, 0
    while step < total_steps:
        cnn.train()
        tick = time.perf_counter()
        for images, labels in loader:
            output = cnn(images)
            loss = loss_func(output, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(labels)
            if step % eval_every == 0 or step == total_steps:
                train_seconds += time.perf_counter() - tick
                pause = time.time()
                accuracy = _tutorial_accuracy(cnn, test_loader)
                print("EVAL " + json.dumps({"epoch": round(step / len(loader), 3), "test_accuracy": accuracy,
                                            "seconds": round(pause - started - paused, 3)}), flush=True)
                paused += time.time() - pause
                cnn.train()
                tick = time.perf_counter()
            if step == total_steps:
                break
        train_seconds += time.perf_counter() - tick
    print("DONE " + json.dumps({"images_per_second": seen / max(train_seconds, 1e-9)}), flush=True)


def _tutorial_accuracy(cnn, test_loader) -> float:
    cnn.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in test_loader:
            correct += (cnn(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return correct / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/tutorial_baseline.py", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the folder holding MNIST/raw")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--evals-per-epoch", type=int, default=6)
    args = parser.parse_args(argv)
    started = float(os.environ.get("CNNLAB_BENCH_STARTED", time.time()))
    tutorial_baseline(args.epochs, args.root, args.evals_per_epoch, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
