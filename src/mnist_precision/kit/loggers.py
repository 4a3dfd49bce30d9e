"""The TensorBoard logger `logger=tensorboard` builds (conf/logger/tensorboard.yaml)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import loggers


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoard logger without the `epoch` scalar Lightning adds to every call: TensorBoard's tabs list
    a run's charts by name, so that step-to-epoch line came first, in the Scalars and Time Series tabs and as a metric
    column in HParams. (The CSV and MLflow loggers keep their `epoch` column.)"""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != "epoch"}, step)
