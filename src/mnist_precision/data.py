"""MNIST as resident tensors: one gather per batch, no per-sample Python work.

torchvision reads the IDX files once; each split then lives as a float image tensor and a
one-hot target tensor (on the accelerator if asked). A batch is `images[idx], targets[idx]`
for an index tensor drawn from a seeded, epoch-aware, DDP-sharded permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import MNIST

from mnist_precision.errors import UserError

NUM_CLASSES = 10
TRAIN_SIZE = 60_000
# Mean and std of the 60k training pixels scaled to [0, 1] (the usual torchvision values).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
RAW_FILES = [Path(url_name).stem for url_name, _ in MNIST.resources]  # the four un-gzipped IDX files


class EpochPermutation:
    """Which sample indices one rank visits in one epoch.

    Seeded by `seed + epoch`, so the order depends only on the epoch number: a run resumed from
    a checkpoint sees the same order as one that never stopped. Lightning calls `set_epoch` on
    `loader.sampler` at the start of every epoch. Under DDP the permutation is cut to a multiple
    of the world size and dealt round-robin, so ranks get disjoint shards of equal length.
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
    """Yields `(images[idx], targets[idx])` batches from tensors that stay resident.

    It plays the part of a DataLoader over a Dataset with `__getitems__`, minus the worker and
    collate machinery that resident tensors don't need. It is resumable mid-epoch: Lightning saves
    `state_dict()` in checkpoints and calls `load_state_dict()` on restart (any loader with these
    two methods), so a resumed run continues with the next unseen batch of the same permutation.
    """

    batch_sampler = None  # Lightning inspects any loader that has a `sampler` for this DataLoader attribute

    def __init__(self, images: Tensor, targets: Tensor, batch_size: int, sampler: EpochPermutation, drop_last: bool = False):
        self.images = images
        self.targets = targets
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last
        self._batches_fetched = 0
        self._resume_from: dict[str, int] | None = None

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.sampler.indices().to(self.images.device)
        start = 0
        if self._resume_from is not None and self._resume_from["epoch"] == self.sampler.epoch:
            start = self._resume_from["batches_fetched"]  # a checkpoint from the middle of this epoch
        self._resume_from = None
        for batch_index in range(start, len(self)):
            idx = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            self._batches_fetched = batch_index + 1
            yield self.images[idx], self.targets[idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_fetched": self._batches_fetched}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_from = dict(state)


def batch_size_of(batch: tuple[Tensor, Tensor]) -> int:
    return batch[0].size(0)


class MNISTDataModule(L.LightningDataModule):
    """MNIST train/val/test splits as resident tensors with one-hot targets.

    The official 10k test set is the test set; validation is a seeded split of the 60k training
    images (`val_size` of them).
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        val_size: int = 5_000,
        split_seed: int = 0,
        shuffle_seed: int = 42,
        batch_size: int = 128,
        eval_batch_size: int = 1_000,
        normalize: bool = True,
        on_device: Literal["auto", True, False] = "auto",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def prepare_data(self) -> None:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise UserError(f"data.data_dir={self.data_dir} is not a directory (it should hold MNIST/raw/).")
        if all((self.data_dir / "MNIST" / "raw" / name).is_file() for name in RAW_FILES):
            return  # nothing to fetch; also keeps read-only data directories untouched
        if not self.hparams.download:
            raise UserError(missing_files_message(self.data_dir, "download is off (data.download=false)"))
        try:
            for train in (True, False):
                MNIST(self.data_dir, train=train, download=True)
        except (RuntimeError, OSError) as error:
            raise UserError(missing_files_message(self.data_dir, f"the download failed: {first_line(error)}")) from None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_images, train_labels = read_split(self.data_dir, train=True)
        test_images, test_labels = read_split(self.data_dir, train=False)
        n_train = len(train_images)
        val_size = self.hparams.val_size
        if not 0 < val_size < n_train:
            raise UserError(f"data.val_size={val_size} must be between 1 and {n_train - 1} (the training set has {n_train} images).")
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.hparams.split_seed))
        device = self._resident_device()
        to_inputs, to_targets = self._images_to_inputs, self._labels_to_one_hot
        self.splits = {
            "train": (to_inputs(train_images[order[val_size:]], device), to_targets(train_labels[order[val_size:]], device)),
            "val": (to_inputs(train_images[order[:val_size]], device), to_targets(train_labels[order[:val_size]], device)),
            "test": (to_inputs(test_images, device), to_targets(test_labels, device)),
        }

    def train_dataloader(self) -> TensorBatchLoader:
        # Lightning's overfit_batches turns shuffling off only in DataLoaders: the same batches every epoch.
        overfitting = bool(self.trainer and self.trainer.overfit_batches)
        return self._loader("train", self.hparams.batch_size, shuffle=not overfitting)

    def val_dataloader(self) -> TensorBatchLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatchLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Resident on the training device already (data.on_device), a batch has nothing to move: Lightning's default
        # walks it with apply_to_collection and calls .to() on each tensor, every step. Any other batch goes that way.
        if isinstance(batch, tuple) and all(isinstance(part, Tensor) and part.device == device for part in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> TensorBatchLoader:
        images, targets = self.splits[split]
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = EpochPermutation(len(images), shuffle, self.hparams.shuffle_seed, world_size, rank)
        return TensorBatchLoader(images, targets, batch_size, sampler)

    def _resident_device(self) -> torch.device:
        on_device = self.hparams.on_device
        root_device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if on_device == "auto":
            return root_device
        return root_device if on_device else torch.device("cpu")

    def _images_to_inputs(self, images: Tensor, device: torch.device) -> Tensor:
        inputs = images.to(device).unsqueeze(1).float().div_(255)
        return inputs.sub_(MNIST_MEAN).div_(MNIST_STD) if self.hparams.normalize else inputs

    @staticmethod
    def _labels_to_one_hot(labels: Tensor, device: torch.device) -> Tensor:
        return F.one_hot(labels.to(device), NUM_CLASSES).float()


def read_split(data_dir: Path, train: bool) -> tuple[Tensor, Tensor]:
    """The uint8 images and int64 labels of one official split, checked."""
    images_file, labels_file = RAW_FILES[:2] if train else RAW_FILES[2:]
    raw = data_dir / "MNIST" / "raw"
    try:
        dataset = MNIST(data_dir, train=train, download=False)
    except RuntimeError as error:
        if "Dataset not found" in str(error):
            raise UserError(missing_files_message(data_dir, "they are not there")) from None
        raise UserError(f"{raw / images_file} or {raw / labels_file} is not a valid IDX file ({first_line(error)}).") from None
    except OSError as error:
        raise UserError(f"cannot read the MNIST files in {raw}: {error.strerror or error}.") from None
    except (AssertionError, ValueError, IndexError) as error:
        raise UserError(f"{raw / images_file} or {raw / labels_file} is not a valid IDX file ({first_line(error) or 'bad header'}).") from None
    images, labels = dataset.data, dataset.targets
    if images.dim() != 3 or images.shape[1:] != (28, 28) or images.dtype != torch.uint8:
        raise UserError(f"{raw / images_file} is not an MNIST image file: expected uint8 images of 28x28, got {images.dtype} {tuple(images.shape)}.")
    if labels.dim() != 1 or len(labels) != len(images):
        raise UserError(f"{raw / labels_file} holds {labels.numel()} labels for {len(images)} images in {raw / images_file}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = int(((labels < 0) | (labels >= NUM_CLASSES)).nonzero()[0])
        raise UserError(f"{raw / labels_file}: label {int(labels[bad])} at index {bad} is outside 0..{NUM_CLASSES - 1}.")
    return images, labels


def missing_files_message(data_dir: Path, why: str) -> str:
    files = "\n".join(f"  {data_dir / 'MNIST' / 'raw' / name}" for name in RAW_FILES)
    return (
        f"MNIST files not found, and {why}. Expected:\n{files}\n"
        "Fix it either way:\n"
        "  - point to a directory that holds MNIST/raw/: MNIST_ROOT=/path/to/dir or data.data_dir=/path/to/dir\n"
        "  - or allow the download (data.download=true) on a machine with network access"
    )


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
