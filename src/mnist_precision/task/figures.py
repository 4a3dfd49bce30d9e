"""The MNIST task's test figures in TensorBoard: a grid of test predictions and the confusion matrix."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid


class TestFigures(L.Callback):
    """At test time, logs to TensorBoard a grid of test predictions and the confusion matrix.

    The grid holds the first test images and, in its second half, the first mistakes found
    anywhere in the test set, framed in red (at 99 % accuracy the first images are all right).
    """

    def __init__(self, num_classes: int = 10, num_images: int = 64) -> None:
        self.num_images = num_images
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.first: list[Tensor] = []
        self.mistakes: list[list[Tensor]] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()
        self.first, self.mistakes = [], []

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, labels = batch
        preds = outputs["preds"]
        self.confusion.update(preds, labels)
        half = self.num_images // 2
        if not self.first:
            self.first = [images[:half].float().cpu(), preds[:half].cpu(), labels[:half].cpu()]
        found = sum(len(m[1]) for m in self.mistakes)
        if found < half:
            wrong = (preds != labels).nonzero().squeeze(1)[: half - found]
            self.mistakes.append([images[wrong].float().cpu(), preds[wrong].cpu(), labels[wrong].cpu()])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = self.confusion.compute()  # syncs across ranks
        self._log(trainer, matrix)

    @rank_zero_only
    def _log(self, trainer: L.Trainer, matrix: Tensor) -> None:
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None or not self.first:
            return
        images, preds, labels = (torch.cat(parts) for parts in zip(self.first, *self.mistakes, strict=True))
        step = trainer.global_step
        tensorboard.experiment.add_image("test/predictions", prediction_grid(images, preds, labels), step)
        tensorboard.experiment.add_text("test/predictions", prediction_table(preds, labels), step)
        figure, _ = self.confusion.plot(val=matrix.cpu())
        tensorboard.experiment.add_figure("test/confusion_matrix", figure, step)


def prediction_grid(images: Tensor, preds: Tensor, labels: Tensor) -> Tensor:
    """An RGB grid of the images; each wrong prediction is framed in red."""
    lo, hi = images.amin(), images.amax()
    rgb = ((images - lo) / (hi - lo).clamp_min(1e-6)).expand(-1, 3, -1, -1).clone()
    wrong = preds != labels
    frame = torch.zeros_like(rgb[0, 0], dtype=torch.bool)
    frame[:2, :] = frame[-2:, :] = frame[:, :2] = frame[:, -2:] = True
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    rgb[wrong] = torch.where(frame, red, rgb[wrong])
    return make_grid(rgb, nrow=8, padding=2, pad_value=1.0)


def prediction_table(preds: Tensor, labels: Tensor, columns: int = 8) -> str:
    """The grid's predictions as a Markdown table in the same layout; wrong ones read `pred (true)`."""
    cells = [f"**{p} ({t})**" if p != t else str(p) for p, t in zip(preds.tolist(), labels.tolist(), strict=True)]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    header = "| " + " | ".join(str(c) for c in range(columns)) + " |\n|" + "---|" * columns
    return header + "\n" + "\n".join("| " + " | ".join(row) + " |" for row in rows)
