"""Wall time of what mnist-train does besides its steps, call by call, in one run: each `self.log`, each write
to the logger and its flush, each checkpoint (the whole `trainer.save_checkpoint`, and the `torch.save` and
fsync inside it).

These are the per-call figures docs/performance.md quotes. They are medians of one run on a shared
machine: a size, not a comparison (`mnist-bench` with `bench.variants` compares, with paired epochs). Calls per
epoch count the whole run's calls, the sanity check's validation included, over its epochs.

    python scripts/time_calls.py trainer=cpu [mnist-train overrides ...]    # about 20 s: the MLP, 5 epochs
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable


def main() -> None:
    import lightning as L
    import torch

    from mnist_precision.kit.build import build_run, compose_training_config

    seconds: dict[str, list[float]] = defaultdict(list)

    def timed(function: Callable[..., Any], name: Callable[..., str]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name(*args, **kwargs)].append(time.perf_counter() - start)

        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_training_config(sys.argv[1:], Path(tmp))
        run = build_run(cfg)
        # The module's own calls and the callbacks' (the training monitor's) go through LightningModule.log.
        L.LightningModule.log = timed(L.LightningModule.log, lambda module, name, *args, **kwargs: f"self.log('{name}')")
        for logger in run.trainer.loggers:  # Lightning writes with log_metrics, then flushes with save()
            kind = type(logger).__name__
            logger.log_metrics = timed(logger.log_metrics, lambda *args, kind=kind, **kwargs: f"{kind}.log_metrics")
            logger.save = timed(logger.save, lambda *args, kind=kind, **kwargs: f"{kind}.save (flush)")
        run.trainer.save_checkpoint = timed(run.trainer.save_checkpoint, lambda *args, **kwargs: "trainer.save_checkpoint")
        torch.save = timed(torch.save, lambda *args, **kwargs: "  of which torch.save")
        os.fsync = timed(os.fsync, lambda *args, **kwargs: "  of which os.fsync")
        run.fit()
    epochs = max(run.trainer.current_epoch, 1)  # a run that max_steps stops in its first epoch: per started epoch
    print(f"mnist-train {' '.join(sys.argv[1:])}: {epochs} epochs of {run.trainer.num_training_batches} steps, "
          f"logging every {run.trainer.log_every_n_steps}")
    print("| call | calls per epoch | median (ms) | per epoch (ms) |")
    print("|---|---|---|---|")
    order = ("self.log", "Logger", "trainer.save_checkpoint", "  of which torch.save", "  of which os.fsync")

    def rank(item: tuple[str, list[float]]) -> tuple[int, str]:  # in `order`; a name matching none sorts last
        name = item[0]
        return next((i for i, part in enumerate(order) if part in name), len(order)), name

    for name, times in sorted(seconds.items(), key=rank):
        print(f"| {name} | {len(times) / epochs:.1f} | {statistics.median(times) * 1e3:.2f} | {sum(times) / epochs * 1e3:.1f} |")


if __name__ == "__main__":
    main()
