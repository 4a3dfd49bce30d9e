"""Every use of a private Lightning, torch or torchmetrics API in the template, in one place, each where no public one exists.

A copied template lives through upgrades of both. `tests/kit/test_private_api.py` checks each function here
against the behaviour it stands for, so an upgrade that changes one fails there, by name, not somewhere deep
in a training run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn
from torchmetrics import Metric

# The normalisation layers the master copy keeps in FP32. torch's public classes share two private bases: BatchNorm1d-3d,
# SyncBatchNorm and the lazy ones derive from _BatchNorm, InstanceNorm1d-3d from _InstanceNorm.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


# torchao's AdamW with full-precision (bfloat16 here) state and stochastically rounded bfloat16 updates (precision=bf16-sr).
# torchao exports only its low-bit AdamWs (AdamW8bit, ...: quantised state) under public names.
TORCHAO_ADAMW = "torchao.optim._AdamW"


def should_log_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's logged values (every `trainer.log_every_n_steps`).

    Constant within one batch, from `training_step` to `on_train_batch_end`. The training monitor reads the step's
    loss on the host, logs it and checks it only on these steps (docs/performance.md: what a `self.log()` costs).
    Lightning's own LearningRateMonitor and ThroughputMonitor read the same property.
    """
    return trainer._logger_connector.should_update_logs


def saves_within_epochs(checkpoint: ModelCheckpoint) -> bool:
    """Whether a ModelCheckpoint saves from its `on_train_batch_end` (`every_n_train_steps` or `train_time_interval`
    set). Lightning keeps both settings private; without them that hook, called every step, checks the trainer's state
    and reads the clock to do nothing."""
    return bool(checkpoint._every_n_train_steps) or checkpoint._train_time_interval is not None


# The hooks of every callback and of the LightningModule that Lightning calls on every training step.
TRAINING_STEP_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
    "on_train_batch_end",
)


def skip_inherited_step_hooks(callbacks: list[L.Callback], model: L.LightningModule) -> None:
    """Stop Lightning calling the training-step hooks that each callback inherits unchanged from `Callback`, and the
    model from `LightningModule`: they do nothing, but Lightning calls all six on every object, every step, each
    through a profiler context with a formatted name (docs/performance.md).

    Lightning's dispatchers (`trainer/call.py`: `_call_callback_hooks`, `_call_lightning_module_hook`) skip a hook
    attribute that is not callable, so an instance attribute of None hides the inherited no-op. A hook that the
    class overrides, at any depth, or that is set on the instance, is left alone. No public switch does this
    (torchtnt's loop does it itself: it calls only the hooks a callback overrides). Callbacks that join later
    (`configure_callbacks`, the tuner's) are called as usual.
    """
    for callback in callbacks:
        _skip_inherited(callback, L.Callback)
    _skip_inherited(model, L.LightningModule)


def _skip_inherited(owner: object, base: type) -> None:
    for name in TRAINING_STEP_HOOKS:
        if name not in vars(owner) and getattr(type(owner), name) is getattr(base, name):
            setattr(owner, name, None)


def batches_processed_this_epoch(trainer: L.Trainer) -> int:
    """The training batches of the current epoch that Lightning has run: its epoch loop's progress tracker, which has no
    public reader."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def run_after_closure(plugin: Precision, model: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
    """What Lightning's precision plugins do between the closure and the optimizer step: the `on_before_optimizer_step`
    hooks, then gradient clipping (`Precision._after_closure`, private). The master copy runs it on its FP32 masters."""
    plugin._after_closure(model, optimizer)


def epochs_trained(checkpoint: dict) -> int:
    """How many epochs a Lightning checkpoint's fit loop has finished training. The checkpoint's `loops` entry is the
    fit loop's private state; Lightning has no public reader for it (`checkpoint["epoch"]` is the epoch it was in)."""
    return checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Tensor:
    """GradScaler's inf/NaN flag from `scaler.unscale_(optimizer)`, summed over devices, left on the device.

    GradScaler keeps it private and reads it the same way in `step()`. Reading it on the host would be a
    device sync every step; kept as a tensor, the skipped-step count is one on-device addition.
    """
    return sum(scaler._found_inf_per_device(optimizer).values())


def metric_update_count(metric: Metric) -> int:
    """How many times a torchmetrics metric was updated since its reset (`Metric._update_count`, private): `compute`
    warns, and its value is undefined, while it is 0. A resumed metric state must carry it."""
    return metric._update_count


def restore_metric_state(metric: Metric, state: dict[str, Any], update_count: int) -> None:
    """Put a metric's states (its `metric_state`, public) back with their update count; its cached result is dropped
    (`Metric._computed`, private), as `Metric.reset` drops it."""
    for name, value in state.items():  # (a tensor state takes the live one's device and dtype: the run's, not the saver's)
        current = getattr(metric, name)
        setattr(metric, name, [v.to(metric.device) for v in value] if isinstance(value, list) else value.to(current.device, current.dtype))
    metric._update_count = update_count
    metric._computed = None
