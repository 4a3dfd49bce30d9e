"""The template's own callbacks keep what Lightning's would do, at less cost per training step."""

from __future__ import annotations

import lightning as L
import torch

from mnist_precision.build import build_run
from mnist_precision.callbacks import ModelCheckpoint


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


def test_test_only_callbacks_stay_out_of_training_and_join_for_the_test(make_config):
    run = build_run(make_config("trainer.max_epochs=1"))
    test_only = {type(callback).__name__ for callback in run.test_callbacks}
    assert test_only == {"TestFigures"}
    run.fit()
    assert not any(type(callback).__name__ in test_only for callback in run.trainer.callbacks)
    run.test()
    assert sum(type(callback).__name__ == "TestFigures" for callback in run.trainer.callbacks) == 1
