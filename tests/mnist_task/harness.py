"""How the tests run the configured task, the MNIST task, on a few batches of its own data: a synthetic MNIST in the
real IDX format (a bright 6x6 block at one of 10 places over noise: easy to learn), read-only, and the settings that
make it 8 training batches of 64.

A user who replaces the task replaces this file (and the rest of mnist_task/): `test_task` returns the overrides and the
environment that run their task on a few batches of their data. The conformance suite runs on it.
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from support import Task

N_TRAIN, N_TEST = 640, 200
IMAGE_FILES = {True: "train-images-idx3-ubyte", False: "t10k-images-idx3-ubyte"}
LABEL_FILES = {True: "train-labels-idx1-ubyte", False: "t10k-labels-idx1-ubyte"}
SMALL = ("data.val_size=128", "data.batch_size=64", "data.eval_batch_size=100")  # 8 training batches of 64


@contextmanager
def test_task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Task]:
    root = write_synthetic_mnist(tmp_path_factory.mktemp("synthetic_mnist"))
    with read_only(root):
        yield Task("mnist", (f"data.data_dir={root}", *SMALL), {"MNIST_ROOT": str(root)})


test_task.__test__ = False  # a factory, not a test


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 28x28 images whose class is a bright 6x6 block at one of 10 places, over noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=generator)]
    images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
    for k in range(10):
        row, col = 3 + 12 * (k // 5), 1 + 5 * (k % 5)
        images[labels == k, row : row + 6, col : col + 6] = 255
    return images, labels


def write_idx_images(path: Path, images: torch.Tensor) -> None:
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, rows, cols) + images.numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    path.write_bytes(struct.pack(">II", 0x00000801, len(labels)) + labels.to(torch.uint8).numpy().tobytes())


def write_synthetic_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for train, (n, seed) in {True: (N_TRAIN, 1), False: (N_TEST, 2)}.items():
        images, labels = synthetic_digits(n, seed)
        write_idx_images(raw / IMAGE_FILES[train], images)
        write_idx_labels(raw / LABEL_FILES[train], labels)
    return root


@contextmanager
def read_only(root: Path) -> Iterator[None]:
    """Read-only while the tests run: proves the task writes nothing into its data directory. Writable again at the
    end, so that pytest can remove it with its other temporary directories."""
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    root.chmod(0o555)
    try:
        yield
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
