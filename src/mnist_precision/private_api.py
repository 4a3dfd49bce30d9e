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


# The callback hooks Lightning calls on every training step, through `_call_callback_hooks`.
TRAINING_STEP_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
    "on_train_batch_end",
)


def skip_inherited_step_hooks(callbacks: list[L.Callback]) -> None:
    """Stop Lightning calling each training-step hook a callback inherits unchanged from `Callback` (which does nothing).

    Lightning calls every per-step hook of every callback, overridden or not, each with a profiler context whose
    name it formats from the callback's state key: about 3 us per hook for the template's five training callbacks
    on CPU, 6 hooks a step, most of them empty (measured; README, Performance). Its dispatcher
    (`trainer/call.py`, `_call_callback_hooks`) skips a hook attribute that is not callable, so an instance attribute
    of None hides the inherited no-op. A hook a callback's class overrides, at any depth, or that is set on the
    instance itself, is left alone. There is
    no public switch for this (torchtnt's loop does it itself: it calls only the hooks a callback overrides).
    """
    for callback in callbacks:
        for name in TRAINING_STEP_HOOKS:
            if name not in vars(callback) and getattr(type(callback), name) is getattr(L.Callback, name):
                setattr(callback, name, None)


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Tensor:
    """GradScaler's inf/NaN flag from `scaler.unscale_(optimizer)`, summed over devices, left on the device.

    GradScaler keeps it private and reads it the same way in `step()`. Reading it on the host would be a
    device sync every step; kept as a tensor, the skipped-step count is one on-device addition.
    """
    return sum(scaler._found_inf_per_device(optimizer).values())
