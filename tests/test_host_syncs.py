"""No host-device sync in a steady-state training step (a step that doesn't log), for every precision.

On a GPU each `.item()`, `bool(tensor)`, `float(tensor)` or `.tolist()` makes the CPU wait for the GPU, which
then idles while the CPU queues the next step. On CPU the first three are calls of `aten::_local_scalar_dense`,
which a `TorchDispatchMode` counts; `.tolist()` and `.numpy()` read memory without a dispatcher call, so they
are wrapped and counted too. Each read is attributed to the code that made it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mnist_precision.build import build_run
from mnist_precision.callbacks import TrainingMonitor

PRECISIONS = ["32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "16-master", "bf16-master"]
WITH_GRAD_SCALER = {"16-mixed", "16-master", "bf16-master"}
FIRST, LAST = 2, 6  # counted batches of the first epoch (8 batches; no logging step: log_every_n_steps=50)
NO_LOGGING_STEP = ["trainer.log_every_n_steps=50", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host, by who asked: GradScaler, the template, Lightning, torch."""

    def __init__(self) -> None:
        super().__init__()
        self.by_source: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.by_source[self._source()] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostReads:
        self._originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counted(original))
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc_info)

    def _counted(self, read):
        def counted_read(tensor, *args, **kwargs):
            self.by_source[self._source()] += 1
            return read(tensor, *args, **kwargs)

        return counted_read

    @staticmethod
    def _source() -> str:
        files = [frame.filename for frame in traceback.extract_stack()[:-2]]  # less this and __torch_dispatch__/counted_read
        if any(name.endswith("amp/grad_scaler.py") for name in files):
            return "GradScaler"
        caller = next(name for name in reversed(files) if "/torch/" not in name or "/lightning/pytorch/" in name)
        return "template" if "mnist_precision" in caller else "lightning" if "/lightning/" in caller else "other"


class CountSteadyStateSteps(L.Callback):
    def __init__(self) -> None:
        self.reads = HostReads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == FIRST:
            self.reads.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == LAST:
            self.reads.__exit__(None, None, None)


def count_host_reads(make_config, *overrides: str) -> Counter[str]:
    run = build_run(make_config(*NO_LOGGING_STEP, *overrides))
    counter = CountSteadyStateSteps()
    run.trainer.callbacks.insert(0, counter)  # first in, last out: it brackets every other callback's work
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return counter.reads.by_source


@pytest.mark.parametrize("precision", PRECISIONS)
def test_with_a_fused_optimizer_no_step_reads_a_tensor_on_the_host(make_config, precision):
    """Fused optimizers take GradScaler's inf/NaN flag on the device: nothing at all is read, by anyone."""
    reads = count_host_reads(make_config, f"precision={precision}", "optimizer=adam", "+optimizer.fused=true")
    assert sum(reads.values()) == 0, dict(reads)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_with_a_plain_optimizer_only_grad_scaler_step_reads_its_flag(make_config, precision):
    """A non-fused optimizer can't skip on the device: GradScaler.step reads found_inf, once a step, and nothing else reads."""
    reads = count_host_reads(make_config, f"precision={precision}", "optimizer=sgd")
    steps = LAST - FIRST + 1
    expected = {"GradScaler": steps} if precision in WITH_GRAD_SCALER else {}
    assert dict(reads) == expected


def test_the_counter_sees_every_kind_of_read_and_who_made_it():
    """The tests above would pass vacuously if the counter missed reads."""
    monitor = TrainingMonitor()
    monitor._losses, monitor._where = [torch.tensor(0.5)], [(0, 0, 0)]
    with HostReads() as reads:
        monitor.check_losses(SimpleNamespace(precision_plugin=None, world_size=1))  # the template: one .tolist()
        value = torch.tensor([1.0, 2.0])
        value[0].item(), bool(value[1]), float(value[0]), value.numpy()  # this test file: four reads
    assert dict(reads.by_source) == {"template": 1, "other": 4}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (issue 9, part C: run on the device)")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_on_cuda_steady_state_steps_do_not_synchronize(make_config, precision):
    class SyncDebugError(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == FIRST:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == LAST:
                torch.cuda.set_sync_debug_mode("default")

    run = build_run(make_config(*NO_LOGGING_STEP, "trainer=gpu", f"precision={precision}", "optimizer=adam", "+optimizer.fused=true"))
    run.trainer.callbacks.insert(0, SyncDebugError())
    try:
        run.trainer.fit(run.model, datamodule=run.datamodule)  # a sync in the window raises RuntimeError
    finally:
        torch.cuda.set_sync_debug_mode("default")
