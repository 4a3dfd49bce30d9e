"""A loader for datasets that fit in memory as tensors: one gather per batch, no per-sample Python work, and a position
that checkpoints save, so a run resumed mid-epoch sees exactly the batches an uninterrupted one would.

Any task whose data are a few tensors can use it (the MNIST task does); any other loader works with the machinery too
(a plain DataLoader, torchdata's StatefulDataLoader), with exact mid-epoch resume wherever the loader can save its
position (docs/reliability.md).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class EpochPermutation:
    """Which sample indices one rank visits in one epoch.

    Seeded by `seed + epoch`, so the order depends only on the epoch number: a run resumed from a checkpoint sees the
    same order as one that never stopped. Lightning calls `set_epoch` on `loader.sampler` at the start of every epoch.
    Under DDP the permutation is cut to a multiple of the world size and dealt round-robin, so ranks get disjoint
    shards of equal length.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas

    def indices(self) -> Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        return order[self.rank : len(self) * self.num_replicas : self.num_replicas]


class TensorBatchLoader:
    """Yields `tuple(tensor[idx] for tensor in tensors)` batches from tensors that stay resident (on the accelerator
    if they were put there).

    It plays the part of a DataLoader over a TensorDataset, minus the worker and collate machinery that resident
    tensors don't need (a DataLoader would index and collate sample by sample). It is resumable mid-epoch: Lightning
    saves `state_dict()` in checkpoints and calls `load_state_dict()` on restart (as for any loader with these two
    methods), so a resumed run continues with the next unseen batch of the same permutation.
    """

    batch_sampler = None  # Lightning inspects any loader that has a `sampler` for this DataLoader attribute

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, sampler: EpochPermutation, drop_last: bool = False):
        self.tensors = tensors
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last
        self._batches_fetched = 0
        self._resume_from: dict[str, int] | None = None

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        order = self.sampler.indices().to(self.tensors[0].device)
        start = 0
        if self._resume_from is not None and self._resume_from["epoch"] == self.sampler.epoch:
            start = self._resume_from["batches_fetched"]  # a checkpoint from the middle of this epoch
        self._resume_from = None
        for batch_index in range(start, len(self)):
            idx = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            self._batches_fetched = batch_index + 1
            yield tuple(tensor[idx] for tensor in self.tensors)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_fetched": self._batches_fetched}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_from = dict(state)
