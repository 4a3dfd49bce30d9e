"""Training through the machinery on the quadrants task: determinism, optimizers and schedulers, and what the training
monitor and the learning-rate monitor log for any module. (Every precision trains: the conformance suite.)"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from support import tensorboard_scalars

from mnist_precision.cli.train import train
from mnist_precision.kit.build import build_run

LIMITS = ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_16_mixed_on_cpu_really_uses_float16_autocast_and_loss_scaling(make_config):
    trainer = build_run(make_config("precision=16-mixed")).trainer
    assert trainer.precision == "16-mixed" and trainer.precision_plugin.scaler is not None
    with trainer.precision_plugin.forward_context():
        assert torch.nn.Linear(2, 2)(torch.rand(1, 2)).dtype == torch.float16


@pytest.mark.parametrize("precision", ["bf16-true", "16-master", "bf16-master"])
def test_a_metric_logged_from_a_step_takes_its_inputs_in_fp32_under_half_precisions(make_config, precision):
    """`self.log("val/loss", self.val_loss)` moves the metric inside the step, and torchmetrics takes its dtype from a
    tensor made then: under Lightning's half default dtype, every later value would be cast to half before it is
    averaged (val/loss quantised to 3 or 4 digits). The half default is set around the model's forward alone."""
    run = build_run(make_config(f"precision={precision}", "trainer.max_epochs=1"))
    run.fit()
    assert run.model.val_loss.dtype == torch.float32 and run.model.val_acc.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
    with run.trainer.precision_plugin.forward_context():  # (the plugin's context no longer changes it) ...
        assert torch.get_default_dtype() == torch.float32
    x = torch.rand(2, *next(iter(run.datamodule.val_dataloader()))[0].shape[1:]).to(run.trainer.precision_plugin.dtype)
    assert run.model(x).dtype == torch.float32  # ... the forward runs in half and returns FP32


@pytest.mark.parametrize("precision", ["bf16-true", pytest.param("bf16-master", marks=pytest.mark.slow)])
def test_under_ddps_forward_redirection_the_step_is_not_taken_for_the_models_forward(make_config, precision):
    """Under DDP Lightning calls a step through the wrapper's forward, which calls the module with its `forward` swapped
    for the step (`_ForwardRedirection`), and the step's `self(x)` calls it again: the half default dtype and the casts
    belong to the inner call alone. Taken for a forward, the step cast the whole batch to half (targets too) and left
    the half default dtype behind, which made later metric states half on rank 0 only: a DDP sweep's next job failed
    in its first all-gather."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    class Wrapper(torch.nn.Module):  # what DDP is to Lightning here: a forward that calls the wrapped module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    run = build_run(make_config(f"precision={precision}", "trainer.max_epochs=1"))
    run.fit()
    images, targets = next(iter(run.datamodule.val_dataloader()))
    seen = []
    run.model.register_forward_pre_hook(lambda module, args: seen.append([t.dtype for t in (args[0] if isinstance(args[0], tuple) else args)]))
    run.model.step = lambda batch: run.model(batch[0])  # a step that calls the model's forward, as training_step does
    _ForwardRedirection()(Wrapper(run.model), run.model, "step", (images, targets))
    assert torch.get_default_dtype() == torch.float32
    half = run.trainer.precision_plugin.dtype
    assert seen == [[images.dtype, targets.dtype], [half]]  # the step takes the batch as it is; the model's forward, half


@pytest.mark.parametrize(("setting", "load", "omp", "threads"), [
    ("auto", 0.2, None, 2),   # an idle machine: torch's default, one per core
    ("auto", 1.1, None, 1),   # another process keeps a core busy: one thread per free core
    ("auto", 3.5, None, 1),   # oversubscribed: never fewer than one
    ("auto", 3.5, "2", 2),    # OMP_NUM_THREADS is the user's choice: kept
    (3, 3.5, None, 3),        # a number is taken as it is
])
def test_threads_auto_keeps_torchs_default_unless_other_processes_keep_the_cores_busy(monkeypatch, setting, load, omp, threads):
    from mnist_precision.kit.build import intra_op_threads

    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert intra_op_threads(setting) == threads


def test_a_resumed_auto_run_keeps_the_thread_count_its_checkpoint_was_trained_with(make_config, tmp_path, monkeypatch):
    """A reduction split over another number of threads sums in another order: a resume is exact only on as many."""
    before = torch.get_num_threads()
    try:
        assert train(make_config("threads=2", "trainer.max_epochs=1"))["threads"] == 2
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # auto alone would now pick one thread
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert train(make_config("threads=auto", "trainer.max_epochs=2", f"resume={tmp_path / 'run'}"))["threads"] == 2
        assert train(make_config("threads=auto", "trainer.max_epochs=1", output_dir=tmp_path / "new"))["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_the_model_learns_the_task_and_the_best_monitored_value_is_reported(make_config):
    metrics = train(make_config("trainer.max_epochs=3"))
    assert metrics["test/acc"] > 0.9 and metrics["val/acc_best"] > 0.9
    assert metrics["val/acc_best"] >= metrics["val/acc"]


def test_same_seed_gives_identical_weights(make_config, tmp_path):
    for name in ("a", "b"):
        train(make_config("trainer.max_epochs=1", "net=quadrants_cnn", output_dir=tmp_path / name))
    a, b = load(tmp_path / "a/checkpoints/last.ckpt"), load(tmp_path / "b/checkpoints/last.ckpt")
    assert all(torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items())


def test_test_false_fits_without_testing_and_the_summary_says_so(make_config, tmp_path):
    from mnist_precision.kit.results import summary

    cfg = make_config("trainer.max_epochs=1", "test=false")
    metrics = train(cfg)
    assert "val/acc" in metrics and not any(name.startswith("test/") for name in metrics)
    assert summary(metrics, tmp_path, cfg).startswith("not tested (test=false)  val/acc_best=")


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("scheduler", ["none", "step", "exponential", "cosine"])  # onecycle needs the module's total steps: mnist_task
def test_optimizer_and_scheduler_groups_build_and_step(make_config, optimizer, scheduler):
    metrics = train(make_config(f"optimizer={optimizer}", f"scheduler={scheduler}", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                                *LIMITS))
    name = {"adam": "lr-Adam", "adamw": "lr-AdamW", "sgd": "lr-SGD"}[optimizer]
    assert metrics[name] > 0


def test_the_learning_rate_is_logged_as_the_schedule_sets_it(make_config, tmp_path):
    """Lightning's LearningRateMonitor: an epoch scheduler's rate at each epoch's start."""
    train(make_config("scheduler=step", "scheduler.lr_scheduler.step_size=1", "trainer.max_epochs=3", "trainer.limit_train_batches=4", *LIMITS))
    logged = tensorboard_scalars(tmp_path / "run", "lr-Adam")
    assert [value for _, value in logged] == pytest.approx([1e-3, 5e-4, 2.5e-4])


class RecordLosses(L.Callback):
    """Each training step's returned loss and batch size, as the module computed them."""

    def __init__(self) -> None:
        self.losses: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((float(outputs["loss"]), len(batch[0])))


def test_the_training_loss_is_logged_per_step_and_as_the_epochs_sample_mean_for_any_module(make_config, tmp_path):
    """The training monitor logs what training_step returns: train/loss_step on logging steps (every 2 here) and
    train/loss_epoch, the mean over the epoch's samples (7 batches: 6 of 64 and a last one of 32), read back through
    TensorBoard's reader. The task's module logs no loss of its own."""
    record = RecordLosses()
    run = build_run(make_config("trainer.max_epochs=1", "trainer.log_every_n_steps=2", "+data.train_size=416", *LIMITS))
    run.trainer.callbacks.append(record)
    run.fit()
    assert [size for _, size in record.losses] == [64] * 6 + [32]
    steps = tensorboard_scalars(tmp_path / "run", "train/loss_step")
    assert [step for step, _ in steps] == [1, 3, 5]
    assert [value for _, value in steps] == pytest.approx([record.losses[i][0] for i in (1, 3, 5)])
    mean = sum(loss * size for loss, size in record.losses) / sum(size for _, size in record.losses)
    assert tensorboard_scalars(tmp_path / "run", "train/loss_epoch")[0][1] == pytest.approx(mean, rel=1e-6)


def test_gradients_are_clipped_when_asked(make_config, monkeypatch):
    from lightning.pytorch.plugins.precision import Precision

    calls = []
    original = Precision.clip_gradients

    def recording(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None):
        if clip_val:
            calls.append((clip_val, str(gradient_clip_algorithm)))
        return original(self, optimizer, clip_val, gradient_clip_algorithm)

    monkeypatch.setattr(Precision, "clip_gradients", recording)
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]
    build_run(make_config(*limits)).fit()
    assert calls == []
    build_run(make_config(*limits, "trainer.gradient_clip_val=0.5", "+trainer.gradient_clip_algorithm=value")).fit()
    assert calls == [(0.5, "GradClipAlgorithmType.VALUE")] * 3


def test_debug_overfit_trains_on_the_same_batches_until_the_loss_is_near_zero(make_config):
    run = build_run(make_config("debug=overfit", "trainer.max_epochs=40", "data.loader=plain", "optimizer.lr=0.01"))
    run.fit()
    assert float(run.trainer.callback_metrics["train/loss_epoch"]) < 0.05


def test_without_a_gpu_torchs_per_step_nvml_probe_is_switched_off(make_config, monkeypatch):
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # what importing Lightning sets
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a GPU machine: left as it is
    build_run(make_config())
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU: every Adam step would probe NVML
    build_run(make_config())
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"


def test_a_module_whose_hyperparameters_hold_objects_is_refused_with_what_to_do():
    """Every checkpoint is loaded with weights_only=True: save_hyperparameters() of a network object would make the run's
    own checkpoints unreadable, so the build refuses it, naming the argument."""
    from mnist_precision.kit.checks import check_model
    from mnist_precision.kit.errors import UserError

    class SavesItsNet(L.LightningModule):
        def __init__(self, net: torch.nn.Module, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters(logger=False)
            self.net = net

    check_model(L.LightningModule())  # nothing saved: fine
    with pytest.raises(UserError, match=r"save_hyperparameters\(\) stored objects .*: net \(Linear\)\. Leave them out"):
        check_model(SavesItsNet(torch.nn.Linear(2, 2)))
