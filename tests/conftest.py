"""The fixtures every test may use (helpers: support.py). A test runs on `task`: the quadrants task here, the MNIST task
under mnist_task/, each task of TASKS under conformance/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from omegaconf import DictConfig
from support import QUIET, CliResult, Task, compose_config, quadrants


@pytest.fixture(scope="session")
def configured_task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Task]:
    """The task the config names, on its own test data (mnist_task/harness.py; a user's task brings its own harness)."""
    from mnist_task.harness import test_task

    with test_task(tmp_path_factory) as task:
        yield task


@pytest.fixture
def task() -> Task:
    """What a machinery test runs on: the quadrants task with a plain DataLoader (exact at epoch boundaries; the tests of
    mid-epoch resume take its stateful loader: kit/test_reliability.py)."""
    return quadrants("plain")


@pytest.fixture
def make_config(tmp_path: Path, task: Task):
    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config(task, list(overrides), output_dir or tmp_path / "run")

    return make


@pytest.fixture
def run_cli(tmp_path: Path, task: Task):
    """Runs `python -m mnist_precision.cli.<command> ...` on the task in a subprocess from an unrelated working directory."""

    def run(command: str, *args: str, log_dir: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> CliResult:
        env = {**os.environ, **task.env, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", **(env or {})}
        flags = [arg for arg in args if arg.startswith("-")]  # Hydra wants -m before the overrides
        overrides = [arg for arg in args if not arg.startswith("-")]
        argv = [sys.executable, "-m", f"mnist_precision.cli.{command}", *flags, *task.overrides, *QUIET,
                f"paths.log_dir={log_dir or tmp_path / 'logs'}", *overrides]
        cwd = tmp_path / "elsewhere"
        cwd.mkdir(exist_ok=True)
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def run_main(tmp_path: Path, task: Task, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Calls an entry point's `main()` on the task in this process (cheap: no interpreter start-up); returns its exit status."""

    def run(main, *args: str, fast: bool = True) -> CliResult:
        for name, value in task.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
        prefix = [*task.overrides, *QUIET, f"paths.log_dir={tmp_path / 'logs'}"] if fast else []
        flags = [arg for arg in args if arg.startswith("-")]  # Hydra wants -m, --help before the overrides
        monkeypatch.setattr(sys, "argv", ["mnist", *flags, *prefix, *(arg for arg in args if not arg.startswith("-"))])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
