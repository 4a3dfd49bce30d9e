"""Builds the data module, the LightningModule and the Trainer from a composed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins import MixedPrecision
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
    precision = precision_arguments(cfg.precision, cfg.trainer.accelerator)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **precision)
    return Run(instantiate(cfg.data), model, trainer)


def precision_arguments(precision: DictConfig, accelerator: str) -> dict[str, Any]:
    """Trainer arguments for a `conf/precision/` entry: Lightning's own precision names pass straight through."""
    if precision.name == "16-mixed" and runs_on_cpu(accelerator):
        # Given precision="16-mixed" on CPU, Lightning silently trains in bf16 instead. torch has
        # float16 autocast and GradScaler on CPU, so ask for them explicitly: 16-mixed means float16.
        return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision.name}


def runs_on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
