"""Every use of a private Lightning or torch API in the template, in one place, each where no public one exists.

A copied template lives through upgrades of both. `tests/test_private_api.py` checks each function here
against the behaviour it stands for, so an upgrade that changes one fails there, by name, not somewhere deep
in a training run.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


def should_log_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's logged values (every `trainer.log_every_n_steps`).

    Constant within one batch, from `training_step` to `on_train_batch_end`. Calling `self.log()` costs
    0.2-0.7 ms on CPU (README, Performance), up to half a whole MLP step, so the template logs step values only
    on these steps. Lightning's own LearningRateMonitor and ThroughputMonitor read the same property.
    """
    return trainer._logger_connector.should_update_logs


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Tensor:
    """GradScaler's inf/NaN flag from `scaler.unscale_(optimizer)`, summed over devices, left on the device.

    GradScaler keeps it private and reads it the same way in `step()`. Reading it on the host would be a
    device sync every step; kept as a tensor, the skipped-step count is one on-device addition.
    """
    return sum(scaler._found_inf_per_device(optimizer).values())
