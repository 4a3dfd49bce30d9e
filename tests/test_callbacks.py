"""The template's own callbacks keep what Lightning's would do, at less cost per training step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TinyRegression, fit_tiny

from mnist_precision.build import build_run
from mnist_precision.callbacks import ModelCheckpoint
from mnist_precision.private_api import TRAINING_STEP_HOOKS


def test_kept_epoch_checkpoints_hold_the_state_of_their_epoch(make_config, tmp_path):
    run = build_run(make_config("trainer.max_epochs=4", "callbacks.last_checkpoint.keep_every_n_epochs=2"))
    run.fit()
    checkpoints = tmp_path / "run/checkpoints"
    kept = sorted(path.name for path in checkpoints.glob("epoch_*.ckpt"))
    assert kept == ["epoch_001.ckpt", "epoch_003.ckpt"]
    for name, steps in [("epoch_001.ckpt", 2 * 8), ("epoch_003.ckpt", 4 * 8)]:
        assert torch.load(checkpoints / name, weights_only=True)["global_step"] == steps
    last, final = torch.load(checkpoints / "last.ckpt", weights_only=True), torch.load(checkpoints / "epoch_003.ckpt", weights_only=True)
    assert all(torch.equal(last["state_dict"][k], final["state_dict"][k]) for k in last["state_dict"])


def test_the_cached_state_key_is_lightnings_own(tmp_path):
    ours = ModelCheckpoint(dirpath=str(tmp_path), monitor="val/acc", mode="max", every_n_epochs=3)
    lightnings = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), monitor="val/acc", mode="max", every_n_epochs=3)
    assert ours.state_key == lightnings.state_key == ours.state_key


@pytest.mark.parametrize("every_n_train_steps, saved", [(None, set()), (3, {3, 6})])
def test_the_best_checkpoints_batch_end_hook_runs_only_when_it_saves_within_epochs(tmp_path, monkeypatch, every_n_train_steps, saved):
    """Configured to save by epoch (the template's), ModelCheckpoint returns from on_train_batch_end without Lightning's
    checks; asked to save every N steps, it still does."""
    calls = []
    original = L.pytorch.callbacks.ModelCheckpoint.on_train_batch_end
    monkeypatch.setattr(L.pytorch.callbacks.ModelCheckpoint, "on_train_batch_end",
                        lambda self, trainer, *args: calls.append(trainer.global_step) or original(self, trainer, *args))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=0, save_top_k=-1, every_n_train_steps=every_n_train_steps)
    fit_tiny(tmp_path, TinyRegression(), [checkpoint], batches=6)
    assert calls == ([] if every_n_train_steps is None else [1, 2, 3, 4, 5, 6])
    assert {torch.load(path, weights_only=True)["global_step"] for path in (tmp_path / "ckpt").glob("*.ckpt")} == saved


@pytest.mark.parametrize("bar, bar_hooks", [
    (["callbacks.progress_bar._target_=mnist_precision.callbacks.EpochLines", "~callbacks.progress_bar.refresh_rate"], set()),
    (["callbacks.progress_bar._target_=mnist_precision.callbacks.StepLossBar"], {("StepLossBar", "on_train_batch_end")}),  # TQDM's
], ids=["epoch lines", "tqdm"])
def test_training_steps_call_only_the_callback_hooks_that_do_something(make_config, bar, bar_hooks):
    """Every training-step hook a callback inherits empty from Callback is off, and so are the model's (MNISTClassifier
    overrides none); those a callback's class overrides stay on. The test figures and the model summary, in the trainer
    from the start, cost a training step nothing."""
    run = build_run(make_config("trainer.max_epochs=1", "trainer.enable_model_summary=true", "trainer.enable_progress_bar=true", *bar))
    names = {type(callback).__name__ for callback in run.trainer.callbacks}
    assert {"TestFigures", "ModelCheckpoint", "LastCheckpoint", "TrainingMonitor"} <= names
    assert any("ModelSummary" in name for name in names)
    called = {(type(callback).__name__, name) for callback in run.trainer.callbacks for name in TRAINING_STEP_HOOKS
              if callable(getattr(callback, name))}
    assert called == {
        ("TrainingMonitor", "on_train_batch_start"), ("TrainingMonitor", "on_train_batch_end"),
        ("ModelCheckpoint", "on_train_batch_end"), ("LastCheckpoint", "on_train_batch_end"), *bar_hooks,
    }
    assert all(getattr(run.model, name) is None for name in TRAINING_STEP_HOOKS)
    run.fit()
    assert run.trainer.global_step == run.trainer.num_training_batches > 0
    assert "test/acc" in run.test()
