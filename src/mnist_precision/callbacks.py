"""Callbacks the template adds to Lightning's: last.ckpt and preemption checkpoints, the non-finite-loss guard,
the loss-scale monitor, epoch throughput, test figures."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid

from mnist_precision.data import NUM_CLASSES, batch_size_of
from mnist_precision.errors import TrainingDiverged


class LastCheckpoint(ModelCheckpoint):
    """Keeps `last.ckpt` current after every epoch, whatever val/acc did: it is what `resume=` continues from.

    Lightning's `save_last=True` writes last.ckpt only in a step where another checkpoint is written,
    so beside a best-by-val/acc callback it goes stale as soon as val/acc stops improving.

    It also writes every `every_n_train_steps` optimizer steps (0: never), which bounds what a SIGKILL
    can lose. (ModelCheckpoint allows either an epoch or a step trigger, not both: the step one is ours.)
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 1, every_n_train_steps: int = 0):
        super().__init__(
            dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
            every_n_epochs=every_n_epochs, enable_version_counter=False,
        )
        self.every_n_steps = every_n_train_steps

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_checkpoint(trainer, self.path)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (SLURM, cloud preemption) or Ctrl-C: finish the current batch, save last.ckpt, stop.

    Lightning already turns SIGTERM into a `SIGTERMException` at the next batch boundary (on every
    DDP rank) and calls `on_exception`; here SIGINT is routed the same way, and the exact state at
    that boundary (loops, data position, RNG, precision plugin) is saved for `resume=`.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.saved_to: str | None = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        self.signal = self.signal or signal.SIGTERM
        last = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint)), None)
        if last is not None and last.dirpath:
            trainer.save_checkpoint(last.path)
            self.saved_to = last.path

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class NonFiniteLossGuard(L.Callback):
    """Stops training at the first inf/NaN loss, before backward and the optimizer can use it."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            precision = trainer.precision
            raise TrainingDiverged(
                f"the training loss is {loss.item()} at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}) with precision={precision}. "
                + _divergence_hint(precision)
            )


def _divergence_hint(precision: str) -> str:
    if precision == "16-true":
        return (
            "Pure float16 weights and optimizer state underflow (Adam's eps=1e-8 is 0 in float16). "
            "Use precision=16-master (FP32 master copy with loss scaling), 16-mixed or bf16-mixed."
        )
    if precision == "bf16-true":
        return "Pure bfloat16 training lost precision; use precision=bf16-mixed or bf16-master."
    return "Lower the learning rate (optimizer.lr=...), add gradient clipping (trainer.gradient_clip_val=1.0), or check the inputs."


class LossScaleMonitor(L.Callback):
    """Logs `precision/loss_scale` (any precision plugin with a GradScaler) and `precision/skipped_steps`.

    Only on logging steps: reading the scale is a device sync.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or (trainer.global_step % trainer.log_every_n_steps and not trainer.is_last_batch):
            return
        pl_module.log("precision/loss_scale", scaler.get_scale(), on_step=True, on_epoch=False)
        if hasattr(trainer.precision_plugin, "skipped_steps"):
            pl_module.log("precision/skipped_steps", float(trainer.precision_plugin.skipped_steps), on_step=True, on_epoch=False)


class EpochThroughput(L.Callback):
    """Logs training samples/s once per epoch.

    Lightning's ThroughputMonitor synchronises CUDA after every batch, which costs more than a
    whole step of the small models here; one sync per epoch measures the same thing for free.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._samples = 0
        self._running = False
        self.history: list[tuple[int, float]] = []  # (samples, seconds) per epoch, for mnist-bench

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start, self._samples, self._running = time.perf_counter(), 0, True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._samples += batch_size_of(batch)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)  # validation time is not training throughput

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)

    def _stop(self, pl_module: L.LightningModule) -> None:
        if not self._running or self._samples == 0:
            return
        synchronize(pl_module.device)
        self._running = False
        elapsed = time.perf_counter() - self._start
        self.history.append((self._samples, elapsed))
        world_size = pl_module.trainer.world_size
        pl_module.log("throughput/samples_per_sec", self._samples * world_size / elapsed, on_epoch=True, rank_zero_only=True)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a wall-clock reading means what it says (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TestFigures(L.Callback):
    """At test time, logs to TensorBoard a grid of test predictions and the confusion matrix.

    The grid holds the first test images and, in its second half, the first mistakes found
    anywhere in the test set, framed in red (at 99 % accuracy the first images are all right).
    """

    def __init__(self, num_images: int = 64) -> None:
        self.num_images = num_images
        self.confusion = MulticlassConfusionMatrix(NUM_CLASSES)
        self.first: list[Tensor] = []
        self.mistakes: list[list[Tensor]] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()
        self.first, self.mistakes = [], []

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        preds, labels, images = outputs["preds"], outputs["labels"], batch[0]
        self.confusion.update(preds, labels)
        half = self.num_images // 2
        if not self.first:
            self.first = [images[:half].float().cpu(), preds[:half].cpu(), labels[:half].cpu()]
        found = sum(len(m[1]) for m in self.mistakes)
        if found < half:
            wrong = (preds != labels).nonzero().squeeze(1)[: half - found]
            self.mistakes.append([images[wrong].float().cpu(), preds[wrong].cpu(), labels[wrong].cpu()])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = self.confusion.compute()  # syncs across ranks
        self._log(trainer, matrix)

    @rank_zero_only
    def _log(self, trainer: L.Trainer, matrix: Tensor) -> None:
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None or not self.first:
            return
        images, preds, labels = (torch.cat(parts) for parts in zip(self.first, *self.mistakes, strict=True))
        step = trainer.global_step
        tensorboard.experiment.add_image("test/predictions", prediction_grid(images, preds, labels), step)
        tensorboard.experiment.add_text("test/predictions", prediction_table(preds, labels), step)
        figure, _ = self.confusion.plot(val=matrix.cpu())
        tensorboard.experiment.add_figure("test/confusion_matrix", figure, step)


def prediction_grid(images: Tensor, preds: Tensor, labels: Tensor) -> Tensor:
    """An RGB grid of the images; each wrong prediction is framed in red."""
    lo, hi = images.amin(), images.amax()
    rgb = ((images - lo) / (hi - lo).clamp_min(1e-6)).expand(-1, 3, -1, -1).clone()
    wrong = preds != labels
    frame = torch.zeros_like(rgb[0, 0], dtype=torch.bool)
    frame[:2, :] = frame[-2:, :] = frame[:, :2] = frame[:, -2:] = True
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    rgb[wrong] = torch.where(frame, red, rgb[wrong])
    return make_grid(rgb, nrow=8, padding=2, pad_value=1.0)


def prediction_table(preds: Tensor, labels: Tensor, columns: int = 8) -> str:
    """The grid's predictions as a Markdown table in the same layout; wrong ones read `pred (true)`."""
    cells = [f"**{p} ({t})**" if p != t else str(p) for p, t in zip(preds.tolist(), labels.tolist(), strict=True)]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    header = "| " + " | ".join(str(c) for c in range(columns)) + " |\n|" + "---|" * columns
    return header + "\n" + "\n".join("| " + " | ".join(row) + " |" for row in rows)
