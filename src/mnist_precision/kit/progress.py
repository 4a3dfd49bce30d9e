"""What a run shows while it trains: Lightning's TQDM bar on a terminal, one line per epoch anywhere else."""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
from lightning.pytorch import callbacks as lightning_callbacks

from mnist_precision.kit.private_api import batches_processed_this_epoch
from mnist_precision.kit.results import shown_order

EPOCH_LOG = logging.getLogger("mnist_precision.epochs")


def progress_bar(refresh_rate: int = 50) -> lightning_callbacks.ProgressBar:
    """Lightning's TQDM bar on a terminal; one plain line per epoch when stdout is a file or a pipe (CI, SLURM, nohup),
    where a bar's redraws would write thousands of carriage-return updates."""
    if sys.stdout.isatty():
        return StepLossBar(refresh_rate=refresh_rate)
    return EpochLines()


class StepLossBar(lightning_callbacks.TQDMProgressBar):
    """Lightning's TQDM bar, with the latest logged training loss beside its `prog_bar=True` metrics.

    The training monitor logs that loss without `prog_bar=True`: Lightning converts every progress-bar value to a
    Python number after every step, logged in that step or not, which on a GPU waits for all of the queued work
    (Lightning issue #21232). Here it is read only when the bar redraws (every `refresh_rate` steps).
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.logged_metrics.get("train/loss_step")
        if loss is not None:
            metrics["train/loss_step"] = float(loss)
        return metrics


class EpochLines(lightning_callbacks.ProgressBar):
    """A progress "bar" for logs: after each epoch, one line with the epoch-level values logged with `prog_bar=True`
    (the training monitor's `train/loss_epoch`, and the task's own: the MNIST task's train/acc, val/loss, val/acc),
    training ones first, and how long the epoch took (validation included), through the job's log (console and
    train.log)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._epoch_start = 0.0
        self._from_step = 0  # the global step the line's time and batches count from
        self._resumed_at = 0  # the batch a run resumed mid-epoch went on from (0: from the epoch's start)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch: its line starts here.
        self._epoch_start, self._from_step = time.perf_counter(), trainer.global_step
        self._resumed_at = batches_processed_this_epoch(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The finished epoch's metrics are complete only now: a module's own on_train_epoch_end (where the MNIST module
        # logs train/acc) runs after every callback's.
        self._report(trainer, trainer.current_epoch - 1)
        self._epoch_start, self._from_step, self._resumed_at = time.perf_counter(), trainer.global_step, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, trainer.current_epoch - 1, stopped_after=batches_processed_this_epoch(trainer))

    def _report(self, trainer: L.Trainer, epoch: int, stopped_after: int = 0) -> None:
        """The epoch's line, if it trained since the last one. An epoch a stop cut short (max_steps, max_time) says how
        far it got and shows its training values only: its validation did not run, and the values shown would be the
        previous epoch's."""
        if trainer.global_step == self._from_step or not self._enabled or not trainer.is_global_zero:
            return
        partial = 0 < stopped_after < trainer.num_training_batches
        metrics = {name: value for name, value in trainer.progress_bar_metrics.items() if not (partial and name.startswith("val/"))}
        shown = "  ".join(f"{name} {float(metrics[name]):.4f}" for name in sorted(metrics, key=shown_order))
        total = f"/{trainer.max_epochs}" if trainer.max_steps == -1 and trainer.max_epochs and trainer.max_epochs > 0 else ""
        how = f" (resumed at batch {self._resumed_at})" if self._resumed_at else ""
        if partial:
            how += f" stopped after {stopped_after} of {trainer.num_training_batches} batches"
        EPOCH_LOG.info(f"epoch {epoch + 1}{total}{how}  {shown}  {time.perf_counter() - self._epoch_start:.1f} s")
        self._from_step = trainer.global_step
