"""Fault injection for the reliability tests: a callback that sends this process a signal at a given step."""

import os

import lightning as L


class SendSignalAtStep(L.Callback):
    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
