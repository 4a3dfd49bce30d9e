"""Faults: SIGTERM/SIGINT mid-epoch, SIGKILL, failing checkpoint writes; each loses nothing that matters."""

from __future__ import annotations

import errno
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from support import assert_same_training_state, load, quadrants, task_command, task_env

from mnist_precision.cli import train as train_cli
from mnist_precision.cli.train import train
from mnist_precision.kit.checkpoints import AtomicCheckpointIO, CheckpointSaveError
from mnist_precision.kit.errors import TrainingInterrupted

BATCHES_PER_EPOCH = 8


@pytest.fixture
def task():
    """Mid-epoch stops resume exactly only with a loader that saves its position: the quadrants task's stateful one."""
    return quadrants("stateful")


def with_signal(signum: int, step: int) -> list[str]:
    return ["+callbacks.fault._target_=fault_injection.SendSignalAtStep", f"+callbacks.fault.signum={signum}", f"+callbacks.fault.step={step}"]


def test_ctrl_c_stops_at_the_batch_boundary_like_sigterm(make_config, tmp_path):
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN under nohup / a background job
    with pytest.raises(TrainingInterrupted) as stopped:
        train(make_config("trainer.max_epochs=2", *with_signal(signal.SIGINT, 5)))
    assert stopped.value.exit_code == 128 + signal.SIGINT and "stopped by SIGINT at step 5" in str(stopped.value)
    assert load(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 5
    assert signal.getsignal(signal.SIGINT) is before  # the handler the process had is back (pytest's Ctrl-C works again)


def test_sigterm_from_the_command_line_exits_143_with_the_resume_command(run_main, tmp_path):
    result = run_main(train_cli.main, "trainer.max_epochs=2", *with_signal(signal.SIGTERM, 3))
    assert result.code == 143
    assert "error: stopped by SIGTERM at step 3" in result.stderr and "Continue with: mnist-train resume=" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # about 15 s: a run killed mid-epoch, then its resume, each a process
def test_after_sigkill_resume_continues_from_the_last_periodic_checkpoint(make_config, tmp_path, task):
    train(make_config("trainer.max_epochs=2", output_dir=tmp_path / "straight"))
    env = task_env(task)
    command = lambda *args: task_command(task, tmp_path / "logs", "trainer.max_epochs=2", *args)  # noqa: E731
    killed = subprocess.run(command("callbacks.last_checkpoint.every_n_train_steps=3", *with_signal(signal.SIGKILL, 7)),
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    run_dir = next((tmp_path / "logs/train").iterdir())
    assert load(run_dir / "checkpoints/last.ckpt")["global_step"] == 6  # the last complete checkpoint
    assert not list((run_dir / "checkpoints").glob(".*partial"))
    disarmed = "+callbacks.fault.step=-1"  # resume= replays the run's overrides, the fault injection included
    resumed = subprocess.run(command("resume=latest", disarmed), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_training_state(load(tmp_path / "straight/checkpoints/last.ckpt"), load(run_dir / "checkpoints/last.ckpt"))


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"), PermissionError(errno.EACCES, "Permission denied")])
def test_a_failed_checkpoint_write_is_reported_and_the_previous_checkpoint_survives(make_config, tmp_path, monkeypatch, fault):
    cfg = make_config("trainer.max_epochs=3", "~callbacks.best_checkpoint")  # the first file written is last.ckpt
    train_one_epoch = make_config("trainer.max_epochs=1", "~callbacks.best_checkpoint")
    train(train_one_epoch)
    before = (tmp_path / "run/checkpoints/last.ckpt").read_bytes()

    def failing_save(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise fault

    monkeypatch.setattr("mnist_precision.kit.checkpoints.torch.save", failing_save)
    with open_dict(cfg):
        cfg.resume = str(tmp_path / "run")
    with pytest.raises(CheckpointSaveError, match=rf"could not write the checkpoint .*: {fault.strerror}; the previous .* is intact"):
        train(cfg)
    assert (tmp_path / "run/checkpoints/last.ckpt").read_bytes() == before
    assert not list((tmp_path / "run/checkpoints").glob(".*partial"))


def test_atomic_write_replaces_the_file_whole(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "c.ckpt")
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "c.ckpt")
    assert torch.equal(torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


class ClockJumpsAtStep(L.Callback):
    """Lightning's Timer (trainer.max_time) reads this clock; it stands still, then jumps a day during the given step."""

    now = 0.0

    def __init__(self, step: int):
        self.step = step
        ClockJumpsAtStep.now = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            ClockJumpsAtStep.now = 86400.0


class StopAtValidationAtStep(L.Callback):
    """Sets `trainer.should_stop` at the validation after the given step: how EarlyStopping ends a run."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step == self.step and not trainer.sanity_checking:
            trainer.should_stop = True


class StopFromTheModel(L.Callback):
    """Sets `trainer.should_stop` from the LightningModule's own batch-end hook, which runs after every callback's."""

    def __init__(self, step: int):
        self.step = step

    def setup(self, trainer, pl_module, stage):
        def on_train_batch_end(outputs, batch, batch_idx):
            if trainer.global_step == self.step:
                trainer.should_stop = True

        pl_module.on_train_batch_end = on_train_batch_end


def stopped_at(callback: str, step: int) -> list[str]:
    return [f"+callbacks.stop._target_=test_reliability.{callback}", f"+callbacks.stop.step={step}"]


def stop_then_resume(make_config, tmp_path: Path, common: list[str], stop: list[str]) -> tuple[dict, dict, dict]:
    """Trains `common` straight through; again, ended early by `stop`, then resumed. Returns the three last.ckpt."""
    train(make_config(*common, output_dir=tmp_path / "straight"))
    train(make_config(*common, *stop, output_dir=tmp_path / "run"))
    stopped = load(tmp_path / "run/checkpoints/last.ckpt")
    train(make_config(*common, f"resume={tmp_path / 'run'}", output_dir=tmp_path / "run"))
    return stopped, load(tmp_path / "straight/checkpoints/last.ckpt"), load(tmp_path / "run/checkpoints/last.ckpt")


def assert_same_precision_state(a: dict, b: dict) -> None:
    """The precision plugin's state (loss scaler; masters and skipped steps for the master copy) is the same."""

    def same(x, y) -> bool:
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    for plugin in ("MixedPrecision", "MasterCopyPrecision"):
        assert (plugin in a) == (plugin in b)
        assert same(a.get(plugin), b.get(plugin)), plugin


PRECISIONS = {"32": ["precision=32"], "16-mixed": ["precision=16-mixed"], "bf16-true": ["precision=bf16-true"],
              "16-master": ["precision=16-master", "precision.growth_interval=3"], "bf16-master": ["precision=bf16-master", "precision.loss_scale=dynamic"]}


# max_steps for every precision; max_time (the same save, triggered by should_stop) for one without and one with a scaler.
@pytest.mark.parametrize(("stop", "precision"), [*(("max_steps", name) for name in PRECISIONS), ("max_time", "32"), ("max_time", "16-master")])
def test_a_run_ended_mid_epoch_by_max_steps_or_max_time_resumes_where_it_stopped(make_config, tmp_path, monkeypatch, precision, stop):
    # Step 11 is batch 3 of epoch 1 (8 batches an epoch): resuming from an epoch-end state would skip 5 batches.
    common = [*PRECISIONS[precision], "net=quadrants_cnn", "trainer.max_steps=20"]
    if stop == "max_steps":
        first = ["trainer.max_steps=11"]
    else:
        monkeypatch.setattr("lightning.pytorch.callbacks.timer.time", SimpleNamespace(monotonic=lambda: ClockJumpsAtStep.now))
        first = ["trainer.max_time={hours:1}", "+callbacks.clock._target_=test_reliability.ClockJumpsAtStep", "+callbacks.clock.step=11"]
    stopped, straight, resumed = stop_then_resume(make_config, tmp_path, common, first)
    assert stopped["global_step"] == 11
    assert_same_training_state(straight, resumed)
    assert_same_precision_state(straight, resumed)


def test_a_run_stopped_by_a_mid_epoch_validation_resumes_where_it_stopped(make_config, tmp_path):
    common = ["net=quadrants_cnn", "trainer.max_steps=20", "+trainer.val_check_interval=3"]
    stopped, straight, resumed = stop_then_resume(make_config, tmp_path, common, stopped_at("StopAtValidationAtStep", 11))
    assert stopped["global_step"] == 11
    assert_same_training_state(straight, resumed)


def test_a_run_stopped_by_the_model_resumes_where_it_stopped(make_config, tmp_path):
    # The module's hook runs after every callback's; Lightning then validates (should_stop), and the state is saved there.
    stopped, straight, resumed = stop_then_resume(make_config, tmp_path, ["trainer.max_steps=20"], stopped_at("StopFromTheModel", 11))
    assert stopped["global_step"] == 11
    assert_same_training_state(straight, resumed)


def test_a_mid_epoch_stop_that_cannot_be_saved_exactly_says_so_at_resume(make_config, tmp_path):
    # Without validation nothing runs between the module's hook and the epoch end: no exact state to save.
    common = ["trainer.max_steps=20", "trainer.limit_val_batches=0"]
    train(make_config(*common, *stopped_at("StopFromTheModel", 11)))
    with pytest.warns(UserWarning, match=r"epoch 1 stopped at batch 3 of 8: .* its other 5 batches are not trained"):
        train(make_config(*common, f"resume={tmp_path / 'run'}"))


def test_a_full_disk_while_writing_tensorboard_events_is_one_message_and_the_checkpoints_stay_intact(run_main, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # fault_injection, for Hydra's instantiate
    full = ["+callbacks.disk._target_=fault_injection.DiskFullAtStep", "+callbacks.disk.step=11"]  # mid-epoch 2
    result = run_main(train_cli.main, *full, "trainer.max_epochs=3")
    assert result.code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: could not write the run's files (TensorBoard events): No space left on device." in result.stderr
    run_dir = next((tmp_path / "logs/train").iterdir())
    assert f"The checkpoints already written are intact; once there is room, continue with: mnist-train resume={run_dir}" in result.stderr
    assert load(run_dir / "checkpoints/last.ckpt")["global_step"] == 8  # epoch 1's, whole

    resumed = run_main(train_cli.main, f"resume={run_dir}", "~callbacks.disk")  # room again
    assert resumed.code == 0, resumed.stderr
    assert load(run_dir / "checkpoints/last.ckpt")["global_step"] == 24


def test_a_full_disk_while_writing_metrics_json_is_one_message(run_main, tmp_path, monkeypatch):
    write_text = Path.write_text

    def full_for_metrics(path, *args, **kwargs):
        if path.name.startswith("metrics.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_metrics)
    result = run_main(train_cli.main, "trainer.max_epochs=1")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert "error: could not write" in result.stderr and "metrics.json.partial: No space left on device." in result.stderr
    run_dir = next((tmp_path / "logs/train").iterdir())
    assert not list(run_dir.glob("metrics.json*"))  # no half-written file for a sweep to misread
    assert load(run_dir / "checkpoints/last.ckpt")["global_step"] == 8


@pytest.mark.parametrize("layout", ["no skipped_steps", "no master-copy state", "no loops"])
def test_a_checkpoint_of_an_older_layout_says_what_it_lacks(run_main, tmp_path, layout):
    assert run_main(train_cli.main, "precision=16-master", "trainer.max_epochs=1").code == 0
    run_dir = next((tmp_path / "logs/train").iterdir())
    checkpoint = load(run_dir / "checkpoints/last.ckpt")
    if layout == "no skipped_steps":
        del checkpoint["MasterCopyPrecision"]["skipped_steps"]
    elif layout == "no master-copy state":
        del checkpoint["MasterCopyPrecision"]
    else:
        del checkpoint["loops"]
    torch.save(checkpoint, run_dir / "checkpoints/last.ckpt")
    result = run_main(train_cli.main, f"resume={run_dir}", "trainer.max_epochs=2")
    assert result.code == 1 and "Traceback" not in result.stderr
    missing = {"no skipped_steps": "MasterCopyPrecision.skipped_steps",
               "no master-copy state": "the MasterCopyPrecision state (scaler, masters, skipped_steps)", "no loops": "loops"}[layout]
    assert f"the checkpoint has no {missing}. It was written by another layout" in result.stderr, result.stderr
