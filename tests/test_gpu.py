"""On a CUDA GPU (issue 9, part C): every precision and model trains and tests there, the data stays resident on the
device, and the master-copy plugin equals autocast to the bit as on CPU. Skipped where torch sees no CUDA GPU (CI);
`scripts/run_on_gpu.sh` runs them, with the figures, on a lent GPU machine."""

from __future__ import annotations

import pytest
import torch
from test_train import load

from mnist_precision.build import build_run
from mnist_precision.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (issue 9, part C)")

PRECISIONS = ["32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "16-master", "bf16-master"]
ON_GPU = ["trainer=gpu", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


@pytest.mark.parametrize("model", ["mlp", "cnn", "convnet"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_and_model_fits_and_tests_on_cuda(make_config, precision, model):
    optimizer = "optimizer=sgd" if precision == "16-true" else "optimizer=adam"  # pure float16 Adam diverges by design
    metrics = train(make_config(*ON_GPU, f"precision={precision}", f"model={model}", optimizer))
    assert 0 <= metrics["test/acc"] <= 1 and torch.isfinite(torch.tensor(metrics["test/loss"]))


def test_data_on_device_auto_keeps_the_splits_on_the_gpu(make_config):
    run = build_run(make_config(*ON_GPU, "data.on_device=auto"))
    run.fit()
    assert all(images.is_cuda and targets.is_cuda for images, targets in run.datamodule.splits.values())


def test_masters_equal_autocast_weights_bit_for_bit_on_cuda(make_config, tmp_path):
    train(make_config(*ON_GPU, "precision=16-mixed", output_dir=tmp_path / "autocast"))
    train(make_config(*ON_GPU, "precision=16-master", output_dir=tmp_path / "master"))
    weights = load(tmp_path / "autocast/checkpoints/last.ckpt")["state_dict"]
    masters = load(tmp_path / "master/checkpoints/last.ckpt")["MasterCopyPrecision"]["masters"]
    assert all(torch.equal(weights[name], masters[name]) for name in masters)
