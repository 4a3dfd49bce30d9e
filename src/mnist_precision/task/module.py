"""`MNISTClassifier`: the MNIST task's LightningModule. Plain Lightning: torchmetrics, `self.log`, public hooks only.

What every module gets from the machinery without a line here (docs/adapting.md): the training loss
logged per step and per epoch from what `training_step` returns, the learning rate, the non-finite-loss guard, RNG state
in checkpoints, the loss in FP32 under half precisions, the scheduler held on a step the loss scaler skipped, and the
per-step speedups.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_precision.task.figures import TestFigures


class MNISTClassifier(L.LightningModule):
    """Cross-entropy on integer labels; accuracy for every split.

    It takes the configs of its network, optimizer and scheduler (conf/net, conf/optimizer, conf/scheduler) and builds
    them itself, so its checkpoints hold everything needed to rebuild it:
    `MNISTClassifier.load_from_checkpoint("logs/train/<run>/checkpoints/last.ckpt")`.

    Args:
        net: the network's config (`_target_` and arguments).
        optimizer: the optimizer's config (`_partial_: true`; the parameters are added here).
        scheduler: `lr_scheduler` (a torch scheduler's config, `_partial_: true`, or None) and `interval` ("epoch" or
            "step"). A scheduler that takes `total_steps` (OneCycleLR) gets `trainer.estimated_stepping_batches`.
        num_classes: how many classes the network's logits score.
    """

    def __init__(self, net: dict, optimizer: dict, scheduler: dict | None = None, num_classes: int = 10):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = instantiate(net)
        # validate_args=False: the argument checks read the device on every update (a host sync per step on a GPU).
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        self.train_acc.update(logits, labels)
        return F.cross_entropy(logits, labels)

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.val_acc.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        logits = self(images)
        self.test_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.test_acc.update(logits, labels)
        return {"preds": logits.argmax(dim=1)}  # for the test figures

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss)
        self.log("test/acc", self.test_acc)

    def configure_callbacks(self) -> list[L.Callback]:
        return [TestFigures(self.hparams.num_classes)]  # a grid of test predictions and the confusion matrix

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        scheduler = self.hparams.scheduler or {}
        if scheduler.get("lr_scheduler") is None:
            return optimizer
        make_scheduler = instantiate(scheduler["lr_scheduler"])
        steps = {"total_steps": self.trainer.estimated_stepping_batches} if "total_steps" in inspect.signature(make_scheduler).parameters else {}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": make_scheduler(optimizer=optimizer, **steps), "interval": scheduler["interval"]}}
