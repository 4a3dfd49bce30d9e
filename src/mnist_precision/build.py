"""Builds the data module, the LightningModule and the Trainer from a composed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from mnist_precision.classifier import MNISTClassifier
from mnist_precision.config import check_config
from mnist_precision.data import MNISTDataModule


@dataclass
class Run:
    datamodule: MNISTDataModule
    model: MNISTClassifier
    trainer: L.Trainer


def build_run(cfg: DictConfig) -> Run:
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = MNISTClassifier(
        net=instantiate(cfg.model),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.scheduler.lr_scheduler),
        lr_interval=cfg.scheduler.interval,
    )
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    loggers = [instantiate(node) for node in (cfg.logger or {}).values() if node is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **precision_arguments(cfg.precision))
    return Run(instantiate(cfg.data), model, trainer)


def precision_arguments(precision: DictConfig) -> dict[str, Any]:
    """Trainer arguments for a `conf/precision/` entry: Lightning's own precision names pass straight through."""
    return {"precision": precision.name}
