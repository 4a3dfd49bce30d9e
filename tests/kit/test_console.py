"""What a user sees: one line per epoch off a terminal, a summary block, no known-harmless noise, real warnings and
errors on stderr and in train.log, never a traceback wall."""

from __future__ import annotations

import json
import re

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from support import TESTS, only_run_dir, tensorboard_scalars

from mnist_precision.cli import train as train_cli
from mnist_precision.kit.build import build_run
from mnist_precision.kit.progress import EpochLines, progress_bar

EPOCH_LINE = r"epoch {n}/{of}  train/loss_epoch \d\.\d{{4}}  train/acc \d\.\d{{4}}  val/loss \d\.\d{{4}}  val/acc \d\.\d{{4}}  \d+\.\d s"


@pytest.mark.slow  # about 14 s: mnist-train, then its resume, each in a process of its own as a user runs them
def test_off_a_terminal_a_run_prints_one_line_per_epoch_then_a_summary_block_and_nothing_on_stderr(run_cli, tmp_path):
    # Warnings on, as a user has them (run_cli otherwise sets PYTHONWARNINGS=ignore); the bar on, stdout a pipe.
    shown = {"PYTHONWARNINGS": ""}
    first = run_cli("train", "trainer.enable_progress_bar=true", "trainer.max_epochs=2", env=shown)
    assert first.code == 0, first.stderr
    run_dir = only_run_dir(tmp_path / "logs")
    resumed = run_cli("train", "trainer.enable_progress_bar=true", "resume=latest", "trainer.max_epochs=3", env=shown)
    assert resumed.code == 0, resumed.stderr

    for result, epochs in ((first, [1, 2]), (resumed, [3])):
        assert "\r" not in result.stdout
        lines = result.stdout.splitlines()
        for n in epochs:
            assert sum(bool(re.fullmatch(EPOCH_LINE.format(n=n, of=epochs[-1]), line)) for line in lines) == 1, result.stdout
        summary = lines[-4:]
        assert re.fullmatch(r"test/acc=\d\.\d{4}  val/acc_best=\d\.\d{4}  fit \d+\.\d s  wall \d+\.\d s  [\d,]+ samples/s  threads \d+", summary[0])
        assert summary[1] == f"run dir: {run_dir}" and summary[3] == f"TensorBoard: tensorboard --logdir {run_dir}"
        assert re.fullmatch(r"checkpoints: best_epoch_\d{3}_\d\.\d{4}\.ckpt, last\.ckpt", summary[2])  # what the run wrote
        # Every known-harmless warning would have appeared here (the resume writes into an existing checkpoints/).
        assert result.stderr == ""

    log = (run_dir / "train.log").read_text()
    assert re.search(EPOCH_LINE.format(n=3, of=3), log) and f"TensorBoard: tensorboard --logdir {run_dir}" in log


def test_the_summary_names_only_what_the_run_wrote(run_main, tmp_path):
    result = run_main(train_cli.main, "debug=fdr")  # Lightning's fast_dev_run: no logger files, no checkpoints
    assert result.code == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "logs")
    assert not list(run_dir.rglob("events.out.tfevents.*")) and not list(run_dir.rglob("*.ckpt"))
    assert f"run dir: {run_dir}" in result.stdout and "TensorBoard" not in result.stdout and "checkpoints:" not in result.stdout


@pytest.mark.slow  # about 10 s: mnist-train in a process of its own
def test_a_real_warning_is_shown_on_stderr_and_kept_in_train_log(run_cli, tmp_path):
    result = run_cli("train", "trainer.max_epochs=1", "+callbacks.warn._target_=fault_injection.WarnAtStep", "+callbacks.warn.step=2",
                     env={"PYTHONWARNINGS": "", "PYTHONPATH": str(TESTS)})
    assert result.code == 0, result.stderr
    assert "UserWarning: an injected warning that matters" in result.stderr
    assert "UserWarning: an injected warning that matters" in (only_run_dir(tmp_path / "logs") / "train.log").read_text()


def test_an_unexpected_error_is_one_line_on_the_console_and_its_traceback_is_in_train_log(run_main, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    result = run_main(train_cli.main, "trainer.max_epochs=1", "+callbacks.fault._target_=fault_injection.RaiseAtStep", "+callbacks.fault.step=2")
    run_dir = only_run_dir(tmp_path / "logs")
    assert result.code == 1
    assert result.stderr == f"error: RuntimeError: injected failure\n(the full traceback is in {run_dir / 'train.log'})\n"
    log = (run_dir / "train.log").read_text()
    assert "error: RuntimeError: injected failure" in log and "Traceback (most recent call last)" in log and "fault_injection.py" in log
    assert json.loads((run_dir / "metrics.json").read_text()) == {"error": "injected failure"}


def test_a_user_error_is_one_line_on_stderr_and_in_train_log(run_main, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    result = run_main(train_cli.main, "trainer.max_epochs=1", "+callbacks.poison._target_=fault_injection.PoisonInputAtSteps",
                      "+callbacks.poison.steps=[2]")
    assert result.code == 1
    assert result.stderr.startswith("error: the training loss is nan at step 2") and result.stderr.count("\n") == 1
    log = (only_run_dir(tmp_path / "logs") / "train.log").read_text()
    assert "error: the training loss is nan at step 2" in log and "Traceback" not in log


def test_the_progress_bar_is_tqdm_on_a_terminal_and_epoch_lines_otherwise(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    bar = progress_bar(refresh_rate=7)
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 7
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(progress_bar(), EpochLines)


def test_the_tqdm_bar_shows_the_latest_logged_training_loss(make_config, monkeypatch, tmp_path):
    """The training monitor logs the step loss without prog_bar=True (else Lightning reads it on the host after every
    step); the bar adds it when it redraws: the value TensorBoard got last."""
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    run = build_run(make_config("trainer.enable_progress_bar=true", "trainer.max_epochs=1", "trainer.log_every_n_steps=3"))
    bar = next(callback for callback in run.trainer.callbacks if isinstance(callback, TQDMProgressBar))
    run.fit()
    assert "train/loss_step" not in run.trainer.progress_bar_metrics
    last_logged = tensorboard_scalars(tmp_path / "run", "train/loss_step")[-1][1]
    assert bar.get_metrics(run.trainer, run.model)["train/loss_step"] == pytest.approx(last_logged)
    assert "train/loss_step=" in bar.train_progress_bar.postfix  # and the bar drew it
