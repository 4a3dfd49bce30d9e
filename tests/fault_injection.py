"""Fault injection for the reliability tests: a callback that sends this process a signal at a given step."""

import os
import time
import warnings

import lightning as L


class SendSignalAtStep(L.Callback):
    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SleepAtStep(L.Callback):
    """Sleeps after the given global step: past `trainer.max_time`, Lightning's Timer stops the run there."""

    def __init__(self, step: int, seconds: float):
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            time.sleep(self.seconds)


class PoisonInputAtSteps(L.Callback):
    """Puts one inf pixel into the batch of each given optimizer step (before the forward pass), on one rank or all."""

    def __init__(self, steps: list[int], rank: int | None = None):
        self.steps = set(steps)
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            batch[0].view(-1)[0] = float("inf")


class RaiseAtStep(L.Callback):
    """Raises an unexpected error (not a UserError) after the given optimizer step, on one rank or all: a bug, as the
    user meets it."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            raise RuntimeError("injected failure")


class WarnAtStep(L.Callback):
    """Warns once, after the given optimizer step: a warning the user should see."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            warnings.warn("an injected warning that matters", UserWarning, stacklevel=1)


class DiskFullAtStep(L.Callback):
    """From the given optimizer step on, every TensorBoard event write fails as on a full disk (ENOSPC)."""

    def __init__(self, step: int):
        self.step = step
        self.write = None  # RecordWriter.write, put back at teardown (the tests run in one process)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import errno

            from tensorboard.summary.writer.record_writer import RecordWriter

            def full(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            self.write, RecordWriter.write = RecordWriter.write, full

    def on_exception(self, trainer, pl_module, exception):
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer, pl_module, stage):
        if self.write is not None:
            from tensorboard.summary.writer.record_writer import RecordWriter

            RecordWriter.write, self.write = self.write, None
