"""Errors the user can fix: reported as one message and a non-zero exit, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

LOG = logging.getLogger("mnist_precision")


class UserError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it."""


class RunFailed(UserError):
    """A run that started and then stopped (its directory keeps what it wrote). Any other UserError is refused input."""


class TrainingDiverged(RunFailed):
    """The loss became inf or NaN; training stopped before the optimizer used it."""


class TrainingInterrupted(RunFailed):
    """SIGTERM/SIGINT stopped training after saving its state; exits 128 + the signal number, as shells do."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def print_error(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)


def exit_with(error: UserError) -> NoReturn:
    """`error: <message>` on stderr; exit status 1 (or the error's own `exit_code`)."""
    print_error(error)
    raise SystemExit(getattr(error, "exit_code", 1)) from None


def log_job_error(error: Exception) -> int:
    """Inside a Hydra job: one `error: ...` line on stderr and in the job's log; returns the exit status.

    Anything but a UserError is a bug or an environment problem nobody anticipated: still one line on the
    console, saying where the full traceback was written (the log file). HYDRA_FULL_ERROR=1 re-raises it instead.
    """
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get()
    log_file = Path(job.runtime.output_dir) / f"{job.job.name}.log"  # as conf/hydra/job_logging/console.yaml names it
    if isinstance(error, UserError):
        LOG.error(f"error: {error}")
        return getattr(error, "exit_code", 1)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    LOG.error(f"error: {type(error).__name__}: {first_line}\n(the full traceback is in {log_file})", exc_info=error)
    return 1


@contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a `UserError` raised inside into `error: <message>` on stderr and exit status 1."""
    try:
        yield
    except UserError as error:
        exit_with(error)


@contextmanager
def explain_checkpoint_mismatch(ckpt_path: str | None) -> Iterator[None]:
    """A checkpoint whose weights do not fit the configured model: say so instead of a state_dict dump."""
    try:
        yield
    except RuntimeError as error:
        if not ckpt_path or "Error(s) in loading state_dict" not in str(error):
            raise
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")
        raise UserError(
            f"{ckpt_path} was written for a different model than the one configured ({detail[:200]}). "
            "Pass the model= (and precision=) the checkpoint was trained with."
        ) from None
