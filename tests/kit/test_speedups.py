"""The per-step speedups the builder applies to any module and data module (kit.speedups): each skips work Lightning
does on every step, and leaves what Lightning does unchanged."""

from __future__ import annotations

import copy
import inspect
import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from mnist_precision.kit.build import build_run
from mnist_precision.kit.private_api import TRAINING_STEP_HOOKS
from mnist_precision.kit.speedups import FastAttributes, NoProfiler, cache_step_signatures, fast_attributes, pass_resident_batches_through


def fitted(make_config, *overrides: str):
    run = build_run(make_config("trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", *overrides))
    run.fit()
    return run


@pytest.mark.parametrize("bar, bar_hooks", [
    (["callbacks.progress_bar._target_=mnist_precision.kit.progress.EpochLines", "~callbacks.progress_bar.refresh_rate"], set()),
    (["callbacks.progress_bar._target_=mnist_precision.kit.progress.StepLossBar"], {("StepLossBar", "on_train_batch_end")}),  # TQDM's
], ids=["epoch lines", "tqdm"])
def test_training_steps_call_only_the_callback_hooks_that_do_something(make_config, bar, bar_hooks):
    """Every training-step hook a callback inherits empty from Callback is off, and so are the module's (the quadrants
    module overrides none); those a callback's class overrides stay on. Lightning's model summary, the learning-rate
    monitor's one hook and callbacks that join at fit time (a module's configure_callbacks) are covered too."""
    run = fitted(make_config, "trainer.enable_model_summary=true", "trainer.enable_progress_bar=true", *bar)
    names = {type(callback).__name__ for callback in run.trainer.callbacks}
    assert {"ModelCheckpoint", "LastCheckpoint", "TrainingMonitor", "LearningRateMonitor", "RandomState"} <= names
    assert any("ModelSummary" in name for name in names)
    called = {(type(callback).__name__, name) for callback in run.trainer.callbacks for name in TRAINING_STEP_HOOKS
              if callable(getattr(callback, name))}
    assert called == {
        ("TrainingMonitor", "on_train_batch_start"), ("TrainingMonitor", "on_train_batch_end"), ("LearningRateMonitor", "on_train_batch_start"),
        ("ModelCheckpoint", "on_train_batch_end"), ("LastCheckpoint", "on_train_batch_end"), *bar_hooks,
    }
    assert all(getattr(run.model, name) is None for name in TRAINING_STEP_HOOKS)
    assert run.trainer.global_step == run.trainer.num_training_batches > 0


def test_a_callback_from_configure_callbacks_gets_its_empty_step_hooks_skipped(make_config):
    class JoinsAtFit(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            pass

    joiner = JoinsAtFit()
    run = build_run(make_config("trainer.max_epochs=1", "trainer.limit_val_batches=1"))
    run.model.configure_callbacks = lambda: [joiner]
    run.fit()
    assert joiner in run.trainer.callbacks and all(getattr(joiner, name) is None for name in TRAINING_STEP_HOOKS)


def test_the_module_sets_lightnings_plain_attributes_directly_in_steady_state(make_config, monkeypatch):
    """Lightning sets the running hook's name on the module dozens of times a step: after the swap each takes
    FastAttributes' direct path, none nn.Module's."""
    run = build_run(make_config("trainer.max_epochs=1", "trainer.limit_val_batches=1"))
    counting, sets = {"on": False}, {"nn.Module": 0}
    original = torch.nn.Module.__setattr__

    def counted(self, name, value):
        if counting["on"] and self is run.model:
            sets["nn.Module"] += 1
        original(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counted)

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counting["on"] = batch_idx >= 2

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counting["on"] = False

    run.trainer.callbacks.insert(0, Count())
    run.fit()
    assert isinstance(run.model, FastAttributes) and sets["nn.Module"] == 0


class Module(L.LightningModule):
    pass


def test_fast_attributes_keep_nn_modules_behaviour_and_the_users_class():
    model = Module()
    fast_attributes(model)
    assert type(model).__name__ == "Module" and isinstance(model, Module) and Module.__setattr__ is torch.nn.Module.__setattr__
    model.note = None  # a new name: nn.Module's path, then the direct one
    model.note = "a string"
    assert model.__dict__["note"] == "a string"
    model.extra = torch.nn.Linear(2, 2)
    model.weight = torch.nn.Parameter(torch.zeros(2))
    model.register_buffer("count", torch.zeros(()))
    assert "extra" in model._modules and "weight" in model._parameters and "count" in model._buffers
    model.weight = None  # None on a parameter's name empties the parameter, as nn.Module does
    assert model._parameters["weight"] is None and "weight" not in model.__dict__
    with pytest.raises(TypeError, match="as child module"):
        model.extra = "not a module"  # nn.Module's own checks still run for names that are not plain attributes
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # copies are of the user's own class
        assert type(copied) is Module and copied.__dict__["note"] == "a string" and "extra" in copied._modules


def test_lightning_reads_the_step_signatures_from_their_cache():
    """Lightning asks inspect on every step whether training_step takes batch_idx; inspect answers from __signature__."""

    class Module(L.LightningModule):
        def training_step(self, batch, batch_idx):
            pass

    model = Module()
    cache_step_signatures(model)
    assert inspect.signature(Module.training_step) is Module.training_step.__signature__
    assert inspect.getfullargspec(model.training_step).args == ["self", "batch", "batch_idx"]
    assert is_param_in_hook_signature(model.training_step, "batch_idx", min_args=2)


def test_a_batch_already_on_the_training_device_is_not_moved_and_others_are():
    """A tuple or list of tensors on the device is handed back as it is; any other batch goes Lightning's way."""
    datamodule = L.LightningDataModule()
    pass_resident_batches_through(datamodule, L.LightningModule())
    batch = (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    moved = datamodule.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert [tensor.device.type for tensor in moved] == ["meta", "meta"]
    as_dict = datamodule.transfer_batch_to_device({"images": batch[0]}, torch.device("meta"), 0)
    assert as_dict["images"].device.type == "meta"


def test_a_transfer_hook_of_the_users_own_is_kept():
    class OwnTransfer(L.LightningDataModule):
        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return "theirs"

    datamodule = OwnTransfer()
    pass_resident_batches_through(datamodule, L.LightningModule())
    assert datamodule.transfer_batch_to_device((torch.zeros(1),), torch.device("cpu"), 0) == "theirs"


def test_no_profiler_by_default_does_nothing_at_no_per_hook_cost(make_config):
    profiler = build_run(make_config()).trainer.profiler
    assert isinstance(profiler, NoProfiler) and isinstance(profiler, PassThroughProfiler)  # what profiler=None means
    first, second = profiler.profile("[Callback]a.on_train_batch_end"), profiler.profile("[Strategy]b.training_step")
    assert first is second  # one shared context for every hook call, none built per call
    with first as outer, second as inner:  # nested hook calls enter it twice
        assert outer is inner is None
    assert profiler.summary() == ""
