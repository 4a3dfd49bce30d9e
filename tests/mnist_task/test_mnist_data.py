"""The MNIST task's data: splits, integer labels, batches, sharding, resumable order, the per-sample pipeline, and bad
data files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mnist_task.harness import IMAGE_FILES, LABEL_FILES, N_TEST, N_TRAIN, synthetic_digits
from torchvision.datasets import MNIST
from torchvision.transforms import Compose, Normalize, ToTensor

from mnist_precision.kit.errors import UserError
from mnist_precision.kit.loaders import EpochPermutation, TensorBatchLoader
from mnist_precision.task.data import MNIST_MEAN, MNIST_STD, MNISTDataModule


def make_datamodule(root: Path, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(root), download=False, val_size=128, batch_size=64, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def test_splits_are_seeded_disjoint_and_cover_the_training_set(mnist_root):
    dm = make_datamodule(mnist_root, normalize=False)
    train_x, _ = dm.splits["train"]
    val_x, _ = dm.splits["val"]
    test_x, _ = dm.splits["test"]
    assert (len(train_x), len(val_x), len(test_x)) == (N_TRAIN - 128, 128, N_TEST)
    images, _ = synthetic_digits(N_TRAIN, seed=1)
    pool = images.unsqueeze(1).float().div(255).flatten(1)
    rows = {tuple(r.tolist()) for r in pool}
    train_rows = {tuple(r.tolist()) for r in train_x.flatten(1)}
    val_rows = {tuple(r.tolist()) for r in val_x.flatten(1)}
    assert train_rows | val_rows == rows and not train_rows & val_rows
    again = make_datamodule(mnist_root, normalize=False)
    assert torch.equal(again.splits["val"][0], val_x)
    other_seed = make_datamodule(mnist_root, normalize=False, split_seed=1)
    assert not torch.equal(other_seed.splits["val"][0], val_x)


def test_labels_are_integers_and_images_in_unit_range(mnist_root):
    dm = make_datamodule(mnist_root, normalize=False)
    images, targets = dm.splits["test"]
    _, labels = synthetic_digits(N_TEST, seed=2)
    assert targets.shape == (N_TEST,) and targets.dtype == torch.int64 and torch.equal(targets, labels)
    assert images.shape == (N_TEST, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() == 1


def test_batches_are_standardised_on_the_device_with_mnist_mean_and_std(mnist_root):
    """The splits stay in [0, 1]; a batch is standardised after it reaches the device (on_after_batch_transfer), by the
    data module's `transform`, which mnist-export puts in front of the exported model."""
    normalized, plain = make_datamodule(mnist_root, normalize=True), make_datamodule(mnist_root, normalize=False)
    images, labels = normalized.splits["test"]
    assert torch.equal(images, plain.splits["test"][0]) and images.min() >= 0 and images.max() == 1
    standardised, same_labels = normalized.on_after_batch_transfer((images, labels), 0)
    torch.testing.assert_close(standardised, (images - MNIST_MEAN) / MNIST_STD)
    assert same_labels is labels
    assert torch.equal(plain.on_after_batch_transfer((images, labels), 0)[0], images)


def test_batches_equal_a_naive_per_sample_pipeline(mnist_root):
    """The vectorised loader and the device-side transform give exactly what indexing torchvision's dataset one sample
    at a time, with the usual per-sample transforms, gives."""
    dm = make_datamodule(mnist_root)
    dataset = MNIST(mnist_root, train=False)
    reference = Compose([ToTensor(), Normalize((MNIST_MEAN,), (MNIST_STD,))])  # the usual per-sample pipeline
    naive_images = torch.stack([reference(dataset[i][0]) for i in range(N_TEST)])
    naive_targets = torch.tensor([dataset[i][1] for i in range(N_TEST)])
    got_images, got_targets = map(torch.cat, zip(*(dm.on_after_batch_transfer(batch, 0) for batch in dm.test_dataloader()), strict=True))
    torch.testing.assert_close(got_images, naive_images, rtol=0, atol=1e-6)
    assert torch.equal(got_targets, naive_targets)

    train_loader = dm.train_dataloader()
    train_loader.sampler.set_epoch(3)
    order = train_loader.sampler.indices()
    first_images, first_targets = next(iter(train_loader))
    train_x, train_y = dm.splits["train"]
    assert torch.equal(first_images, torch.stack([train_x[i] for i in order[:64].tolist()]))
    assert torch.equal(first_targets, torch.stack([train_y[i] for i in order[:64].tolist()]))


def test_shuffle_order_depends_only_on_seed_and_epoch():
    a, b = EpochPermutation(100, True, seed=7), EpochPermutation(100, True, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert torch.equal(a.indices(), b.indices())
    b.set_epoch(3)
    assert not torch.equal(a.indices(), b.indices())
    assert sorted(a.indices().tolist()) == list(range(100))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_and_equal_in_batches(world_size):
    images, targets = torch.arange(101).float().view(-1, 1), torch.zeros(101, dtype=torch.long)
    shards = [EpochPermutation(101, True, seed=0, num_replicas=world_size, rank=r) for r in range(world_size)]
    indices = [set(s.indices().tolist()) for s in shards]
    assert all(not a & b for i, a in enumerate(indices) for b in indices[i + 1 :])
    assert sum(map(len, indices)) == 101 - 101 % world_size
    lengths = {len(TensorBatchLoader((images, targets), 8, s)) for s in shards}
    assert len(lengths) == 1


def test_loader_resumes_mid_epoch_with_the_next_unseen_batch():
    images, targets = torch.arange(50).float().view(-1, 1), torch.zeros(50, dtype=torch.long)
    loader = TensorBatchLoader((images, targets), 8, EpochPermutation(50, True, seed=3))
    loader.sampler.set_epoch(1)
    full = [x for x, _ in loader]
    iterator = iter(loader)
    seen = [next(iterator)[0] for _ in range(3)]
    state = loader.state_dict()

    resumed = TensorBatchLoader((images, targets), 8, EpochPermutation(50, True, seed=3))
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning does when it restarts the epoch
    rest = [x for x, _ in resumed]
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, full, strict=True))
    resumed.sampler.set_epoch(2)  # the state applies to its own epoch only
    assert len(list(resumed)) == len(full)


def test_a_read_only_directory_with_the_files_is_used_as_is(mnist_root):
    before = sorted(p.name for p in mnist_root.rglob("*"))
    dm = MNISTDataModule(data_dir=str(mnist_root), download=True, val_size=128)
    dm.prepare_data()
    dm.setup()
    assert sorted(p.name for p in mnist_root.rglob("*")) == before


def test_missing_files_with_download_off_name_the_files_and_both_fixes(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(UserError) as error:
        dm.prepare_data()
    message = str(error.value)
    for name in [*IMAGE_FILES.values(), *LABEL_FILES.values()]:
        assert str(tmp_path / "MNIST" / "raw" / name) in message
    assert "MNIST_ROOT=" in message and "data.data_dir=" in message and "data.download=true" in message


def test_failed_download_names_the_files_and_both_fixes_and_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # a closed local port: no network, offline
    (tmp_path / "mine").mkdir()
    dm = MNISTDataModule(data_dir=str(tmp_path / "mine/no/such/dir"), download=True)
    with pytest.raises(UserError) as error:
        dm.prepare_data()
    assert "the download failed" in str(error.value) and "MNIST_ROOT=" in str(error.value)
    assert list((tmp_path / "mine").iterdir()) == []  # torchvision made no/such/dir/MNIST/raw on its way: gone again


def test_truncated_idx_file_is_named(writable_mnist):
    path = writable_mnist / "MNIST" / "raw" / IMAGE_FILES[True]
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match=IMAGE_FILES[True]):
        make_datamodule(writable_mnist)


def test_wrong_magic_idx_file_is_named(writable_mnist):
    path = writable_mnist / "MNIST" / "raw" / LABEL_FILES[False]
    path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])
    with pytest.raises(UserError, match=LABEL_FILES[False]):
        make_datamodule(writable_mnist)


def test_label_out_of_range_is_named_with_its_index(writable_mnist):
    path = writable_mnist / "MNIST" / "raw" / LABEL_FILES[True]
    data = bytearray(path.read_bytes())
    data[8 + 17] = 12
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{LABEL_FILES[True]}: label 12 at index 17"):
        make_datamodule(writable_mnist)


def test_validation_split_as_large_as_the_training_set_is_refused(mnist_root):
    dm = MNISTDataModule(data_dir=str(mnist_root), download=False, val_size=N_TRAIN)
    with pytest.raises(UserError, match=f"data.val_size={N_TRAIN} must be between 1 and {N_TRAIN - 1}"):
        dm.setup()


def test_unreadable_files_are_reported_with_the_directory(writable_mnist, monkeypatch):
    def denied(self):  # root ignores file modes, so inject the error torchvision would raise
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(MNIST, "_load_data", denied)
    with pytest.raises(UserError, match=r"cannot read the MNIST files in .*MNIST/raw: Permission denied"):
        make_datamodule(writable_mnist)


def test_the_per_sample_pipeline_serves_the_same_splits_through_a_dataloader(mnist_root):
    """pipeline=per_sample: torchvision's transforms per image, collated by a DataLoader, over the same validation images."""
    resident, per_sample = make_datamodule(mnist_root), make_datamodule(mnist_root, pipeline="per_sample")
    loader = per_sample.val_dataloader()
    assert isinstance(loader, torch.utils.data.DataLoader) and not hasattr(loader, "state_dict")
    images, labels = map(torch.cat, zip(*loader, strict=True))
    torch.testing.assert_close(images, resident.splits["val"][0], rtol=0, atol=1e-6)  # in [0, 1], as the resident ones
    assert torch.equal(labels, resident.splits["val"][1])
