"""Errors the user can fix: reported as one message and a non-zero exit, never a traceback."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

from mnist_precision.kit.config import command_name

LOG = logging.getLogger("mnist_precision")


class UserError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it."""


class RunFailed(UserError):
    """A run that started and then stopped (its directory keeps what it wrote). Any other UserError is refused input."""


class RunRefused(SystemExit):
    """The exit of a run refused for its input: it leaves nothing behind (a resumed run's files are put back)."""


class TrainingDiverged(RunFailed):
    """The loss became inf or NaN; training stopped before the optimizer used it."""


class TrainingInterrupted(RunFailed):
    """SIGTERM/SIGINT stopped training after saving its state; exits 128 + the signal number, as shells do."""

    def __init__(self, message: str, signum: int, requeued: bool = False):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.requeued = requeued  # SLURM runs this job again, and it resumes the run


def first_line(error: BaseException) -> str:
    """An error's message on one line (its first), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    log_file = next((h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)), "the job's log")
    if isinstance(error, UserError):
        LOG.error(f"error: {error}")
        return getattr(error, "exit_code", 1)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    LOG.error(f"error: {type(error).__name__}: {message}\n(the full traceback is in {log_file})", exc_info=error)
    return 1


@contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a `UserError` raised inside into `error: <message>` on stderr and exit status 1."""
    try:
        yield
    except UserError as error:
        exit_with(error)


@contextmanager
def nothing_left_if_it_fails(path: Path) -> Iterator[None]:
    """If the block fails, remove the directories it created on the way to `path` (a download that made
    `/no/such/dir/MNIST/raw` before failing): a refused run leaves nothing behind. What existed before is kept."""
    created = next((parent for parent in (path, *path.parents) if parent.parent.exists()), None) if not path.exists() else None
    try:
        yield
    except BaseException:
        if created is not None and created.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise


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
            "Pass the network and precision overrides the checkpoint was trained with (net=..., precision=...)."
        ) from None


@contextmanager
def explain_failed_rendezvous(trainer) -> Iterator[None]:
    """DDP processes that never all met (a node not started, or a wrong MASTER_ADDR/MASTER_PORT): what was waited for,
    for how long, and how to start the others, instead of torch's DistStoreError. The wait is bounded by the DDP
    strategy's timeout (conf/trainer/ddp.yaml)."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistStoreError, dist.DistNetworkError) as error:
        if trainer.global_step > 0:  # not the start: a process that stopped answering mid-run
            raise
        where = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"
        detail = first_line(error)
        raise UserError(
            f"the {trainer.world_size} DDP processes (trainer.num_nodes={trainer.num_nodes} x {trainer.num_devices} devices) did not "
            f"all meet at {where} ({detail}). Start every node with the same command, each with its own NODE_RANK "
            f"(0 to {trainer.num_nodes - 1}) and the same MASTER_ADDR and MASTER_PORT, or launch through SLURM or torchrun. "
            "The wait is trainer.strategy.timeout."
        ) from None


@contextmanager
def explain_lightning_refusal(trainer) -> Iterator[None]:
    """Lightning's own refusal of a setting (its MisconfigurationException: `limit_val_batches=0.1` of 3 batches, ...)
    is one message like the template's own checks: before the first step a refused input, which leaves nothing
    behind; later, a run that stopped."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except MisconfigurationException as error:
        kind = UserError if trainer.global_step == 0 else RunFailed
        raise kind(f"Lightning refused the run: {str(error).strip()}") from None


@contextmanager
def explain_lost_peer(trainer) -> Iterator[None]:
    """Another process of a DDP job stopped mid-run (its own error, or killed): rank 0's next collective fails on the
    closed connection. Say so, and where that process's error is, instead of gloo's socket error."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as error:
        if trainer.world_size == 1 or not any(text in str(error) for text in ("Connection closed by peer", "Connection reset by peer")):
            raise
        run_dir = Path(trainer.default_root_dir)
        raise RunFailed(f"another process of this {trainer.world_size}-process DDP job stopped at step {trainer.global_step}; its "
                        f"error is in its log ({run_dir}/train_rank_<rank>.log), or it was killed.") from None


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def explain_full_disk(error: Exception, run_dir: Path) -> Exception:
    """A full disk, a quota, or a directory made read-only while the run writes its TensorBoard events or metrics.json:
    one message. The checkpoints are written atomically (checkpoints.AtomicCheckpointIO), so those already there are
    whole, and the run can go on from them once there is room."""
    if not (isinstance(error, OSError) and error.errno in WRITE_ERRORS):
        return error
    what = error.filename or "the run's files (TensorBoard events)"
    last = run_dir / "checkpoints" / "last.ckpt"
    then = (f"The checkpoints already written are intact; once there is room, continue with: {command_name('train')} resume={run_dir}"
            if last.is_file() else "No checkpoint had been written yet.")
    return RunFailed(f"could not write {what}: {os.strerror(error.errno)}. {then}")
