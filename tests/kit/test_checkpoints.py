"""The checkpoint callbacks: what Lightning's would do, kept current, at less cost per training step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from support import TinyRegression, fit_tiny

from mnist_precision.kit.build import build_run
from mnist_precision.kit.checkpoints import ModelCheckpoint


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
