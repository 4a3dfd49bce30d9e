"""What the machinery guarantees for any LightningModule, none of it about the task: the builder adds these to every
run (`apply`). The FP32 loss and FP32 metric states under half precisions are the precision plugins' (precision.py).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def apply(trainer: L.Trainer, model: L.LightningModule) -> None:
    trainer.callbacks.append(RandomState())
    if hasattr(trainer.precision_plugin, "skipped_last_step"):
        hold_schedule_on_skipped_steps(model, trainer.precision_plugin)


class RandomState(L.Callback):
    """torch's RNG state (and CUDA's) in every checkpoint, and back on resume: Lightning saves neither, and whatever
    draws random numbers in training (dropout, a DataLoader's shuffle) must draw the same ones after a resume for the
    run to continue exactly. Only torch's generators: their states are tensors, loadable with `weights_only=True`.

    Restored before the data loaders are made, as the state was when the saved run went on (a DataLoader draws its
    epoch's shuffle from it when iterated). A state saved mid-epoch is restored once more just before training
    resumes: a resumed run makes and restores its loader there, and a loader may draw from the RNG as it does
    (torchdata's StatefulDataLoader does, twice), where the uninterrupted run went straight on to its next batch.
    """

    def __init__(self) -> None:
        self._mid_epoch_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = self._current()
        trainer = getattr(self, "_trainer", None)
        state["mid_epoch"] = trainer is not None and trainer.fit_loop.epoch_loop.batch_progress.current.processed < trainer.num_training_batches
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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


def hold_schedule_on_skipped_steps(model: L.LightningModule, plugin: Any) -> None:
    """A step the loss scaler skipped (inf/NaN gradients) changed no weights: a scheduler that steps with every
    optimizer step stays where it is. Wraps the module's `lr_scheduler_step` (Lightning's hook for stepping a
    scheduler, overridden or not); reading the flag is a device sync, so only for schedulers with interval "step"."""
    step = model.lr_scheduler_step

    def lr_scheduler_step(scheduler: Any, metric: Any) -> None:
        steps_with_optimizer = any(config.scheduler is scheduler and config.interval == "step" for config in model.trainer.lr_scheduler_configs)
        if steps_with_optimizer and plugin.skipped_last_step:
            return
        step(scheduler, metric)

    model.lr_scheduler_step = lr_scheduler_step
