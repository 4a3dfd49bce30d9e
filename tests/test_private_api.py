"""The private Lightning and torch APIs the template uses (all in `mnist_precision.private_api`) still mean what
the template relies on. When an upgrade breaks one of these tests, fix `private_api.py`, nothing else."""

from __future__ import annotations

import lightning as L
import torch
from conftest import tensorboard_scalars

from mnist_precision.build import build_run
from mnist_precision.private_api import found_inf, should_log_this_step


class RecordLoggingSteps(L.Callback):
    """The optimizer steps that `should_log_this_step` names, on batches that end an accumulation window."""

    def __init__(self) -> None:
        self.named: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and should_log_this_step(trainer):
            self.named.append(trainer.global_step)


def test_should_log_this_step_is_exactly_when_lightning_writes_step_values(make_config, tmp_path):
    """With accumulation, the steps whose train/loss_step reaches TensorBoard are those it names, and no others.
    (Within a window it is also True on the micro-batches before the optimizer step: a harmless extra self.log.)"""
    run = build_run(make_config("trainer.max_epochs=2", "trainer.log_every_n_steps=3", "trainer.accumulate_grad_batches=2"))
    recorder = RecordLoggingSteps()
    run.trainer.callbacks.append(recorder)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    written = [step for step, _ in tensorboard_scalars(tmp_path / "run", "train/loss_step")]
    # Lightning writes a step's values under the optimizer-step count before that step (global_step - 1 at batch end).
    named = [step - 1 for step in recorder.named]
    assert written == named and len(written) >= 2, (written, named)


def test_found_inf_is_grad_scalers_flag_on_the_device():
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for gradient, expected in [(torch.ones(3), 0.0), (torch.tensor([1.0, float("inf"), 1.0]), 1.0)]:
        scaler.scale(parameter.sum()).backward()  # sets the scale up, as in training
        parameter.grad = gradient.clone()
        scaler.unscale_(optimizer)
        flag = found_inf(scaler, optimizer)
        assert isinstance(flag, torch.Tensor) and flag.device == parameter.grad.device and float(flag) == expected
        scaler.step(optimizer)
        scaler.update()
