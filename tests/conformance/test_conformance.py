"""The conformance suite: the machinery's guarantees, checked on a task.

It runs on the task the config names, on a few batches of its own test data (mnist_task/harness.py: a user who replaces
the task gives their own), and on the quadrants task, written as a user would write theirs, with a plain DataLoader
and with torchdata's StatefulDataLoader. Every test here asks the task for nothing but its configs and its data:
every precision trains; 2 + 2 epochs equal 4; SIGTERM mid-epoch then resume is exact wherever the loader can save its
position, and says what differs where it cannot; the non-finite-loss guard stops a run at its first bad step; a
scheduler stepping with the optimizer holds on a step the loss scaler skipped; a step that does not log reads nothing
on the host (with a fused optimizer); the trained model exports to programs that load and run; and `compile=true`
trains under every precision, without compiling again for the epoch's last batch, into checkpoints an uncompiled run
takes (and the other way round).
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from host_reads import count_host_reads
from omegaconf import open_dict
from support import assert_same_epoch_scalars, assert_same_training_state, compose_config, load, quadrants, straight_and_resumed

from mnist_precision.cli.train import train
from mnist_precision.kit.build import build_run
from mnist_precision.kit.checkpoints import loader_saves_position
from mnist_precision.kit.errors import TrainingDiverged, TrainingInterrupted

PRECISIONS = ["32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "16-master", "bf16-master",
              *(pytest.param(name, marks=pytest.mark.slow) for name in ("bf16-kahan", "bf16-sr", "fp8"))]  # (in the fast suite's
# 2 + 2 below; torchao compiles its update for each parameter shape)
# The recipes beyond mixed precision: their optimizer states (Kahan buffers, torchao's low-bit states) resume exactly too.
RECIPES = ["precision=bf16-kahan", *(pytest.param(recipe, marks=pytest.mark.slow) for recipe in
                                     ["precision=bf16-sr", "optimizer=adamw8bit", "precision=bf16-sr optimizer=adamw4bit",
                                      "precision=fp8"])]
TASKS = ["configured", "quadrants, plain loader", "quadrants, stateful loader"]


@pytest.fixture(params=TASKS)
def task(request, configured_task):
    return {"configured": configured_task, TASKS[1]: quadrants("plain"), TASKS[2]: quadrants("stateful")}[request.param]


@pytest.fixture
def configured(configured_task, tmp_path):
    """make_config on the configured task alone (its network has tensors large enough for torchao to quantise their
    optimizer state; what the compile tests check is the machinery's, not the loader's)."""
    def make_config(*overrides: str, output_dir: Path | None = None):
        return compose_config(configured_task, list(overrides), output_dir or tmp_path / "run")

    return make_config


def saves_position(make_config) -> bool:
    """Whether the task's training loader can save its position within an epoch (Lightning then restores it)."""
    run = build_run(make_config())
    run.datamodule.setup("fit")
    return loader_saves_position(run.datamodule.train_dataloader())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_a_step_validates_and_tests(make_config, precision):
    metrics = train(make_config(f"precision={precision}", "debug=fdr"))
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
    assert any(name.startswith("val/") for name in metrics) and any(name.startswith("test/") for name in metrics)


def test_two_plus_two_epochs_equal_four(make_config, tmp_path, task, request):
    """Resumed at an epoch boundary (resume=), a run ends bit-identical to an uninterrupted one: weights, optimizer and
    scheduler state, steps."""
    if task == quadrants("stateful"):
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "torchdata 0.11's StatefulDataLoader restores a state saved after its epoch's last batch as a pass with nothing "
            "left, not as the start of the next epoch (meta-pytorch/data#1437), so the batches after such a resume differ")))
    straight, resumed = straight_and_resumed(make_config, tmp_path, "scheduler=step", "scheduler.lr_scheduler.step_size=1")
    assert_same_training_state(straight, resumed)
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_plus_two_epochs_equal_four_with_each_recipe(configured, tmp_path, recipe):
    straight, resumed = straight_and_resumed(configured, tmp_path, *recipe.split())
    assert_same_training_state(straight, resumed)


def test_an_epoch_end_resume_says_when_it_cannot_be_exact(make_config, tmp_path, task):
    """Where the loader's epoch-end state does not resume exactly (torchdata's StatefulDataLoader, above), the resume
    says so; elsewhere it says nothing."""
    import warnings

    train(make_config("trainer.max_epochs=1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(make_config("trainer.max_epochs=2", f"resume={tmp_path / 'run'}"))
    said = [str(warning.message) for warning in caught if "meta-pytorch/data#1437" in str(warning.message)]
    assert bool(said) == (task == quadrants("stateful")), said


def with_signal(step: int) -> list[str]:
    return ["+callbacks.fault._target_=fault_injection.SendSignalAtStep", f"+callbacks.fault.signum={int(signal.SIGTERM)}",
            f"+callbacks.fault.step={step}"]


@pytest.mark.parametrize("recipe", ["precision=32", "precision=16-master", pytest.param("precision=bf16-kahan", marks=pytest.mark.slow)])
def test_sigterm_mid_epoch_then_resume_is_exact_where_the_loader_saves_its_position(make_config, tmp_path, recipe):
    """SIGTERM in the second epoch (after 3 of its batches) saves the state at that batch boundary; a resume to the end of
    the third epoch equals an uninterrupted run where the loader can save its position, and where it cannot the stop
    and the resume say so (never "exact")."""
    sigterm_then_resume(make_config, tmp_path, recipe.split())


@pytest.mark.slow  # torchao compiles its update for each parameter shape
def test_sigterm_mid_epoch_then_resume_is_exact_with_a_low_bit_optimizer_state(configured, tmp_path):
    sigterm_then_resume(configured, tmp_path, ["precision=bf16-sr", "optimizer=adamwfp8"])


def sigterm_then_resume(make_config, tmp_path: Path, recipe: list[str]) -> None:
    common = [*recipe, "trainer.max_epochs=3"]
    train(make_config(*common, output_dir=tmp_path / "straight"))
    cfg = make_config(*common, *with_signal(11), output_dir=tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg)
    assert stopped.value.exit_code == 128 + signal.SIGTERM and load(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 11
    with open_dict(cfg):
        del cfg.callbacks.fault
        cfg.resume = str(tmp_path / "run")
    exact = saves_position(make_config)
    if exact:
        assert "the exact state is saved" in str(stopped.value)
        train(cfg)
        assert_same_training_state(load(tmp_path / "straight/checkpoints/last.ckpt"), load(tmp_path / "run/checkpoints/last.ckpt"))
        assert_same_epoch_scalars(tmp_path / "straight", tmp_path / "run")  # the cut epoch reports as a whole one
    else:
        assert "not exactly" in str(stopped.value) and "exact state" not in str(stopped.value)
        with pytest.warns(UserWarning, match=r"not exactly: the training loader cannot save its position"):
            train(cfg)


STOPS = {"max_steps": ["trainer.max_steps=11"],  # 3 batches into the second epoch
         "max_time": ["+trainer.max_time={seconds: 1}", "+callbacks.slow._target_=fault_injection.SleepAtStep",
                      "+callbacks.slow.step=11", "+callbacks.slow.seconds=1.5"]}  # at step 11, or sooner on a slow machine


@pytest.mark.parametrize("stop", [pytest.param("max_steps"), pytest.param("max_time", marks=pytest.mark.slow)])  # (slow: it sleeps)
def test_a_run_stopped_mid_epoch_and_resumed_reports_its_epochs_as_an_uninterrupted_one(make_config, tmp_path, stop, capsys):
    """After a max_steps or max_time stop and a resume, every logged scalar of the finished epochs (the training
    monitor's loss, the task's metrics, validation) equals an uninterrupted run's, and the cut epoch gets its line."""
    if not saves_position(make_config):
        pytest.skip("this loader cannot save its position, so a mid-epoch resume is not exact (and says so: the test above)")
    train(make_config("trainer.max_epochs=3", output_dir=tmp_path / "straight"))
    cfg = make_config("trainer.max_epochs=3", *STOPS[stop], output_dir=tmp_path / "run")
    train(cfg)
    stopped_at = load(tmp_path / "run/checkpoints/last.ckpt")["global_step"]
    assert 0 < stopped_at < load(tmp_path / "straight/checkpoints/last.ckpt")["global_step"]
    with open_dict(cfg):
        cfg.resume, cfg.trainer.max_steps, cfg.trainer.max_time = str(tmp_path / "run"), -1, None
        cfg.callbacks.pop("slow", None)
    capsys.readouterr()
    train(cfg)
    assert_same_training_state(load(tmp_path / "straight/checkpoints/last.ckpt"), load(tmp_path / "run/checkpoints/last.ckpt"))
    assert_same_epoch_scalars(tmp_path / "straight", tmp_path / "run")


@pytest.mark.parametrize("precision", ["32", *(pytest.param(name, marks=pytest.mark.slow) for name in ("bf16-kahan", "bf16-sr", "fp8"))])
def test_the_guard_stops_a_run_at_its_first_non_finite_loss(make_config, tmp_path, precision):
    cfg = make_config("trainer.max_epochs=2", "+callbacks.poison._target_=fault_injection.PoisonInputAtSteps",
                      "+callbacks.poison.steps=[5]", f"precision={precision}", "optimizer=adamw")
    with pytest.raises(TrainingDiverged, match=rf"the training loss is (nan|inf|-inf) at step 5 \(epoch 0, batch 5\) with precision={precision}"):
        train(cfg)
    saved = load(tmp_path / "run/checkpoints/last.ckpt") if (tmp_path / "run/checkpoints/last.ckpt").is_file() else None
    assert saved is None or all(torch.isfinite(value).all() for value in saved["state_dict"].values() if value.is_floating_point())


class InfGradientAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("precision", ["16-mixed", "16-master"])
def test_a_step_the_loss_scaler_skipped_holds_a_per_step_schedule(make_config, precision):
    run = build_run(make_config(f"precision={precision}", "scheduler=exponential", "scheduler.interval=step", "trainer.max_epochs=1"))
    run.trainer.callbacks.append(InfGradientAtStep(3))
    run.fit()
    steps = run.trainer.global_step  # Lightning counts a skipped step as taken
    assert run.trainer.precision_plugin.scaler.get_scale() < 2.0**16  # the scaler backed off once: the step was skipped
    assert run.trainer.lr_scheduler_configs[0].scheduler.last_epoch == steps - 1  # one scheduler step fewer than steps


def test_a_step_that_does_not_log_reads_nothing_on_the_host(make_config):
    reads = count_host_reads(make_config, "precision=16-master", "+optimizer.fused=true")
    assert sum(reads.values()) == 0, dict(reads)


@pytest.mark.parametrize("recipe", ["precision=32", *(pytest.param(recipe, marks=pytest.mark.slow) for recipe in
                                                      ["precision=bf16-kahan", "optimizer=adamw8bit", "precision=fp8", "compile=true"])])
def test_the_trained_model_exports_to_programs_that_load_and_run(run_main, tmp_path, recipe):
    from mnist_precision.cli import train as train_cli
    from mnist_precision.tools import export as export_cli

    assert run_main(train_cli.main, "trainer.max_epochs=1", *recipe.split()).code == 0
    run_dir = next((tmp_path / "logs/train").iterdir())
    exported = run_main(export_cli.main, f"ckpt_path={run_dir}/checkpoints/last.ckpt", "export.formats=[fp32]",
                        "export.latency_runs=2", fast=False)
    assert exported.code == 0, exported.stderr[-2000:]
    program = torch.export.load(run_dir / "export/fp32.pt2").module()
    inputs = next(iter(build_run_for(run_dir).datamodule.test_dataloader()))[0][:4]
    assert program(inputs).dtype == torch.float32 and program(inputs).shape[0] == 4  # (every format: tests/tools)


def build_run_for(run_dir: Path):
    """The data module of a trained run, set up for testing (its saved config replayed)."""
    from mnist_precision.kit.build import compose_training_config
    from mnist_precision.kit.runs import saved_overrides

    cfg = compose_training_config(saved_overrides(run_dir), run_dir / "replay")
    run = build_run(cfg)
    run.datamodule.prepare_data()
    run.datamodule.setup("test")
    return run


# compile=true (slow: Inductor compiles each graph, a few seconds on a CPU), on the configured task


@pytest.mark.slow
@pytest.mark.parametrize("precision", [name if isinstance(name, str) else name.values[0] for name in PRECISIONS])
def test_every_precision_trains_compiled(configured, precision):
    metrics = train(configured(f"precision={precision}", "compile=true", "debug=fdr"))
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"])) and any(name.startswith("test/") for name in metrics)


class FailOnRecompileAfterFirstStep(L.Callback):
    """From the second training step on, torch raises if anything compiles again."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            torch.compiler.set_stance("fail_on_recompile")

    def teardown(self, trainer, pl_module, stage):
        torch.compiler.set_stance("default")


@pytest.mark.slow
def test_a_compiled_network_is_not_compiled_again_for_the_epochs_last_smaller_batch(configured):
    def batch_sizes(run) -> list[int]:
        run.datamodule.setup("fit")
        return [len(batch[0]) for batch in run.datamodule.train_dataloader()]

    samples = sum(batch_sizes(build_run(configured())))
    size = next(size for size in range(samples // 3, 1, -1) if samples % size)  # a batch size that leaves a smaller last batch
    # training alone (no validation graph compiled before it, which would have made the batch size dynamic anyway)
    run = build_run(configured("compile=true", "trainer.max_epochs=2", "test=false", f"data.batch_size={size}",
                                "++trainer.num_sanity_val_steps=0", "++trainer.limit_val_batches=0"))
    sizes = batch_sizes(run)
    assert len(sizes) >= 3 and sizes[-1] < sizes[0], sizes
    run.trainer.callbacks.append(FailOnRecompileAfterFirstStep())
    try:
        run.fit()
    finally:
        torch.compiler.set_stance("default")
    assert run.trainer.global_step == 2 * len(sizes)


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [("true", "false"), ("false", "true")])
def test_a_compiled_runs_checkpoint_resumes_and_evaluates_uncompiled_and_the_other_way_round(configured, tmp_path, first, then):
    train(configured(f"compile={first}", "trainer.max_epochs=1"))
    saved = load(tmp_path / "run/checkpoints/last.ckpt")
    assert list(saved["state_dict"]) == list(build_run(configured()).model.state_dict())  # the plain module's keys (no _orig_mod.)
    metrics = train(configured(f"compile={then}", "trainer.max_epochs=2", f"resume={tmp_path / 'run'}"))
    assert load(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 2 * saved["global_step"] > 0
    assert any(name.startswith("test/") for name in metrics)
    tested = build_run(configured(f"compile={then}")).test(str(tmp_path / "run/checkpoints/last.ckpt"), verbose=False)
    assert tested and all(torch.isfinite(torch.tensor(value)) for value in tested.values())
