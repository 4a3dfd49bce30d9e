"""How a job was launched and by whom: its rank before any Trainer exists, the processes Lightning starts for the
other DDP ranks, and SLURM's requeue of a job that ran out of time."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mnist_precision.kit.config import PACKAGE
from mnist_precision.kit.runs import LAST_CHECKPOINT


def launch_rank() -> str:
    """This process's rank as its launcher numbered it, known before any Trainer exists: "0" for the launch's first
    process, which alone locks the run and writes its results. torchrun sets RANK and SLURM sets SLURM_PROCID; Lightning
    sets LOCAL_RANK in the processes it starts, and a node started by hand has NODE_RANK ("1.0": node 1, process 0)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "0") != "0":
            return os.environ[name]
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    return local if node == "0" else f"{node}.{local}"


SLURM_JOB_FILE = "slurm_job_id"  # in a run dir: the SLURM job that last trained it, found again when SLURM requeues it


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array job (a sweep through submitit), else the job's."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def is_requeued_slurm_job() -> bool:
    """SLURM counts a job's restarts (requeued by `scontrol requeue`, by preemption, or after a node failed)."""
    return slurm_job_id() is not None and os.environ.get("SLURM_RESTART_COUNT", "0") != "0"


def trained_by_this_slurm_job(run_dir: Path) -> bool:
    job_file = run_dir / SLURM_JOB_FILE
    return job_file.is_file() and job_file.read_text().strip() == slurm_job_id() and (run_dir / LAST_CHECKPOINT).is_file()


def requeued_run(log_dir: Path) -> Path | None:
    """In a requeued SLURM job: the run this job was training before, to resume in place. The sbatch script runs
    the same command again, and a new run directory would start from scratch."""
    if not is_requeued_slurm_job():
        return None
    runs = [path.parent for path in (*log_dir.glob(f"train/*/{SLURM_JOB_FILE}"), *log_dir.glob(f"multirun/*/*/{SLURM_JOB_FILE}"))]
    return next((run for run in runs if trained_by_this_slurm_job(run)), None)


def requeue_slurm_job() -> str:
    """`scontrol requeue <this job>`: SLURM ends the job and queues it again; it resumes the run (requeued_run). Returns
    what happened, for the message."""
    import subprocess

    job_id = slurm_job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue SLURM job {job_id} ({error})"
    if done.returncode != 0:
        return f"could not requeue SLURM job {job_id}: scontrol said {(done.stderr or done.stdout).strip()!r}"
    return f"requeued SLURM job {job_id}: it resumes this run when it starts again"


DDP_JOB = f"{PACKAGE.upper()}_DDP_JOB"  # rank 0's job (overrides, run dir), for the processes started for other ranks


def ddp_rank_argv() -> list[str] | None:
    """In a process Lightning started for another DDP rank: the command line of rank 0's job, in its directory.

    Lightning starts the other ranks by re-running this script with rank 0's command line (plus `hydra.run.dir`).
    Under a sweep that line is the whole sweep (`-m precision=32,bf16-mixed`): each rank would run every job and
    write a second sweep directory, pairing with rank 0's jobs in whatever order. Rank 0 leaves its job's own
    overrides in the environment the new process inherits; that process runs exactly that job, in its directory,
    writing only its log (`train_rank_<rank>.log`). Under torchrun or SLURM every rank has its own command
    line and this does nothing.
    """
    job = os.environ.get(DDP_JOB)
    if job is None or os.environ.get("LOCAL_RANK", "0") == "0":
        return None
    job = json.loads(job)
    return [*job["overrides"], f"hydra.run.dir='{job['run_dir']}'"]


def started_by_lightning_for_another_rank() -> bool:
    """A process Lightning's launcher started for a rank other than 0 (see ddp_rank_argv). Lightning watches these from
    rank 0's process, and when one exits with a non-zero status it SIGKILLs every process, its own included: under a
    sweep, the sweep itself. Such a process therefore ends with status 0 whatever happened, its error in its own log;
    rank 0 reports the job's failure (a refused input on every rank; or the peer it lost, errors.explain_lost_peer)."""
    return os.environ.get(DDP_JOB) is not None and os.environ.get("LOCAL_RANK", "0") != "0"


def end_distributed_job(environment: dict[str, str]) -> None:
    """After a job: close its process group and give back the environment the job started with.

    Lightning's launcher leaves LOCAL_RANK, WORLD_SIZE and MASTER_PORT set in rank 0's environment, and its
    process group open. In a sweep, the next job's Trainer would then take the ranks as already started by
    someone else and reuse a group whose other ranks have exited: it must start its own.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
