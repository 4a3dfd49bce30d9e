"""What the machinery guarantees for any LightningModule, none of it about the task: the builder adds these to every
run (`apply`). The FP32 loss and FP32 metric states under half precisions are the precision plugins' (precision.py).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from mnist_precision.kit.private_api import batches_processed_this_epoch, metric_update_count, restore_metric_state


def apply(trainer: L.Trainer, model: L.LightningModule, keep_saved_threads: bool = False) -> None:
    trainer.callbacks.append(RandomState(keep_saved_threads))
    trainer.callbacks.append(MetricStates())
    if getattr(trainer.precision_plugin, "scaler", None) is not None:  # 16-mixed, 16-master, bf16-master
        hold = HoldScheduleOnSkippedSteps(model.lr_scheduler_step)
        trainer.callbacks.append(hold)
        model.lr_scheduler_step = hold.step


class RandomState(L.Callback):
    """torch's RNG state (and CUDA's) in every checkpoint, and back on resume: Lightning saves neither, and whatever
    draws random numbers in training (dropout, a DataLoader's shuffle) must draw the same ones after a resume for the
    run to continue exactly. Only torch's generators: their states are tensors, loadable with `weights_only=True`.

    Restored before the data loaders are made, as the state was when the saved run went on (a DataLoader draws its
    epoch's shuffle from it when iterated). A state saved mid-epoch is restored once more just before training
    resumes: a resumed run makes and restores its loader there, and a loader may draw from the RNG as it does
    (torchdata's StatefulDataLoader does, twice), where the uninterrupted run went straight on to its next batch.

    The checkpoint also holds torch's thread count: a reduction split over another number of threads sums in another
    order, so a resume is exact only on as many threads. With `threads=auto` a resumed run takes the saved count.
    """

    def __init__(self, keep_saved_threads: bool = False) -> None:
        self._mid_epoch_state: dict[str, Any] | None = None
        self.keep_saved_threads = keep_saved_threads

    def state_dict(self) -> dict[str, Any]:
        state = {**self._current(), "threads": torch.get_num_threads()}
        trainer = getattr(self, "_trainer", None)
        state["mid_epoch"] = trainer is not None and batches_processed_this_epoch(trainer) < trainer.num_training_batches
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.keep_saved_threads and state_dict.get("threads"):
            torch.set_num_threads(int(state_dict["threads"]))
        self._restore(state_dict)
        self._mid_epoch_state = state_dict if state_dict.get("mid_epoch") else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # whether a save is mid-epoch is the fit loop's to say

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._mid_epoch_state is not None:
            self._restore(self._mid_epoch_state)
            self._mid_epoch_state = None

    @staticmethod
    def _current() -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _restore(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class MetricStates(L.Callback):
    """The running states of the module's torchmetrics metrics in a checkpoint saved mid-epoch, and back when a run
    resumes from it, so the resumed epoch's metrics (an accuracy accumulated over the epoch's batches) count the whole
    epoch, as an uninterrupted run's do. Lightning saves a metric's states only if they are persistent, which
    torchmetrics' are not by default; a task's module stays as it is. Under DDP each process holds its own states and
    rank 0's are saved: a resumed epoch's metric then counts the other ranks' batches from the resume on."""

    def __init__(self) -> None:
        self._saved: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not 0 < batches_processed_this_epoch(trainer) < trainer.num_training_batches:
            return {}  # at an epoch's end the module resets its metrics as the next epoch begins
        return {name: {"state": {key: value.detach().clone() if torch.is_tensor(value) else [v.detach().clone() for v in value]
                                 for key, value in metric.metric_state.items()}, "updates": metric_update_count(metric)}
                for name, metric in trainer.lightning_module.named_modules() if isinstance(metric, Metric)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._saved or not trainer.is_global_zero:
            return
        metrics = dict(pl_module.named_modules())
        for name, saved in self._saved.items():
            if isinstance(metrics.get(name), Metric):
                restore_metric_state(metrics[name], saved["state"], saved["updates"])
        self._saved = {}


class HoldScheduleOnSkippedSteps(L.Callback):
    """A step the loss scaler skipped (inf/NaN gradients) changed no weights: a scheduler that steps with every optimizer
    step stays where it is. It stands in for the module's `lr_scheduler_step` (Lightning's hook for stepping a
    scheduler, the module's own or Lightning's default), and steps only schedulers of interval "step" that follow a
    step the scaler made. Whether it did is a device sync, so it is read only for those schedulers: the master copy's
    flag, or a drop of the loss scale (a dynamic scaler backs off exactly on a skipped step)."""

    def __init__(self, lr_scheduler_step: Any) -> None:
        self.lr_scheduler_step = lr_scheduler_step
        self._trainer: L.Trainer | None = None
        self._scale = 0.0
        self._decided: tuple[int, bool] = (-1, False)  # (global step, skipped) of the last decision

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self._scale = trainer.precision_plugin.scaler.get_scale()  # (a resumed run's, restored by now)

    def step(self, scheduler: Any, metric: Any) -> None:
        trainer = self._trainer
        steps_with_optimizer = trainer is not None and any(
            config.scheduler is scheduler and config.interval == "step" for config in trainer.lr_scheduler_configs)
        if steps_with_optimizer and self._skipped(trainer.precision_plugin):
            return
        self.lr_scheduler_step(scheduler, metric)

    def _skipped(self, plugin: Any) -> bool:
        step = self._trainer.global_step
        if self._decided[0] != step:  # once a step, whatever the number of schedulers
            if hasattr(type(plugin), "skipped_last_step"):
                skipped = plugin.skipped_last_step
            else:
                scale = plugin.scaler.get_scale()
                skipped, self._scale = scale < self._scale, scale
            self._decided = (step, skipped)
        return self._decided[1]
