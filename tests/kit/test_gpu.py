"""On a CUDA GPU (issue 9, part C): every precision and network trains and tests there, and the master-copy plugin equals
autocast to the bit as on CPU. Skipped where torch sees no CUDA GPU (CI); `scripts/run_on_gpu.sh` runs them, with the
figures, on a lent GPU machine. (The MNIST task's resident data on the GPU: mnist_task/test_mnist_module.py.)"""

from __future__ import annotations

import pytest
import torch
from support import load

from mnist_precision.cli.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (issue 9, part C)")

PRECISIONS = ["32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "16-master", "bf16-master"]
ON_GPU = ["trainer=gpu", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


@pytest.mark.parametrize("net", ["quadrants_mlp", "quadrants_cnn"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_and_network_fits_and_tests_on_cuda(make_config, precision, net):
    optimizer = "optimizer=sgd" if precision == "16-true" else "optimizer=adam"  # pure float16 Adam diverges by design
    metrics = train(make_config(*ON_GPU, f"precision={precision}", f"net={net}", optimizer))
    assert 0 <= metrics["test/acc"] <= 1 and torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))


def test_masters_equal_autocast_weights_bit_for_bit_on_cuda(make_config, tmp_path):
    train(make_config(*ON_GPU, "precision=16-mixed", output_dir=tmp_path / "autocast"))
    train(make_config(*ON_GPU, "precision=16-master", output_dir=tmp_path / "master"))
    weights = load(tmp_path / "autocast/checkpoints/last.ckpt")["state_dict"]
    masters = load(tmp_path / "master/checkpoints/last.ckpt")["MasterCopyPrecision"]["masters"]
    assert all(torch.equal(weights[name], masters[name]) for name in masters)
