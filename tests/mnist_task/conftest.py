"""The MNIST task's own tests run on the MNIST task (the configured one), on its synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mnist_task.harness import write_synthetic_mnist
from support import Task


@pytest.fixture
def task(configured_task: Task) -> Task:
    return configured_task


@pytest.fixture
def mnist_root(configured_task: Task) -> Path:
    return Path(configured_task.env["MNIST_ROOT"])


@pytest.fixture
def writable_mnist(tmp_path: Path) -> Path:
    """A private synthetic copy that a test may corrupt."""
    return write_synthetic_mnist(tmp_path / "mnist")


def real_mnist_root() -> Path | None:
    root = os.environ.get("MNIST_ROOT")
    return Path(root) if root and (Path(root) / "MNIST" / "raw").is_dir() else None
