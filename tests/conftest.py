"""Shared fixtures: a small synthetic MNIST in the real IDX format, config composition, CLI runners."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_precision.build import compose_training_config

N_TRAIN, N_TEST = 640, 200
IMAGE_FILES = {True: "train-images-idx3-ubyte", False: "t10k-images-idx3-ubyte"}
LABEL_FILES = {True: "train-labels-idx1-ubyte", False: "t10k-labels-idx1-ubyte"}


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 28x28 images whose class is a bright 6x6 block at one of 10 places, over noise: easy to learn."""
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


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only directory holding synthetic MNIST/raw/ IDX files (read-only proves nothing is written)."""
    root = write_synthetic_mnist(tmp_path_factory.mktemp("synthetic_mnist"))
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    root.chmod(0o555)
    yield root
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def writable_mnist(tmp_path: Path) -> Path:
    """A private synthetic copy that a test may corrupt."""
    return write_synthetic_mnist(tmp_path / "mnist")


# Small and fast: 8 training batches of 64 (640 images - 128 for validation), no progress bars.
FAST = [
    "data.val_size=128",
    "data.batch_size=64",
    "data.eval_batch_size=100",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


def compose_config(overrides: list[str], output_dir: Path, mnist_root: Path, fast: bool = True) -> DictConfig:
    """The training config as `mnist-train` composes it, writing into `output_dir` (FAST: small and quiet)."""
    quiet = FAST if fast else ["trainer=cpu", "trainer.enable_progress_bar=false"]
    cfg = compose_training_config([f"data.data_dir={mnist_root}", *quiet, *overrides], output_dir)
    with open_dict(cfg):
        cfg.paths.log_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_config(tmp_path: Path, mnist_root: Path):
    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config(list(overrides), output_dir or tmp_path / "run", mnist_root)

    return make


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(tmp_path: Path, mnist_root: Path):
    """Runs `python -m mnist_precision.<module> ...` in a subprocess from an unrelated working directory."""

    def run(module: str, *args: str, log_dir: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> CliResult:
        env = {**os.environ, "MNIST_ROOT": str(mnist_root), "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", **(env or {})}
        flags = [arg for arg in args if arg.startswith("-")]  # Hydra wants -m before the overrides
        overrides = [arg for arg in args if not arg.startswith("-")]
        argv = [sys.executable, "-m", f"mnist_precision.{module}", *flags, *FAST, f"paths.log_dir={log_dir or tmp_path / 'logs'}", *overrides]
        cwd = tmp_path / "elsewhere"
        cwd.mkdir(exist_ok=True)
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def run_main(tmp_path: Path, mnist_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Calls an entry point's `main()` in this process (cheap: no interpreter start-up); returns its exit status."""

    def run(main, *args: str, fast: bool = True) -> CliResult:
        monkeypatch.setenv("MNIST_ROOT", str(mnist_root))
        monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
        prefix = [*FAST, f"paths.log_dir={tmp_path / 'logs'}"] if fast else []
        flags = [arg for arg in args if arg.startswith("-")]  # Hydra wants -m, --help before the overrides
        monkeypatch.setattr(sys, "argv", ["mnist", *flags, *prefix, *(arg for arg in args if not arg.startswith("-"))])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def real_mnist_root() -> Path | None:
    root = os.environ.get("MNIST_ROOT")
    return Path(root) if root and (Path(root) / "MNIST" / "raw").is_dir() else None


def files_under(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*") if p.is_file()}


def tensorboard_events(run_dir: Path) -> EventAccumulator:
    """A run's TensorBoard directory as TensorBoard reads it: its own EventAccumulator, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of each event of one scalar in a run's TensorBoard directory, read with TensorBoard's own reader."""
    return [(event.step, event.value) for event in tensorboard_events(run_dir).Scalars(tag)]


class TinyRegression(L.LightningModule):
    """A one-layer LightningModule for tests of Lightning's own behaviour, away from MNIST."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_tiny(tmp_path: Path, model: L.LightningModule, callbacks: list[L.Callback], batches: int = 3) -> None:
    """One epoch of `batches` random batches of 4, nothing written but what the callbacks write."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4 * batches, 4)), batch_size=4)
    checkpointing = any(isinstance(callback, L.pytorch.callbacks.ModelCheckpoint) for callback in callbacks)
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=data)
