"""Accuracy on the real MNIST (slow: run with `pytest -m slow`; needs MNIST_ROOT)."""

from __future__ import annotations

import pytest
from mnist_task.conftest import real_mnist_root
from support import Task, compose_config

from mnist_precision.cli.train import train
from mnist_precision.kit.errors import TrainingDiverged

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(real_mnist_root() is None, reason="MNIST_ROOT is not set to a directory holding MNIST/raw/"),
]


def train_real(tmp_path_factory, *overrides: str) -> dict[str, float]:
    real = Task("real MNIST", (f"data.data_dir={real_mnist_root()}",))
    return train(compose_config(real, ["trainer.enable_progress_bar=false", *overrides], tmp_path_factory.mktemp("run"), quiet=False))


@pytest.fixture(scope="module")
def mlp_fp32(tmp_path_factory) -> dict[str, float]:
    return train_real(tmp_path_factory, "net=mlp", "trainer.max_epochs=5")


def test_mlp_reaches_97_5_percent_in_5_epochs(mlp_fp32):
    assert mlp_fp32["test/acc"] >= 0.975


def test_paper_cnn_reaches_97_8_percent_in_3_epochs(tmp_path_factory):
    assert train_real(tmp_path_factory, "experiment=paper_cnn")["test/acc"] >= 0.978


def test_convnet_reaches_99_2_percent_in_4_epochs(tmp_path_factory):
    assert train_real(tmp_path_factory, "experiment=convnet")["test/acc"] >= 0.992


def test_16_master_matches_fp32_within_0_3_points(tmp_path_factory, mlp_fp32):
    master = train_real(tmp_path_factory, "net=mlp", "trainer.max_epochs=5", "precision=16-master")
    assert abs(master["test/acc"] - mlp_fp32["test/acc"]) <= 0.003


def test_pure_fp16_with_the_flux_settings_diverges_and_is_stopped(tmp_path_factory):
    with pytest.raises(TrainingDiverged, match="precision=16-true"):
        train_real(tmp_path_factory, "net=mlp", "trainer.max_epochs=5", "precision=16-true", "optimizer=adam", "optimizer.lr=1e-4")


def test_speedrun_reaches_99_percent_in_2_epochs(tmp_path_factory):
    """experiment=speedrun is timed on a GPU (docs/performance.md); its accuracy is checked here, on CPU, with the same config."""
    metrics = train_real(tmp_path_factory, "experiment=speedrun")
    assert metrics["test/acc"] >= 0.99 and metrics["time/fit_seconds"] > 0
