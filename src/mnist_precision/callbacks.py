"""Callbacks the template adds to Lightning's: last.ckpt (also on preemption), the training monitor (non-finite-loss
guard, loss scale, throughput) and the test figures."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid

from mnist_precision.data import NUM_CLASSES, batch_size_of
from mnist_precision.errors import TrainingDiverged
from mnist_precision.private_api import saves_within_epochs, should_log_this_step

EPOCH_LOG = logging.getLogger("mnist_precision.epochs")


class ModelCheckpoint(lightning_callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with its state key computed once and no per-step work when it saves by epoch.

    Lightning labels every hook call of every callback with `callback.state_key`, which ModelCheckpoint
    rebuilds each time as the repr of its settings: about 3 us a call on CPU (measured), and its
    `on_train_batch_end` is called every step. The settings it is made of are fixed at construction, so the
    first answer stays right. Without `every_n_train_steps` or `train_time_interval` that hook never saves, but
    it checks the trainer's state and reads the clock first (3.5 us a step, timed): then it returns at once.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if saves_within_epochs(self):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @property
    def state_key(self) -> str:
        if getattr(self, "_state_key", None) is None:
            self._state_key = super().state_key
        return self._state_key


class LastCheckpoint(ModelCheckpoint):
    """Keeps `last.ckpt`, what `resume=` continues from, current: after every epoch, every N steps, and on SIGTERM/Ctrl-C.

    Lightning's `save_last=True` writes last.ckpt only in a step where another checkpoint is written,
    so beside a best-by-val/acc callback it goes stale as soon as val/acc stops improving.

    `every_n_train_steps` (0: never) also writes it every N optimizer steps, which bounds what a SIGKILL
    can lose. (ModelCheckpoint allows either an epoch or a step trigger, not both: the step one is ours.)
    `keep_every_n_epochs` (0: never) also keeps the state of every N-th epoch as `epoch_{N-1:03d}.ckpt`
    (the Flux tutorial saves every 5): here rather than in a second ModelCheckpoint, whose `on_train_batch_end`
    would be called on every training step.

    A run that ends mid-epoch (`trainer.max_steps`, or `trainer.should_stop` as Lightning's Timer sets it on
    `max_time`, or EarlyStopping at a mid-epoch validation) is saved at the batch where it stops, not at the
    epoch end: by then Lightning's fit loop counts the epoch as done, and a resumed run would skip the rest of it.

    Preemption: Lightning already turns SIGTERM (SLURM, cloud preemption) into a `SIGTERMException` at the
    next batch boundary, on every DDP rank, and calls `on_exception`; here SIGINT, and under SLURM its
    pre-timeout signal, are routed the same way, and the exact state at that boundary (loops, data position,
    RNG, precision plugin) is saved. (mnist-train then requeues a SLURM job: train.interrupted.)
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 1, every_n_train_steps: int = 0, keep_every_n_epochs: int = 0):
        super().__init__(
            dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
            every_n_epochs=every_n_epochs, enable_version_counter=False,
        )
        self.every_n_steps = every_n_train_steps
        self.keep_every_n_epochs = keep_every_n_epochs
        self.signal: int | None = None  # the signal that stopped training, if one did
        self.saved_on_signal = False
        self._previous_handlers: dict[int, Any] = {}  # of the signals routed to SIGTERM while training
        self._batch_idx = -1  # the last trained batch of this epoch
        self._saved_mid_epoch_at = -1  # the global step of the exact mid-epoch save, if the run stopped there
        self._cut_short: tuple[int, int, int] | None = None  # (epoch, batches trained, batches) of an inexact save

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if not self._saves_now(trainer):
            return
        if self._stops_mid_epoch(trainer):
            self._save_mid_epoch(trainer)
        elif self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, self.path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A mid-epoch validation (val_check_interval) that stopped the run: EarlyStopping sets should_stop here.
        if trainer.state.fn == "fit" and self._saves_now(trainer) and self._stops_mid_epoch(trainer):
            self._save_mid_epoch(trainer)

    def _stops_mid_epoch(self, trainer: L.Trainer) -> bool:
        """Whether Lightning's fit loop ends after the current batch, before the epoch's last batch."""
        if self._batch_idx + 1 >= trainer.num_training_batches:
            return False
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        fit_loop = trainer.fit_loop  # Lightning honours should_stop only once min_epochs and min_steps are met
        return trainer.should_stop and trainer.current_epoch >= (fit_loop.min_epochs or 0) and trainer.global_step >= (fit_loop.min_steps or 0)

    def _save_mid_epoch(self, trainer: L.Trainer) -> None:
        self._save(trainer, self.path)
        self._saved_mid_epoch_at = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_idx = -1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch_idx + 1 < trainer.num_training_batches:  # the epoch was cut short
            if self._saved_mid_epoch_at != trainer.global_step:
                # Stopped by something that acted after the batch's callbacks (a LightningModule hook): the state
                # here counts the epoch as done. Saved all the same, and the resumed run says what it skips.
                self._cut_short = (trainer.current_epoch, self._batch_idx + 1, trainer.num_training_batches)
                super().on_train_epoch_end(trainer, pl_module)
            return
        super().on_train_epoch_end(trainer, pl_module)
        epoch = trainer.current_epoch
        if self.keep_every_n_epochs and (epoch + 1) % self.keep_every_n_epochs == 0 and self._saves_now(trainer):
            self._save(trainer, os.path.join(self.dirpath, f"epoch_{epoch:03d}{self.FILE_EXTENSION}"))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cut_short": self._cut_short}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("cut_short"):
            epoch, trained, batches = state_dict["cut_short"]
            rank_zero_warn(
                f"resuming from a checkpoint written after epoch {epoch} stopped at batch {trained} of {batches}: "
                f"Lightning counts that epoch as done, so its other {batches - trained} batches are not trained."
            )

    @staticmethod
    def _save(trainer: L.Trainer, path: str) -> None:
        trainer.save_checkpoint(path, weights_only=False)  # the full state, said explicitly (None logs a notice)

    @staticmethod
    def _saves_now(trainer: L.Trainer) -> bool:
        """ModelCheckpoint's own rule, from public state: nothing is saved by fast_dev_run or the sanity check."""
        return not (trainer.fast_dev_run or trainer.sanity_checking)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self._routed_signals():
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    @staticmethod
    def _routed_signals() -> tuple[int, ...]:
        """Ctrl-C, and under SLURM the signal it sends before the time limit: SIGUSR1 (`sbatch --signal=USR1@120`,
        what Lightning expects) or SIGUSR2 (what submitit asks for). Lightning's own handler for it saves where the
        signal lands, mid-step; routed through SIGTERM, the state is saved at the next batch boundary, on every rank."""
        return (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2) if "SLURM_JOB_ID" in os.environ else (signal.SIGINT,)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_signals()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_signals()
        if isinstance(exception, SIGTERMException):
            self.signal = self.signal or signal.SIGTERM
            self._save(trainer, self.path)
            self.saved_on_signal = True

    def _restore_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self._previous_handlers.clear()


class TrainingMonitor(L.Callback):
    """Everything the template tracks per training step, with no host-device sync in a step that doesn't log.

    - Non-finite loss guard: each step's loss (the model's, before any loss scaling) is kept on its device
      in a list; it is read, in one transfer, on logging steps, at the end of each epoch and before any
      checkpoint is written, so the first bad step is named exactly and a diverged state is never saved.
      Without a loss scaler (32, bf16-mixed, 16-true, bf16-true) one non-finite loss stops the run. Under
      one (16-mixed, 16-master, bf16-master), a non-finite loss makes non-finite gradients, so the step is
      skipped like any overflow; the run stops only after `patience` of them in a row: one bad batch is
      not a divergence, but a loss that stays inf or NaN while steps are skipped is.
    - `precision/loss_scale` and `precision/skipped_steps` (reading them is a sync): on logging steps.
    - `throughput/samples_per_sec`, once per epoch. (Lightning's ThroughputMonitor synchronises CUDA after
      every batch, which costs more than a whole step of the small models here.)
    - `fit_seconds`: from the first training step to the end of the last epoch (validation and checkpoints
      included; start-up, sanity check and test not), timed with CUDA events on a GPU.

    One callback rather than three: Lightning calls each per-step hook a callback overrides through a profiler
    context (about 0.6 us a call on this CPU, timed, besides the hook's own work).
    """

    def __init__(self, patience: int = 5) -> None:
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"callbacks.training_monitor.patience must be an integer >= 1, got {patience!r}")
        self.patience = patience
        self._losses: list[Tensor] = []  # unchecked losses, on their device
        self._where: list[tuple[int, int, int]] = []  # (global step, epoch, batch) of each
        self._step = 0
        self._streak = 0  # non-finite losses in a row, up to the last check
        self._first_bad: tuple[float, tuple[int, int, int]] = (0.0, (0, 0, 0))  # the streak's first loss and place
        self._start = 0.0
        self._samples = 0
        self._timing = False
        self.history: list[tuple[int, float]] = []  # (samples, training seconds) per epoch, for mnist-bench
        self.fit_seconds: float | None = None
        self._fit_clock: Stopwatch | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start, self._samples, self._timing = time.perf_counter(), 0, True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_clock = Stopwatch(pl_module.device)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fit_clock is not None:
            self.fit_seconds = self._fit_clock.seconds()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the optimizer step this batch belongs to (counted up before batch end)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._samples += batch_size_of(batch)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss)  # already detached by Lightning
            self._where.append((self._step, trainer.current_epoch, batch_idx))
        if should_log_this_step(trainer):
            self.check_losses(trainer)
            self._log_loss_scale(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_losses(trainer)
        self._stop_timer(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_timer(pl_module)  # validation time is not training throughput

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check_losses(trainer)  # raises before a diverged state is written

    def check_losses(self, trainer: L.Trainer) -> None:
        """Raise `TrainingDiverged` if the losses since the last check break the rule above (one transfer)."""
        if not self._losses:
            return
        values = torch.stack(self._losses).float().tolist()
        where, self._losses, self._where = self._where, [], []
        limit = self.patience if getattr(trainer.precision_plugin, "scaler", None) is not None else 1
        diverged = False
        for value, place in zip(values, where, strict=True):
            if math.isfinite(value):
                self._streak = 0
                continue
            if self._streak == 0:
                self._first_bad = (value, place)
            self._streak += 1
            if self._streak >= limit:
                diverged = True
                break
        # Every rank checks at the same steps; all stop together, or under a launcher that does not kill the others
        # on an exception (torchrun, SLURM) they would wait in the next all-reduce until it times out.
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(diverged, all=False) and not diverged:
            raise TrainingDiverged(f"the training loss became inf/NaN on another rank (this is rank {trainer.global_rank}).")
        if diverged:
            raise TrainingDiverged(divergence_message(trainer, *self._first_bad, limit))

    def _log_loss_scale(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is None:
            return
        pl_module.log("precision/loss_scale", scaler.get_scale(), on_step=True, on_epoch=False)
        if hasattr(plugin, "skipped_steps"):
            pl_module.log("precision/skipped_steps", float(plugin.skipped_steps), on_step=True, on_epoch=False)

    def _stop_timer(self, pl_module: L.LightningModule) -> None:
        if not self._timing or self._samples == 0:
            return
        synchronize(pl_module.device)
        self._timing = False
        elapsed = time.perf_counter() - self._start
        self.history.append((self._samples, elapsed))
        world_size = pl_module.trainer.world_size
        pl_module.log("throughput/samples_per_sec", self._samples * world_size / elapsed, on_epoch=True, rank_zero_only=True)


def divergence_message(trainer: L.Trainer, loss: float, where: tuple[int, int, int], limit: int) -> str:
    step, epoch, batch = where
    precision = trainer.precision
    message = f"the training loss is {loss} at step {step} (epoch {epoch}, batch {batch}) with precision={precision}"
    if limit > 1:
        message += f", and stayed inf/NaN for {limit} steps in a row (each skipped by the loss scaler)"
    return message + ". " + _divergence_hint(precision)


def _divergence_hint(precision: str) -> str:
    if precision == "16-true":
        return (
            "Pure float16 weights and optimizer state underflow (Adam's eps=1e-8 is 0 in float16). "
            "Use precision=16-master (FP32 master copy with loss scaling), 16-mixed or bf16-mixed."
        )
    if precision == "bf16-true":
        return "Pure bfloat16 training lost precision; use precision=bf16-mixed or bf16-master."
    return "Lower the learning rate (optimizer.lr=...), add gradient clipping (trainer.gradient_clip_val=1.0), or check the inputs."


class Stopwatch:
    """Seconds since it was made: CUDA events on a GPU (the time the GPU's stream took), else the host's clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start_time = time.perf_counter()

    def seconds(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.start_time
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.start.elapsed_time(end) / 1000


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a wall-clock reading means what it says (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress_bar(refresh_rate: int = 50) -> lightning_callbacks.ProgressBar:
    """Lightning's TQDM bar on a terminal; one plain line per epoch when stdout is a file or a pipe (CI, SLURM, nohup),
    where a bar's redraws would write thousands of carriage-return updates."""
    if sys.stdout.isatty():
        return StepLossBar(refresh_rate=refresh_rate)
    return EpochLines()


class StepLossBar(lightning_callbacks.TQDMProgressBar):
    """Lightning's TQDM bar, with the latest logged training loss beside its `prog_bar=True` metrics.

    The module logs that loss without `prog_bar=True`: Lightning converts every progress-bar value to a Python
    number after every step, logged in that step or not, which on a GPU waits for all of the queued work. Here it
    is read only when the bar redraws (every `refresh_rate` steps).
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.logged_metrics.get("train/loss_step")
        if loss is not None:
            metrics["train/loss_step"] = float(loss)
        return metrics


class EpochLines(lightning_callbacks.ProgressBar):
    """A progress "bar" for logs: after each epoch, one line with its mean training loss and accuracy, its validation
    loss and accuracy, and how long it took (validation included), through the job's log (console and train.log)."""

    SHOWN = ("train/loss_epoch", "train/acc", "val/loss", "val/acc")

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._epoch_start: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The finished epoch's metrics are complete only now: train/loss_epoch and train/acc are logged by the
        # LightningModule's own on_train_epoch_end, which runs after every callback's.
        self._report(trainer, trainer.current_epoch - 1)
        self._epoch_start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, trainer.current_epoch - 1)

    def _report(self, trainer: L.Trainer, epoch: int) -> None:
        if self._epoch_start is None or not self._enabled or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{name} {float(metrics[name]):.4f}" for name in self.SHOWN if name in metrics)
        total = f"/{trainer.max_epochs}" if trainer.max_steps == -1 and trainer.max_epochs and trainer.max_epochs > 0 else ""
        EPOCH_LOG.info(f"epoch {epoch + 1}{total}  {shown}  {time.perf_counter() - self._epoch_start:.1f} s")
        self._epoch_start = None


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
