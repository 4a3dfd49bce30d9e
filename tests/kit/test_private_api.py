"""The private Lightning and torch APIs the template uses (all in `mnist_precision.kit.private_api`) still mean what
the template relies on. When an upgrade breaks one of these tests, fix `private_api.py`, nothing else."""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import pytest
import torch
from support import TinyRegression, fit_tiny, tensorboard_scalars

from mnist_precision.kit.build import build_run
from mnist_precision.kit.private_api import (
    NORM_LAYERS,
    TORCHAO_ADAMW,
    TRAINING_STEP_HOOKS,
    batches_processed_this_epoch,
    epochs_trained,
    found_inf,
    metric_update_count,
    restore_metric_state,
    run_after_closure,
    saves_within_epochs,
    should_log_this_step,
    skip_inherited_step_hooks,
)


class RecordLoggingSteps(L.Callback):
    """The optimizer steps that `should_log_this_step` names, on batches that end an accumulation window."""

    def __init__(self) -> None:
        self.named: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and should_log_this_step(trainer):
            self.named.append(trainer.global_step)


def test_should_log_this_step_is_exactly_when_lightning_writes_step_values(make_config, tmp_path):
    """With accumulation, the steps whose train/loss_step reaches TensorBoard are those it names, and no others.
    (Within a window it is also True on the micro-batches before the optimizer step: a harmless extra self.log.)"""
    run = build_run(make_config("trainer.max_epochs=2", "trainer.log_every_n_steps=3", "trainer.accumulate_grad_batches=2"))
    recorder = RecordLoggingSteps()
    run.trainer.callbacks.append(recorder)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    written = [step for step, _ in tensorboard_scalars(tmp_path / "run", "train/loss_step")]
    # Lightning writes a step's values under the optimizer-step count before that step (global_step - 1 at batch end).
    named = [step - 1 for step in recorder.named]
    assert written == named and len(written) >= 2, (written, named)


def test_found_inf_is_grad_scalers_flag_on_the_device():
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for gradient, expected in [(torch.ones(3), 0.0), (torch.tensor([1.0, float("inf"), 1.0]), 1.0)]:
        scaler.scale(parameter.sum()).backward()  # sets the scale up, as in training
        parameter.grad = gradient.clone()
        scaler.unscale_(optimizer)
        flag = found_inf(scaler, optimizer)
        assert isinstance(flag, torch.Tensor) and flag.device == parameter.grad.device and float(flag) == expected
        scaler.step(optimizer)
        scaler.update()


def counting_step_hooks(cls: type) -> type:
    """Class decorator: each of the six training-step hooks counts its calls in `self.calls`."""
    for name in TRAINING_STEP_HOOKS:
        def count(self, *args, name=name):
            self.calls[name] += 1
        setattr(cls, name, count)
    return cls


@counting_step_hooks
class CountsTrainingSteps(L.Callback):
    def __init__(self) -> None:
        self.calls = dict.fromkeys(TRAINING_STEP_HOOKS, 0)


@counting_step_hooks
class TinyModule(TinyRegression):
    def __init__(self) -> None:
        super().__init__()
        self.calls = dict.fromkeys(TRAINING_STEP_HOOKS, 0)


def test_lightning_skips_a_hook_that_is_none(tmp_path):
    """What `skip_inherited_step_hooks` relies on, for each of the six hooks, on a callback and on the model: Lightning
    does not call a hook set to None (if it called it, fit would raise TypeError; if it looked the hook up on the class,
    the count would not be 0). The twins left alone show that each hook is called 3 times (3 batches) otherwise."""
    counted, skipped, model, skipped_model = CountsTrainingSteps(), CountsTrainingSteps(), TinyModule(), TinyModule()
    for name in TRAINING_STEP_HOOKS:
        setattr(skipped, name, None)
        setattr(skipped_model, name, None)
    fit_tiny(tmp_path, model, [counted, skipped])
    fit_tiny(tmp_path, skipped_model, [])
    assert counted.calls == model.calls == dict.fromkeys(TRAINING_STEP_HOOKS, 3)
    assert skipped.calls == skipped_model.calls == dict.fromkeys(TRAINING_STEP_HOOKS, 0)


def test_skip_inherited_step_hooks_leaves_every_hook_that_does_something(tmp_path):
    class Overrides(CountsTrainingSteps):
        pass

    class ModelWithOneHook(L.LightningModule):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            pass

    def own_hook(*args):
        pass

    plain, overrides, patched, model = L.Callback(), Overrides(), L.Callback(), ModelWithOneHook()
    patched.on_before_backward = own_hook
    skip_inherited_step_hooks([plain, overrides, patched], model)
    assert all(getattr(plain, name) is None for name in TRAINING_STEP_HOOKS)
    assert all(callable(getattr(overrides, name)) for name in TRAINING_STEP_HOOKS)  # overridden in a parent class
    assert patched.on_before_backward is own_hook and patched.on_after_backward is None
    assert callable(plain.on_train_epoch_end) and callable(plain.on_validation_batch_end)  # per-epoch, validation: kept
    assert callable(model.on_train_batch_end)
    assert all(getattr(model, name) is None for name in TRAINING_STEP_HOOKS if name != "on_train_batch_end")


@pytest.mark.parametrize("settings, saves", [
    ({}, False), ({"every_n_train_steps": 0}, False), ({"every_n_train_steps": 2}, True), ({"train_time_interval": timedelta(0)}, True),
])
def test_saves_within_epochs_is_whether_lightnings_checkpoint_saves_from_its_batch_end_hook(tmp_path, settings, saves):
    """With epoch saves off (every_n_epochs=0), Lightning's ModelCheckpoint writes a file only from on_train_batch_end:
    it does for the settings saves_within_epochs names, and never for the others (which the template's ModelCheckpoint
    then does not call)."""
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=0, save_top_k=-1, **settings)
    assert saves_within_epochs(checkpoint) is saves
    fit_tiny(tmp_path, TinyRegression(), [checkpoint])
    assert bool(list((tmp_path / "ckpt").glob("*.ckpt"))) is saves


def test_norm_layers_cover_torchs_public_normalisation_layers():
    """The master copy keeps these in FP32: every public normalisation layer of torch.nn is one of them."""
    public = [getattr(torch.nn, name) for name in dir(torch.nn) if "Norm" in name and isinstance(getattr(torch.nn, name), type)
              and issubclass(getattr(torch.nn, name), torch.nn.Module) and name not in ("LocalResponseNorm", "CrossMapLRN2d")]
    assert len(public) >= 12  # BatchNorm1d-3d, the lazy ones, SyncBatchNorm, InstanceNorm1d-3d, LayerNorm, GroupNorm, RMSNorm
    assert all(issubclass(layer, NORM_LAYERS) for layer in public), [layer for layer in public if not issubclass(layer, NORM_LAYERS)]


def test_epochs_trained_is_the_count_of_epochs_a_checkpoint_finished(make_config, tmp_path):
    """Read where the fit loop keeps it: 2 finished epochs, also after a resume that adds a third."""
    from mnist_precision.cli.train import train

    train(make_config("trainer.max_epochs=2"))
    assert epochs_trained(torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)) == 2
    train(make_config("trainer.max_epochs=3", f"resume={tmp_path / 'run'}"))
    assert epochs_trained(torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)) == 3


def test_batches_processed_this_epoch_counts_the_epochs_trained_batches(tmp_path):
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, batches_processed_this_epoch(trainer)))

    fit_tiny(tmp_path, TinyRegression(), [Record()], batches=3)
    assert seen == [(0, 1), (1, 2), (2, 3)]


def test_run_after_closure_calls_the_optimizer_step_hooks_then_clips(monkeypatch):
    calls = []
    model = TinyRegression()
    model.trainer = L.Trainer(gradient_clip_val=0.5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, callbacks=[])
    model.trainer.strategy.connect(model)  # what a fit does before its first step
    plugin = model.trainer.precision_plugin
    monkeypatch.setattr(model, "on_before_optimizer_step", lambda optimizer: calls.append("hook"))
    monkeypatch.setattr(plugin, "clip_gradients", lambda optimizer, clip_val, gradient_clip_algorithm: calls.append(("clip", clip_val)))
    run_after_closure(plugin, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert calls == ["hook", ("clip", 0.5)]


def test_a_metric_state_put_back_with_its_update_count_computes_as_the_original():
    import warnings

    from torchmetrics import MeanMetric

    original = MeanMetric()
    original.update(torch.tensor([1.0, 2.0]))
    original.update(torch.tensor(6.0))
    assert metric_update_count(original) == 2
    copy = MeanMetric()
    restore_metric_state(copy, {name: value.clone() for name, value in original.metric_state.items()}, metric_update_count(original))
    assert metric_update_count(copy) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics warns when a metric computes with no update counted
        assert copy.compute() == original.compute() == 3.0


def test_torchaos_adamw_rounds_bfloat16_updates_stochastically():
    """precision=bf16-sr builds torchao's underscored AdamW: full-precision state, bf16_stochastic_round."""
    import inspect

    from hydra.utils import get_class

    adamw = get_class(TORCHAO_ADAMW)
    assert issubclass(adamw, torch.optim.Optimizer)
    assert {"lr", "betas", "eps", "weight_decay", "bf16_stochastic_round"} <= set(inspect.signature(adamw).parameters)
