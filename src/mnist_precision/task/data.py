"""MNIST as resident tensors: torchvision reads the IDX files once, each split then lives as a float image tensor in
[0, 1] and an integer label tensor (on the accelerator if asked), and a batch is one gather
(kit.loaders.TensorBatchLoader). Standardising is the data module's `transform`, applied on the device after each
batch arrives there: a model exported by `mnist-export` includes it, and takes images in [0, 1].

`pipeline=per_sample` serves the same splits the usual way instead (torchvision's ToTensor per image, collated by a
DataLoader): the comparison `mnist-bench` draws, and a loader that cannot save its position mid-epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets import MNIST
from torchvision.transforms import ToTensor

from mnist_precision.kit.errors import UserError, first_line, nothing_left_if_it_fails
from mnist_precision.kit.loaders import EpochPermutation, TensorBatchLoader

NUM_CLASSES = 10
# Mean and std of the 60k training pixels scaled to [0, 1] (the usual torchvision values).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
RAW_FILES = [Path(url_name).stem for url_name, _ in MNIST.resources]  # the four un-gzipped IDX files


class Standardise(nn.Module):
    """`(images - mean) / std`. (torchvision's Normalize does the same, and first checks `std` for zeros on the device: a
    host-device sync on every batch.)"""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


class MNISTDataModule(L.LightningDataModule):
    """MNIST train/val/test splits: images (N, 1, 28, 28) in [0, 1], standardised on the device (`normalize`), labels 0-9.

    The official 10k test set is the test set; validation is a seeded split of the 60k training images (`val_size`
    of them). Training batches are shuffled by `shuffle_seed + epoch`, so a resumed run sees the same order.
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
        pipeline: Literal["resident", "per_sample"] = "resident",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        # What a batch's images go through on the device; mnist-export puts it in front of the exported model.
        self.transform = Standardise(MNIST_MEAN, MNIST_STD) if normalize else nn.Identity()

    def prepare_data(self) -> None:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise UserError(f"data.data_dir={self.data_dir} is not a directory (it should hold MNIST/raw/).")
        if all((self.data_dir / "MNIST" / "raw" / name).is_file() for name in RAW_FILES):
            return  # nothing to fetch; also keeps read-only data directories untouched
        if not self.hparams.download:
            raise UserError(missing_files_message(self.data_dir, "download is off (data.download=false)"))
        try:
            with nothing_left_if_it_fails(self.data_dir / "MNIST" / "raw"):
                for train in (True, False):
                    MNIST(self.data_dir, train=train, download=True)
        except (RuntimeError, OSError) as error:
            raise UserError(missing_files_message(self.data_dir, f"the download failed: {first_line(error)}")) from None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_images, train_labels = read_split(self.data_dir, train=True)
        test_images, test_labels = read_split(self.data_dir, train=False)
        val_size = self.hparams.val_size
        if not 0 < val_size < len(train_images):
            raise UserError(f"data.val_size={val_size} must be between 1 and {len(train_images) - 1} "
                            f"(the training set has {len(train_images)} images).")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        indices = {"train": order[val_size:], "val": order[:val_size]}
        device = self._resident_device()
        self.splits = {split: (self._inputs(train_images[idx], device), train_labels[idx].to(device)) for split, idx in indices.items()}
        self.splits["test"] = (self._inputs(test_images, device), test_labels.to(device))
        self.indices = indices  # of each training-set split, for the per-sample pipeline

    def train_dataloader(self) -> TensorBatchLoader | DataLoader:
        # Lightning's overfit_batches turns shuffling off only in DataLoaders: the same batches every epoch.
        overfitting = bool(self.trainer and self.trainer.overfit_batches)
        return self._loader("train", self.hparams.batch_size, shuffle=not overfitting)

    def val_dataloader(self) -> TensorBatchLoader | DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatchLoader | DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return self.transform(images), labels

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> TensorBatchLoader | DataLoader:
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if self.hparams.pipeline == "per_sample":
            dataset = self._per_sample_dataset(split)
            sampler = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=self.hparams.shuffle_seed, drop_last=True)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        images, labels = self.splits[split]
        sampler = EpochPermutation(len(images), shuffle, self.hparams.shuffle_seed, world_size, rank)
        return TensorBatchLoader((images, labels), batch_size, sampler)

    def _per_sample_dataset(self, split: str) -> Subset:
        """torchvision's MNIST with a per-image ToTensor, over the same images as `split`."""
        dataset = MNIST(self.data_dir, train=split != "test", transform=ToTensor())
        return Subset(dataset, self.indices[split].tolist() if split in self.indices else range(len(dataset)))

    def _resident_device(self) -> torch.device:
        on_device = self.hparams.on_device
        root_device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if on_device == "auto":
            return root_device
        return root_device if on_device else torch.device("cpu")

    @staticmethod
    def _inputs(images: Tensor, device: torch.device) -> Tensor:
        return images.to(device).unsqueeze(1).float().div_(255)


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
        raise UserError(f"{raw / images_file} or {raw / labels_file} is not a valid IDX file ({first_line(error)}).") from None
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
