"""The non-finite-loss guard (`TrainingMonitor`): judges the model's own loss, names the first bad step, stops at
once without a loss scaler, and under one treats a single non-finite loss as the skipped step it is."""

from __future__ import annotations

import subprocess

import lightning as L
import pytest
import torch
from fault_injection import PoisonInputAtSteps
from support import task_command, task_env

from mnist_precision.kit.build import build_run
from mnist_precision.kit.errors import TrainingDiverged

TWO_EPOCHS = ["trainer.max_epochs=2", "trainer.log_every_n_steps=50", "trainer.limit_val_batches=1"]  # 8 steps an epoch


def fit(make_config, *overrides: str, poison: list[int] = ()):
    run = build_run(make_config(*TWO_EPOCHS, *overrides))
    run.trainer.callbacks.append(PoisonInputAtSteps(list(poison)))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return run


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_without_a_loss_scaler_one_non_finite_loss_stops_the_run_naming_its_step(make_config, tmp_path, precision):
    with pytest.raises(TrainingDiverged, match=rf"the training loss is (nan|inf) at step 3 \(epoch 0, batch 3\) with precision={precision}"):
        fit(make_config, f"precision={precision}", poison=[3])
    assert not (tmp_path / "run/checkpoints/last.ckpt").exists()  # the check runs before any checkpoint is written


@pytest.mark.parametrize("precision", ["16-master", "16-mixed"])
def test_under_a_loss_scaler_one_non_finite_loss_is_a_skipped_step(make_config, precision):
    run = fit(make_config, f"precision={precision}", poison=[3])
    assert run.trainer.global_step == 16  # trained on
    if precision == "16-master":
        assert run.trainer.precision_plugin.skipped_steps == 1


def test_under_a_loss_scaler_a_persisting_non_finite_loss_stops_the_run_at_its_first_step(make_config):
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step 2 .*precision=16-master, and stayed inf/NaN for 3 steps in a row"):
        fit(make_config, "precision=16-master", "callbacks.training_monitor.patience=3", poison=[2, 3, 4])


class RecordScaledLosses(L.Callback):
    def __init__(self) -> None:
        self.finite: list[bool] = []

    def on_before_backward(self, trainer, pl_module, loss):  # Lightning passes the loss after scaling
        self.finite.append(bool(torch.isfinite(loss)))


def test_the_guard_judges_the_models_loss_not_the_scaled_one(make_config):
    """A scale of 3e38 makes the scaled loss inf although the model's loss is about 1.4 and every gradient is
    finite (bfloat16 has float32's range): nothing is wrong, and training goes on without a skip (issue 16, point 2)."""
    run = build_run(make_config(*TWO_EPOCHS, "precision=bf16-master", "precision.loss_scale=dynamic", "precision.init_scale=3.0e+38"))
    scaled = RecordScaledLosses()
    run.trainer.callbacks.append(scaled)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert not scaled.finite[0]  # the premise: what the old guard read was inf
    assert run.trainer.global_step == 16 and run.trainer.precision_plugin.skipped_steps == 0


@pytest.mark.slow  # about 14 s: two DDP processes
def test_under_ddp_a_divergence_on_one_rank_stops_every_rank(tmp_path, task):
    """Rank 0 alone sees a non-finite loss; rank 1 must stop too, not wait forever in the next all-reduce."""
    argv = task_command(task, tmp_path / "logs", "trainer=ddp_cpu", "trainer.max_epochs=1",
                        "+callbacks.poison._target_=fault_injection.PoisonInputAtSteps", "+callbacks.poison.steps=[2]", "+callbacks.poison.rank=0")
    done = subprocess.run(argv, cwd=tmp_path, env=task_env(task), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "the training loss is inf at step 2 (epoch 0, batch 2)" in done.stderr or "is nan at step 2" in done.stderr, done.stderr[-3000:]
