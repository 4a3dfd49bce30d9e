"""Checkpoints: `last.ckpt` kept current (every epoch, every N steps, on SIGTERM/Ctrl-C and where a run stops
mid-epoch), the best ones by the task's monitored metric, and files that are never half-written.

Lightning writes through an fsspec "transaction": a temporary file from `tempfile.mkstemp()` (the system temp
directory) moved over the target with `shutil.move`. That is a rename only when the temp directory and the checkpoint
share a filesystem; otherwise it is a copy, and a SIGKILL in the middle leaves a truncated checkpoint. Here
(`AtomicCheckpointIO`) the temporary file sits beside the target, is fsynced, and `os.replace` swaps it in: the old
file or the new one, never a piece of either.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_precision.kit.errors import RunFailed
from mnist_precision.kit.private_api import saves_within_epochs


class CheckpointSaveError(RunFailed):
    """A checkpoint could not be written (disk full, permissions, ...); the previous one is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO: a checkpoint is written whole or not at all, and one holding tensor subclasses loads."""

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning loads with a callable map_location (each storage where it was saved), which torch refuses for a tensor
        subclass such as torchao's 8-bit, 4-bit and FP8 optimizer states ("Callable map_location not supported with
        _rebuild_wrapper_subclass"). On the CPU instead: Lightning moves the model's and the optimizers' states to
        their device after loading them, as it does for any checkpoint."""
        return super().load_checkpoint(path, map_location="cpu" if callable(map_location) else map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except OSError as error:
            partial.unlink(missing_ok=True)
            kept = f"the previous {target.name} is intact" if target.exists() else "no earlier checkpoint of that name existed"
            raise CheckpointSaveError(f"could not write the checkpoint {target}: {error.strerror or error}; {kept}.") from None


class ModelCheckpoint(lightning_callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with its state key computed once and no per-step work when it saves by epoch.

    Lightning labels every hook call of every callback with `callback.state_key`, which ModelCheckpoint rebuilds each
    time as the repr of its settings, and its `on_train_batch_end` is called every step. The settings it is made of are
    fixed at construction, so the first answer stays right. Without `every_n_train_steps` or `train_time_interval`
    that hook never saves, but it checks the trainer's state and reads the clock first: then it returns at once.
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
    pre-timeout signal, are routed the same way, and the state at that boundary (loops, data position,
    RNG, precision plugin) is saved. (mnist-train then requeues a SLURM job: cli.train.interrupted.)

    A save in the middle of an epoch is exact only if the training loader saves its position (`state_dict` and
    `load_state_dict`: the template's resident loader, torchdata's StatefulDataLoader); otherwise `exact` is False,
    the message says so, and the resumed run says what differs: the rest of that epoch comes from a fresh pass
    over the loader.
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
        self._restarted: tuple[int, int, int] | None = None  # the same, for a mid-epoch save of a loader with no position
        self._torchdata_epoch_end: int | None = None  # the epoch whose end was saved with a torchdata loader's state (below)
        self.exact = True  # whether the last save holds the exact state (see above)

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
            self._save_here(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A mid-epoch validation (val_check_interval) that stopped the run: EarlyStopping sets should_stop here. A run
        # already stopping was saved at its last batch, before the validation Lightning runs before it stops: that
        # validation is not one an uninterrupted run makes, and what it changes (a loader's draw from the RNG) must
        # not be in the state a resume continues from.
        stopping_already = self._saved_mid_epoch_at == trainer.global_step
        if trainer.state.fn == "fit" and self._saves_now(trainer) and self._stops_mid_epoch(trainer) and not stopping_already:
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
        self._save_here(trainer)
        self._saved_mid_epoch_at = trainer.global_step

    def _save_here(self, trainer: L.Trainer) -> None:
        """Save the state at this batch boundary, saying in it whether a resume can continue the epoch exactly."""
        mid_epoch = self._batch_idx + 1 < trainer.num_training_batches
        self.exact = not mid_epoch or loader_saves_position(trainer.train_dataloader)
        self._restarted = None if self.exact else (trainer.current_epoch, self._batch_idx + 1, trainer.num_training_batches)
        self._save(trainer, self.path)
        self._restarted = None

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
        if is_torchdata_loader(trainer.train_dataloader):
            self._torchdata_epoch_end = trainer.current_epoch
        super().on_train_epoch_end(trainer, pl_module)
        self._torchdata_epoch_end = None
        epoch = trainer.current_epoch
        if self.keep_every_n_epochs and (epoch + 1) % self.keep_every_n_epochs == 0 and self._saves_now(trainer):
            self._save(trainer, os.path.join(self.dirpath, f"epoch_{epoch:03d}{self.FILE_EXTENSION}"))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cut_short": self._cut_short, "restarted": self._restarted,
                "torchdata_epoch_end": self._torchdata_epoch_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("cut_short"):
            epoch, trained, batches = state_dict["cut_short"]
            rank_zero_warn(
                f"resuming from a checkpoint written after epoch {epoch} stopped at batch {trained} of {batches}: "
                f"Lightning counts that epoch as done, so its other {batches - trained} batches are not trained."
            )
        if state_dict.get("restarted"):
            epoch, trained, batches = state_dict["restarted"]
            rank_zero_warn(
                f"resuming in epoch {epoch} after batch {trained} of {batches}, not exactly: the training loader cannot save "
                f"its position, so the other {batches - trained} batches come from a fresh pass over it, not the ones an "
                "uninterrupted run would have trained on (a loader with state_dict/load_state_dict, such as torchdata's "
                "StatefulDataLoader, resumes exactly)."
            )
        if state_dict.get("torchdata_epoch_end") is not None:
            rank_zero_warn(
                f"resuming after the end of epoch {state_dict['torchdata_epoch_end']}, not exactly: torchdata's StatefulDataLoader "
                "restores a state saved after an epoch's last batch as a pass with nothing left, not as the next epoch's "
                "start (meta-pytorch/data#1437), so the batches from here on differ from an uninterrupted run's."
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
            self._save_here(trainer)
            self.saved_on_signal = True

    def _restore_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self._previous_handlers.clear()


def loader_saves_position(loader: Any) -> bool:
    """Whether Lightning can save and restore a loader's position within an epoch: it does for every loader with
    `state_dict` and `load_state_dict` (and for each of a collection of them)."""
    loaders = loader.values() if isinstance(loader, dict) else loader if isinstance(loader, (list, tuple)) else [loader]
    return all(callable(getattr(item, "state_dict", None)) and callable(getattr(item, "load_state_dict", None)) for item in loaders)


def is_torchdata_loader(loader: Any) -> bool:
    """Whether a training loader is (or holds) one of torchdata's: their epoch-end states do not resume exactly."""
    loaders = loader.values() if isinstance(loader, dict) else loader if isinstance(loader, (list, tuple)) else [loader]
    return any(type(item).__module__.startswith("torchdata.") for item in loaders)
