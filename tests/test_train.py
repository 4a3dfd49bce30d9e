"""Training in-process: every precision, determinism, exact resume, the non-finite-loss guard, optimizers, schedulers."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tensorboard_scalars
from omegaconf import open_dict

from mnist_precision.build import build_run
from mnist_precision.errors import TrainingDiverged
from mnist_precision.train import train

BUILT_IN_PRECISIONS = ["32", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer_states"][0]["state"].items(), b["optimizer_states"][0]["state"].items(), strict=True):
        assert ka == kb
        for name in va:
            assert torch.equal(torch.as_tensor(va[name]), torch.as_tensor(vb[name])), (ka, name)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]


@pytest.mark.parametrize("precision", BUILT_IN_PRECISIONS)
def test_every_built_in_precision_trains_and_tests_on_cpu(make_config, precision):
    # SGD: pure float16 Adam diverges by design (tested below); every precision must give finite results here.
    metrics = train(make_config(f"precision={precision}", "debug=fdr", "optimizer=sgd"))
    assert 0 <= metrics["test/acc"] <= 1 and torch.isfinite(torch.tensor(metrics["test/loss"]))


def test_16_mixed_on_cpu_really_uses_float16_autocast_and_loss_scaling(make_config):
    from mnist_precision.build import build_run

    trainer = build_run(make_config("precision=16-mixed")).trainer
    assert trainer.precision == "16-mixed" and trainer.precision_plugin.scaler is not None
    with trainer.precision_plugin.forward_context():
        assert torch.nn.Linear(2, 2)(torch.rand(1, 2)).dtype == torch.float16


def test_the_model_learns_the_synthetic_digits(make_config):
    metrics = train(make_config("trainer.max_epochs=3"))
    assert metrics["test/acc"] > 0.9 and metrics["val/acc_best"] > 0.9


def test_same_seed_gives_identical_weights(make_config, tmp_path):
    first = make_config("trainer.max_epochs=1", output_dir=tmp_path / "a")
    second = make_config("trainer.max_epochs=1", output_dir=tmp_path / "b")
    train(first)
    train(second)
    assert_same_training_state(load(tmp_path / "a/checkpoints/last.ckpt"), load(tmp_path / "b/checkpoints/last.ckpt"))


def straight_and_resumed(make_config, tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    """The last checkpoints of 4 uninterrupted epochs and of 2 epochs resumed (resume=) to 4."""
    train(make_config(*overrides, "trainer.max_epochs=4", output_dir=tmp_path / "straight"))
    interrupted = make_config(*overrides, "trainer.max_epochs=2", output_dir=tmp_path / "resumed")
    train(interrupted)
    with open_dict(interrupted):
        interrupted.trainer.max_epochs = 4
        interrupted.resume = str(tmp_path / "resumed")
    train(interrupted)
    straight, resumed = load(tmp_path / "straight/checkpoints/last.ckpt"), load(tmp_path / "resumed/checkpoints/last.ckpt")
    assert resumed["global_step"] == 4 * 8  # 4 epochs of 8 batches: the resumed run really trained on
    return straight, resumed


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_resume_is_exact(make_config, tmp_path, precision):
    """2 epochs, then resume to 4, gives bit-identical weights and optimizer state to 4 uninterrupted epochs."""
    common = [f"precision={precision}", "model=convnet", "model.channels=4", "scheduler=step", "scheduler.lr_scheduler.step_size=1"]
    straight, resumed = straight_and_resumed(make_config, tmp_path, *common)
    assert_same_training_state(straight, resumed)
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]


def test_pure_fp16_with_the_flux_settings_is_stopped_by_the_guard(make_config):
    with pytest.raises(TrainingDiverged, match=r"at step \d+ .*precision=16-true.*16-master"):
        train(make_config("precision=16-true", "optimizer.lr=1e-4", "trainer.max_epochs=1"))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("scheduler", ["none", "step", "exponential", "cosine", "onecycle"])
def test_optimizer_and_scheduler_groups_build_and_step(make_config, optimizer, scheduler):
    cfg = make_config(f"optimizer={optimizer}", f"scheduler={scheduler}", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                      "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    metrics = train(cfg)
    assert metrics["lr"] > 0


@pytest.mark.parametrize(("scheduler", "rates"), [(["scheduler=none"], [1e-3] * 3),
                                                   (["scheduler=step", "scheduler.lr_scheduler.step_size=1"], [1e-3, 5e-4, 2.5e-4])])
def test_a_learning_rate_constant_through_the_epoch_is_logged_once_an_epoch(make_config, tmp_path, scheduler, rates):
    """No scheduler, or one that steps per epoch: one `lr` point per epoch (the rate that epoch trained with), not one per
    logging step (a self.log call each, 0.2-0.7 ms)."""
    cfg = make_config(*scheduler, "trainer.max_epochs=3", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
                      "trainer.limit_test_batches=1")  # logging every step (FAST)
    train(cfg)
    logged = tensorboard_scalars(tmp_path / "run", "lr")
    assert [value for _, value in logged] == pytest.approx(rates)
    assert [step for step, _ in logged] == [3, 7, 11]  # each epoch's last step, as Lightning logs epoch values


def test_a_learning_rate_that_changes_every_step_is_logged_on_logging_steps(make_config, tmp_path):
    cfg = make_config("scheduler=onecycle", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
                      "trainer.limit_test_batches=1", "trainer.log_every_n_steps=2")
    train(cfg)
    logged = tensorboard_scalars(tmp_path / "run", "lr")
    assert [step for step, _ in logged] == [1, 3, 5, 7]
    assert len({value for _, value in logged}) == 4  # one-cycle: a new rate every step


def test_val_loss_and_acc_are_the_mean_loss_and_accuracy_over_every_validation_image(make_config):
    """Validation sums per batch and logs once at its end: the logged values equal a direct pass over the validation
    set, whose last batch is smaller (128 images in batches of 100), where a mean of batch means would differ."""
    run = build_run(make_config("trainer.max_epochs=1", "trainer.limit_test_batches=1"))
    run.fit()
    model, loss_sum, correct, images_seen = run.model.eval(), 0.0, 0, 0
    with torch.no_grad():
        for images, one_hot in run.datamodule.val_dataloader():
            logits = model(images)
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), one_hot.float(), reduction="sum").item()
            correct += int((logits.argmax(dim=1) == one_hot.argmax(dim=1)).sum())
            images_seen += len(images)
    assert images_seen == 128
    logged = run.trainer.callback_metrics
    assert float(logged["val/loss"]) == pytest.approx(loss_sum / images_seen, rel=1e-5)
    assert float(logged["val/acc"]) == pytest.approx(correct / images_seen, abs=1e-7)


@pytest.mark.parametrize("fold_every", [3, 32], ids=["folded mid-epoch", "folded at epoch end"])
def test_train_loss_and_acc_are_the_mean_loss_and_accuracy_over_every_training_image(make_config, monkeypatch, fold_every):
    """A training batch keeps its logits and targets and their sums are made every FOLD_EVERY batches and at the epoch's
    end: the logged epoch values equal each step's own logits and targets summed directly (7 batches of 64, 3 folds
    of 3, 3 and 1 batches, or one of 7)."""
    from mnist_precision.classifier import RunningSums

    monkeypatch.setattr(RunningSums, "FOLD_EVERY", fold_every)
    run = build_run(make_config("trainer.max_epochs=1", "trainer.limit_train_batches=7", "trainer.limit_val_batches=1",
                                "trainer.limit_test_batches=1"))
    step_logits, step_targets = [], []

    class RecordTargets(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step_targets.append(batch[1])

    def record_training_logits(net, inputs, logits):
        if run.trainer.training:  # not validation's
            step_logits.append(logits.detach())

    run.model.net.register_forward_hook(record_training_logits)
    run.trainer.callbacks.append(RecordTargets())
    run.fit()
    logits, one_hot = torch.cat(step_logits), torch.cat(step_targets)
    assert len(step_logits) == len(step_targets) == 7 and len(logits) == 7 * 64
    logged = run.trainer.callback_metrics
    loss = torch.nn.functional.cross_entropy(logits, one_hot, reduction="sum") / len(logits)
    assert float(logged["train/loss_epoch"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(logged["train/acc"]) == pytest.approx(float((logits.argmax(1) == one_hot.argmax(1)).float().mean()), abs=1e-7)


def test_gradients_are_clipped_only_when_asked(make_config, monkeypatch):
    """MNISTClassifier's configure_gradient_clipping hands a clip value on to Lightning (by norm or by value, each step) and
    skips Lightning's per-step checks without one: the precision plugin's clip_gradients is then never called."""
    from lightning.pytorch.plugins.precision import Precision

    calls = []
    original = Precision.clip_gradients

    def recording(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None):
        calls.append((clip_val, str(gradient_clip_algorithm)))
        return original(self, optimizer, clip_val, gradient_clip_algorithm)

    monkeypatch.setattr(Precision, "clip_gradients", recording)
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]
    build_run(make_config(*limits)).fit()
    assert calls == []
    build_run(make_config(*limits, "trainer.gradient_clip_val=0.5", "+trainer.gradient_clip_algorithm=value")).fit()
    assert calls == [(0.5, "GradClipAlgorithmType.VALUE")] * 3


def test_lightning_reads_training_steps_signature_from_its_cache():
    """Lightning asks inspect on every step whether training_step takes batch_idx; inspect answers from __signature__."""
    import inspect

    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    from mnist_precision.classifier import MNISTClassifier

    model = MNISTClassifier(torch.nn.Linear(784, 10), optimizer=torch.optim.SGD)
    assert inspect.signature(model.training_step, follow_wrapped=False).parameters.keys() == {"batch", "batch_idx"}
    assert inspect.signature(MNISTClassifier.training_step) is MNISTClassifier.training_step.__signature__
    assert inspect.getfullargspec(model.training_step).args == ["self", "batch", "batch_idx"]
    assert is_param_in_hook_signature(model.training_step, "batch_idx", min_args=2)


def test_prediction_grid_frames_wrong_predictions_in_red():
    from mnist_precision.callbacks import prediction_grid, prediction_table

    images = torch.full((4, 1, 28, 28), 0.5)
    preds, labels = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])
    grid = prediction_grid(images, preds, labels)  # 8 per row: one row of four 28x28 tiles, padding 2
    tile = lambda k: grid[:, 2 : 2 + 28, 2 + 30 * k : 2 + 30 * k + 28]  # noqa: E731
    red = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(tile(1)[:, 0, 0], red) and torch.equal(tile(3)[:, 0, 0], red)  # wrong: framed
    assert not torch.equal(tile(0)[:, 0, 0], red) and not torch.equal(tile(2)[:, 0, 0], red)
    assert "**2 (0)**" in prediction_table(preds, labels)


def test_debug_overfit_trains_on_the_same_batches_until_the_loss_is_near_zero(make_config):
    from mnist_precision.build import build_run

    run = build_run(make_config("debug=overfit", "trainer.max_epochs=30", "trainer.enable_model_summary=false"))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    loader = run.datamodule.train_dataloader()
    assert loader.sampler.shuffle is False
    assert float(run.trainer.callback_metrics["train/loss_epoch"]) < 0.01


def test_without_a_gpu_torchs_per_step_nvml_probe_is_switched_off(make_config, monkeypatch):
    from mnist_precision.build import build_run

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # what importing Lightning sets
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a GPU machine: left as it is
    build_run(make_config())
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU: every Adam step would probe NVML
    build_run(make_config())
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"


def test_the_classifier_sets_plain_attributes_directly_and_still_registers_parameters_modules_and_buffers():
    from mnist_precision.classifier import MNISTClassifier
    from mnist_precision.models import mlp

    model = MNISTClassifier(mlp(), optimizer=torch.optim.SGD)
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


def test_a_steady_state_training_step_sets_no_attribute_through_nn_modules_setattr(make_config, monkeypatch):
    """Lightning sets the running hook's name on the module ~44 times a step: each takes the classifier's direct path."""
    import lightning as L

    from mnist_precision.build import build_run
    from mnist_precision.classifier import MNISTClassifier

    counting = {"module": False}
    sets = {"classifier": 0, "nn.Module": 0}

    def counted(cls, key):
        original = cls.__setattr__

        def setattr_(self, name, value):
            if counting["module"] and isinstance(self, MNISTClassifier):
                sets[key] += 1
            original(self, name, value)

        return setattr_

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counted(torch.nn.Module, "nn.Module"))
    monkeypatch.setattr(MNISTClassifier, "__setattr__", counted(MNISTClassifier, "classifier"))

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counting["module"] = batch_idx >= 2

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counting["module"] = False

    run = build_run(make_config("trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"))
    run.trainer.callbacks.insert(0, Count())
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert sets["classifier"] >= 6 * 10  # batches 2-7, each many hook names
    assert sets["nn.Module"] == 0
