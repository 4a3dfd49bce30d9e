"""Quadrants: 8x8 single-channel images of 4 classes (which quadrant is bright, over noise), made in memory."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader


def quadrants(n: int, generator: torch.Generator) -> TensorDataset:
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.rand(n, 1, 8, 8, generator=generator) * 0.5
    for k in range(4):
        row, col = 4 * (k // 2), 4 * (k % 2)
        images[labels == k, :, row : row + 4, col : col + 4] += 0.5
    return TensorDataset(images, labels)


class QuadrantsDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 64, eval_batch_size: int = 64, train_size: int = 512, val_size: int = 128,
                 test_size: int = 128, seed: int = 0, loader: Literal["plain", "stateful"] = "plain"):
        super().__init__()
        self.save_hyperparameters(logger=False)

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.train_set, self.val_set, self.test_set = (
            quadrants(n, generator) for n in (self.hparams.train_size, self.hparams.val_size, self.hparams.test_size))

    def train_dataloader(self) -> DataLoader:
        loader = StatefulDataLoader if self.hparams.loader == "stateful" else DataLoader
        return loader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.eval_batch_size)
