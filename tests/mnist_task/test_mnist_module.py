"""The MNIST task's LightningModule and what it adds to the machinery: its metrics are the means over every image, its
checkpoints rebuild it with `load_from_checkpoint`, its one-cycle schedule spans the run, its test figures reach
TensorBoard, and its configs refuse bad values in one message."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from support import load, only_run_dir, tensorboard_events

from mnist_precision.cli import train as train_cli
from mnist_precision.cli.train import train
from mnist_precision.kit.build import build_run
from mnist_precision.task.figures import prediction_grid, prediction_table
from mnist_precision.task.module import MNISTClassifier

LIMITS = ["trainer.max_epochs=1", "trainer.limit_test_batches=1"]


def test_val_loss_and_acc_are_the_mean_loss_and_accuracy_over_every_validation_image(make_config):
    """The logged values equal a direct pass over the validation set, whose last batch is smaller (128 images in batches
    of 100), where a mean of batch means would differ."""
    run = build_run(make_config(*LIMITS))
    run.fit()
    model, loss_sum, correct, images_seen = run.model.eval(), 0.0, 0, 0
    with torch.no_grad():
        for images, labels in run.datamodule.val_dataloader():
            logits = model(run.datamodule.transform(images))
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum())
            images_seen += len(images)
    assert images_seen == 128
    logged = run.trainer.callback_metrics
    assert float(logged["val/loss"]) == pytest.approx(loss_sum / images_seen, rel=1e-5)
    assert float(logged["val/acc"]) == pytest.approx(correct / images_seen, abs=1e-7)


def test_train_acc_is_the_accuracy_over_every_training_image_of_the_epoch(make_config):
    run = build_run(make_config(*LIMITS, "trainer.limit_train_batches=7", "trainer.limit_val_batches=1"))
    step_logits, step_labels = [], []

    class RecordLabels(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step_labels.append(batch[1])

    def record_training_logits(net, inputs, logits):
        if run.trainer.training:  # not validation's
            step_logits.append(logits.detach())

    run.model.net.register_forward_hook(record_training_logits)
    run.trainer.callbacks.append(RecordLabels())
    run.fit()
    logits, labels = torch.cat(step_logits), torch.cat(step_labels)
    assert len(step_logits) == 7 and len(logits) == 7 * 64
    assert float(run.trainer.callback_metrics["train/acc"]) == pytest.approx(float((logits.argmax(1) == labels).float().mean()), abs=1e-7)


def test_load_from_checkpoint_rebuilds_the_trained_module(make_config, tmp_path):
    """The module takes its network's, optimizer's and scheduler's configs: its checkpoint holds them as plain values
    (loadable with weights_only=True), and Lightning's load_from_checkpoint builds the same module from them."""
    run = build_run(make_config(*LIMITS, "net=cnn", "precision=bf16-mixed"))
    run.fit()
    checkpoint = load(tmp_path / "run/checkpoints/last.ckpt")
    assert checkpoint["hyper_parameters"]["net"]["_target_"] == "mnist_precision.task.nets.paper_cnn"
    loaded = MNISTClassifier.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu").eval()
    images = next(iter(run.datamodule.test_dataloader()))[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(images), run.model.eval()(images))


def test_the_one_cycle_schedule_spans_every_optimizer_step_of_the_run(make_config):
    run = build_run(make_config("scheduler=onecycle", "trainer.max_epochs=2", "trainer.limit_val_batches=1"))
    run.fit()
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == run.trainer.global_step == 16


def test_the_test_figures_reach_tensorboard(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=1").code == 0
    images = tensorboard_events(only_run_dir(tmp_path / "logs")).Tags()["images"]
    assert "test/predictions" in images and "test/confusion_matrix" in images


def test_prediction_grid_frames_wrong_predictions_in_red():
    images = torch.full((4, 1, 28, 28), 0.5)
    preds, labels = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])
    grid = prediction_grid(images, preds, labels)  # 8 per row: one row of four 28x28 tiles, padding 2
    tile = lambda k: grid[:, 2 : 2 + 28, 2 + 30 * k : 2 + 30 * k + 28]  # noqa: E731
    red = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(tile(1)[:, 0, 0], red) and torch.equal(tile(3)[:, 0, 0], red)  # wrong: framed
    assert not torch.equal(tile(0)[:, 0, 0], red) and not torch.equal(tile(2)[:, 0, 0], red)
    assert "**2 (0)**" in prediction_table(preds, labels)


@pytest.mark.slow  # about 3 s: four networks
@pytest.mark.parametrize("master, autocast", [("16-master", "16-mixed"), ("bf16-master", "bf16-mixed")])
def test_the_standardisation_runs_in_fp32_under_the_master_copy_as_under_autocast(make_config, tmp_path, master, autocast):
    """The data module standardises images on the device (on_after_batch_transfer); the half precisions cast the inputs
    only where the model takes them, so its MLP's FP32 masters equal autocast's FP32 weights to the bit (the images were
    once cast to half before they were standardised: the first step differed)."""
    train(make_config(f"precision={autocast}", "trainer.max_epochs=1", output_dir=tmp_path / "autocast"))
    train(make_config(f"precision={master}", "trainer.max_epochs=1", output_dir=tmp_path / "master"))
    weights = load(tmp_path / "autocast/checkpoints/last.ckpt")["state_dict"]
    masters = load(tmp_path / "master/checkpoints/last.ckpt")["MasterCopyPrecision"]["masters"]
    assert masters and all(torch.equal(weights[name], masters[name]) for name in masters)


def test_every_network_trains_under_the_master_copy(make_config):
    for net in ("mlp", "cnn", "convnet", "speedrun_cnn"):
        metrics = train(make_config(f"net={net}", "precision=16-master", "debug=fdr"))
        assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"])), net


BAD_INPUTS = {
    "batch size zero": (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    "val split too large": (["data.val_size=640"], "data.val_size=640 must be between 1 and 639"),
    "bad on_device": (["data.on_device=maybe"], "data.on_device must be one of auto, true, false, got 'maybe'"),
    "bad pipeline": (["data.pipeline=fast"], "data.pipeline must be one of resident, per_sample, got 'fast'"),
    "zero-width layer": (["net.hidden=0"], "net.hidden must be >= 1, got 0"),
    "zero-width layer the schema cannot see": (["net=speedrun_cnn", "net.channels=[0,32]"],
                                              "model: layers with no weights cannot train: net.0.weight (0, 1, 5, 5)"),
    "a value of the wrong type": (["data.normalize=maybe"], "Value 'maybe' is not a valid bool"),
    "a key the schema does not have": (["data.nonsense=1"], "Key 'nonsense' not in 'DataConfig'"),
    "an unknown network argument": (["+net.depth=3"], "model: mlp() got an unexpected keyword argument 'depth'"),
    "too few classes": (["model.num_classes=1"], "model.num_classes must be >= 2, got 1"),
    "a network habit of lightning-hydra-template": (["model=mnist"], "Could not find 'model/mnist'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_one_clear_message(run_main, tmp_path, case):
    args, message = BAD_INPUTS[case]
    result = run_main(train_cli.main, *args)
    assert result.code != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not list((tmp_path / "logs").glob("train/*"))


def test_missing_data_files_exit_with_the_expected_files(run_main, tmp_path):
    result = run_main(train_cli.main, f"data.data_dir={tmp_path / 'empty'}", "data.download=false")
    assert result.code == 1 and "train-images-idx3-ubyte" in result.stderr and "MNIST_ROOT=" in result.stderr


def test_data_dir_that_is_a_file_is_refused(run_main, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    result = run_main(train_cli.main, f"data.data_dir={tmp_path / 'a_file'}")
    assert result.code == 1 and "is not a directory (it should hold MNIST/raw/)" in result.stderr


def test_help_lists_the_mnist_tasks_options(run_main):
    result = run_main(train_cli.main, "--help", fast=False)
    for group, options in {"data": ["mnist"], "net": ["mlp", "cnn", "convnet", "speedrun_cnn", "wide_mlp"], "model": ["classifier"],
                           "experiment": ["flux_mlp", "paper_cnn", "convnet", "speedrun"]}.items():
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{group}:"))
        assert all(option in line for option in options), line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (issue 9, part C: run on the device)")
def test_data_on_device_auto_keeps_the_splits_on_the_gpu(make_config):
    run = build_run(make_config("trainer=gpu", *LIMITS, "data.on_device=auto"))
    run.fit()
    assert all(images.is_cuda and labels.is_cuda for images, labels in run.datamodule.splits.values())


@pytest.mark.slow  # about 15 s: a run, then its export in every format with int8's calibration
def test_exported_programs_take_images_in_unit_range_and_standardise_them_themselves(run_main, tmp_path):
    """The data module standardises on the device (its `transform`); mnist-export puts that in front of the model, so a
    program takes images in [0, 1], as a deployed one is given them."""
    import json

    from mnist_precision.task.data import MNIST_MEAN, MNIST_STD
    from mnist_precision.tools import export as export_cli

    assert run_main(train_cli.main, "precision=16-master", "trainer.max_epochs=2").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    assert run_main(export_cli.main, f"ckpt_path={run_dir}", "export.latency_runs=2", fast=False).code == 0
    results = json.loads((run_dir / "export/export.json").read_text())
    assert results["int8"]["bytes"] <= 0.35 * results["fp32"]["bytes"] and results["fp16"]["bytes"] < 0.6 * results["fp32"]["bytes"]
    assert all(abs(row["test/acc"] - results["fp32"]["test/acc"]) <= 0.02 for row in results.values())
    images = torch.rand(5, 1, 28, 28)
    module = MNISTClassifier.load_from_checkpoint(run_dir / "checkpoints/last.ckpt", map_location="cpu").eval()
    from mnist_precision.kit.master_precision import fp32_state_dict

    module.load_state_dict(fp32_state_dict(load(run_dir / "checkpoints/last.ckpt")))
    with torch.no_grad():
        expected = module.float()((images - MNIST_MEAN) / MNIST_STD)
        torch.testing.assert_close(torch.export.load(run_dir / "export/fp32.pt2").module()(images), expected, rtol=1e-4, atol=1e-4)
