"""Counting the host's reads of tensor values in a training step (a host-device sync each, on a GPU).

On a GPU each `.item()`, `bool(tensor)`, `float(tensor)` or `.tolist()` makes the CPU wait for the GPU, which
then idles while the CPU queues the next step. On CPU the first three are calls of `aten::_local_scalar_dense`,
which a `TorchDispatchMode` counts; `.tolist()` and `.numpy()` read memory without a dispatcher call, so they
are wrapped and counted too. Each read is attributed to the code that made it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mnist_precision
from mnist_precision.kit.build import build_run
from mnist_precision.kit.private_api import should_log_this_step

PRECISIONS = ["32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "16-master", "bf16-master"]
WITH_GRAD_SCALER = {"16-mixed", "16-master", "bf16-master"}
# Lightning writes logged values after batches 1, 3, 5 and 7 of the 8 (log_every_n_steps=2). The counted steps, 2, 4
# and 6, do not log, and each comes after one that did: what Lightning keeps of a logged value is there, as in a run.
COUNTED = [2, 4, 6]
EVERY_OTHER_STEP_LOGS = ["trainer.log_every_n_steps=2", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


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
        if caller.startswith(TEMPLATE):
            return "template"
        if "/optimi/" in caller:
            return "torch-optimi"
        return "lightning" if "/lightning/" in caller else "torchmetrics" if "/torchmetrics/" in caller else "other"


TEMPLATE = str(Path(mnist_precision.__file__).parent)  # the package's files (a copy's package may share its folder's name)


class CountedSteps(L.Callback):
    """Brackets each COUNTED step, from the start of its batch to the start of the next (every callback's and the
    module's work, the optimizer, Lightning's bookkeeping after the batch), and notes whether it logged."""

    def __init__(self) -> None:
        self.logged: dict[int, bool] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx in COUNTED:
            self.logged[batch_idx] = should_log_this_step(trainer)


def fit_bracketed(make_config, bracket: CountedSteps, *overrides: str) -> None:
    run = build_run(make_config(*EVERY_OTHER_STEP_LOGS, *overrides))
    run.trainer.callbacks.insert(0, bracket)  # first in: its batch start comes before every other callback's
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert bracket.logged == dict.fromkeys(COUNTED, False)  # each counted step ran to the end, and none of them logged


class CountSteadyStateSteps(CountedSteps):
    """Counts the host reads of each COUNTED step."""

    def __init__(self) -> None:
        super().__init__()
        self.by_source: Counter[str] = Counter()
        self._step: tuple[int, HostReads] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step is not None:
            self._step[1].__exit__(None, None, None)
            self.by_source.update(self._step[1].by_source)
            self._step = None
        if batch_idx in COUNTED:
            self._step = (batch_idx, HostReads().__enter__())


def count_host_reads(make_config, *overrides: str) -> Counter[str]:
    counter = CountSteadyStateSteps()
    fit_bracketed(make_config, counter, *overrides)
    return counter.by_source
