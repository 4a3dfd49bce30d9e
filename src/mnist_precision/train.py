"""`mnist-train` (also `python -m mnist_precision.train`): fit, then test the best checkpoint.

Only Hydra is imported before the command line is parsed, so `mnist-train --help` and bad overrides answer
in a fraction of a second; torch and Lightning (about 3 s to import) load when a run starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from mnist_precision.config import CONF_DIR, command_name
from mnist_precision.console import setup_job_console, use_job_log
from mnist_precision.errors import (
    RunFailed,
    TrainingInterrupted,
    UserError,
    explain_checkpoint_mismatch,
    explain_failed_rendezvous,
    explain_full_disk,
    log_job_error,
    report_user_errors,
)
from mnist_precision.runs import (
    LAST_CHECKPOINT,
    SLURM_JOB_FILE,
    check_training_left,
    job_entries,
    launch_rank,
    log_dir_from,
    override_value,
    remove_refused_run,
    requeue_slurm_job,
    requeued_run,
    resume_guard,
    run_lock,
    slurm_job_id,
    train_argv,
    trained_by_this_slurm_job,
)

if TYPE_CHECKING:
    import lightning as L

LOG = logging.getLogger("mnist_precision")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming if asked), test the best checkpoint, log hparams with the final metrics; return them."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    started = time.perf_counter()
    from mnist_precision.build import build_run

    run = build_run(cfg)
    ckpt_path = str(Path(cfg.resume) / LAST_CHECKPOINT) if cfg.resume else cfg.ckpt_path
    if ckpt_path:
        check_training_left(run.trainer, ckpt_path, f"resume={cfg.resume}" if cfg.resume else f"ckpt_path={cfg.ckpt_path}")
    log_dashboard(run.trainer, cfg, {})  # the layout and the knobs from the start; the metrics at the end
    try:
        with explain_checkpoint_mismatch(ckpt_path), explain_failed_rendezvous(run.trainer):
            run.fit(ckpt_path)
    except SIGTERMException:
        raise interrupted(run.trainer) from None
    metrics = as_floats(run.trainer.callback_metrics)  # test() starts a fresh set
    metrics.update(fit_time(run.trainer))
    run.test(best_checkpoint(run.trainer), verbose=False)  # the summary block reports the results
    metrics.update(as_floats(run.trainer.callback_metrics))
    metrics["memory/peak_mb"] = peak_memory_mb(run.trainer)
    metrics["time/wall_seconds"] = time.perf_counter() - started
    log_dashboard(run.trainer, cfg, metrics)
    return metrics


def peak_memory_mb(trainer: L.Trainer) -> float:
    """The run's peak memory: the GPU's allocated tensors on a GPU, else the process's peak resident set (Linux: KiB)."""
    import resource

    import torch

    device = trainer.strategy.root_device
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def interrupted(trainer: L.Trainer) -> TrainingInterrupted:
    from mnist_precision.callbacks import LastCheckpoint

    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    signum = (last.signal if last else None) or signal.SIGTERM
    where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
    if last is None or not last.saved_on_signal:
        return TrainingInterrupted(f"stopped by {signal.Signals(signum).name} at {where}; no checkpoint was saved.", signum)
    run_dir = Path(last.path).parent.parent
    saved = f"stopped by {signal.Signals(signum).name} at {where}; the exact state is saved in {last.path}."
    if signum in (signal.SIGUSR1, signal.SIGUSR2) and slurm_job_id():  # SLURM's warning before the time limit
        requeued = requeue_slurm_job() if trainer.is_global_zero else ""
        if requeued.startswith("requeued"):
            return TrainingInterrupted(f"{saved} {requeued}.", signum, requeued=True)
        saved += f" {requeued}."
    return TrainingInterrupted(f"{saved}\nContinue with: {command_name('train')} resume={run_dir}", signum)


def fit_time(trainer: L.Trainer) -> dict[str, float]:
    """`time/fit_seconds`: the training loop's time, as the TrainingMonitor measured it (if there is one)."""
    from mnist_precision.callbacks import TrainingMonitor

    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, TrainingMonitor)), None)
    return {} if monitor is None or monitor.fit_seconds is None else {"time/fit_seconds": monitor.fit_seconds}


def as_floats(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best-by-val/acc checkpoint, or None (test the weights in memory) when there is none, e.g. fast_dev_run.

    A run started with ckpt_path= inherits the source run's best path, which may no longer exist.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    monitored = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor]
    return next((cb.best_model_path for cb in monitored if cb.best_model_path and Path(cb.best_model_path).is_file()), None)


def log_dashboard(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    from mnist_precision.dashboard import write_dashboard, write_mlflow

    if not is_rank_zero():  # (the Trainer knows its rank only once fitting)
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            write_dashboard(logger.log_dir, cfg, metrics, trainer.global_step)
        elif isinstance(logger, MLFlowLogger):
            write_mlflow(logger, cfg, metrics, trainer.global_step)


RESTORE_RUN_FILES: list = []  # set by main() for a resume: puts the run's .hydra/ files back if the resume is refused
SWEEP_RESULTS: list[dict[str, float]] = []  # set by SweepReport: each finished job's metrics
FAILED_SWEEP_JOBS: list[str] = []  # set by SweepReport: each failed job's directory and error


class SweepReport(Callback):
    """At the end of a sweep, in the process that launched it: each job's metrics.json, read back from its directory.

    So the sweep's summary and exit status are right whichever launcher ran the jobs: in this process (Hydra's basic
    launcher), as local processes (submitit_local) or as SLURM jobs. Registered in conf/train.yaml (hydra.callbacks).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = sorted(path for path in Path(config.hydra.sweep.dir).iterdir() if path.is_dir() and not path.name.startswith("."))
        for job in jobs:
            metrics = json.loads((job / "metrics.json").read_text()) if (job / "metrics.json").is_file() else {"error": "no metrics.json"}
            if "error" in metrics:
                FAILED_SWEEP_JOBS.append(f"{job}: {metrics['error']}")
            else:
                SWEEP_RESULTS.append(metrics)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Each run leaves metrics.json in its run dir: the final metrics, or the error that stopped it (rank 0 alone).

    Returns val/acc_best, what a sweeper (Optuna) maximises: tuning on test/acc would fit the test set.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    setup_job_console()
    rank = launch_rank()
    new_run = rank == "0" and not cfg.resume  # (main() locked a resumed run before Hydra rewrote its .hydra/ files)
    at_start = job_entries(run_dir)
    if rank != "0":  # another process of a DDP job (see ddp_rank_argv): its own log, in the job's directory
        use_job_log(run_dir / f"{hydra_cfg.job.name}_rank_{rank}.log")
        LOG.info(f"rank {rank} of the job {' '.join(hydra_cfg.overrides.task)}")
    elif not cfg.resume and trained_by_this_slurm_job(run_dir):  # requeued by SLURM, relaunched by submitit: resume in place
        LOG.info(f"SLURM job {slurm_job_id()} was requeued: resuming {run_dir}")
        with open_dict(cfg):
            cfg.resume = str(run_dir)
    environment = dict(os.environ)
    os.environ[DDP_JOB] = json.dumps({"overrides": list(hydra_cfg.overrides.task), "run_dir": str(run_dir)})
    try:
        with run_lock(run_dir) if new_run else nullcontext():
            if rank == "0" and slurm_job_id():  # what a requeued job looks for (runs.requeued_run)
                (run_dir / SLURM_JOB_FILE).write_text(slurm_job_id())
            metrics = train(cfg)
    except Exception as error:
        error = explain_full_disk(error, run_dir)
        code = log_job_error(error)
        if rank != "0" or not is_rank_zero() or getattr(error, "requeued", False):
            # (requeued: the job runs again and writes its result then; a sweep's launcher must not see one now)
            raise SystemExit(code) from None
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        if sweep or not refused_input(error):
            write_metrics(run_dir, {"error": str(error)})
        elif not cfg.resume:  # nothing behind: TensorBoard and resume=latest would find an empty run
            remove_refused_run(run_dir, at_start, f"{hydra_cfg.job.name}.log")
        else:  # the run as it was: Hydra rewrote its .hydra/ files for this refused command
            for restore in RESTORE_RUN_FILES:
                restore()
        if not sweep:
            raise SystemExit(code) from None
        return None  # a sweep goes on; main() exits non-zero at the end (SweepReport)
    finally:
        end_distributed_job(environment)
    if rank != "0" or not is_rank_zero():
        return None
    try:
        write_metrics(run_dir, metrics)
    except OSError as error:
        LOG.error(f"error: {explain_full_disk(error, run_dir)}")
        raise SystemExit(1) from None
    LOG.info(summary(metrics, run_dir, cfg))
    return metrics.get("val/acc_best")


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """metrics.json, written whole or not at all (a full disk must not leave half a file for a sweep to read)."""
    partial = run_dir / "metrics.json.partial"
    try:
        partial.write_text(json.dumps(metrics, indent=2))
        partial.replace(run_dir / "metrics.json")
    except OSError:
        partial.unlink(missing_ok=True)
        if "error" not in metrics:  # the error that stopped a run is on the console and in train.log already
            raise


DDP_JOB = "MNIST_PRECISION_DDP_JOB"  # rank 0's job (overrides, run dir), for the processes started for other ranks


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


def is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def refused_input(error: Exception) -> bool:
    """Bad input (a UserError that is not a RunFailed): a single run refused for it leaves no directory behind. A sweep
    keeps its failed jobs' directories, where metrics.json says why."""
    return isinstance(error, UserError) and not isinstance(error, RunFailed)


def summary(metrics: dict[str, float], run_dir: Path, cfg: DictConfig) -> str:
    """The end of a run: results, times, and where to look (the run, and each logger's viewer)."""
    parts = [f"test/acc={metrics['test/acc']:.4f}"]
    if "val/acc_best" in metrics:
        parts.append(f"val/acc_best={metrics['val/acc_best']:.4f}")
    if "time/fit_seconds" in metrics:
        parts.append(f"fit {metrics['time/fit_seconds']:.1f} s")
    parts.append(f"wall {metrics['time/wall_seconds']:.1f} s")
    if "throughput/samples_per_sec" in metrics:
        parts.append(f"{metrics['throughput/samples_per_sec']:,.0f} samples/s")
    lines = ["  ".join(parts), f"run dir: {run_dir}"]
    for node in (cfg.get("logger") or {}).values():
        kind = str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]
        if kind == "TensorBoardLogger":
            lines.append(f"TensorBoard: tensorboard --logdir {run_dir}")
        elif kind == "MLFlowLogger":
            lines.append(f"MLflow: mlflow ui --backend-store-uri {node.tracking_uri}")
        elif kind == "CSVLogger":
            lines.append(f"CSV: {Path(node.save_dir) / node.name / 'metrics.csv'}")
    return "\n".join(lines)


def sweep_summary(results: list[dict[str, float]]) -> str:
    """Mean and spread of the sweep's test accuracy and training time (e.g. one recipe over seeds)."""
    import statistics

    def spread(key: str, unit: str, digits: int) -> str:
        values = [r[key] for r in results if key in r]
        if not values:
            return ""
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{key} {statistics.mean(values):.{digits}f}{unit} ± {std:.{digits}f}{unit} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"

    parts = [spread("test/acc", "", 4), spread("time/fit_seconds", " s", 2)]
    return f"sweep of {len(results)} job(s): " + "; ".join(part for part in parts if part)


def main() -> None:
    FAILED_SWEEP_JOBS.clear()
    SWEEP_RESULTS.clear()
    with report_user_errors():
        argv = ddp_rank_argv()  # rank 0's job, in a process Lightning started for another rank
        if argv is None:
            argv = sys.argv[1:]
            if override_value(argv, "resume") is None and (run := requeued_run(log_dir_from(argv))):
                argv = [*argv, f"resume={run}"]  # a requeued SLURM job runs its command again: it continues its run
            argv = train_argv(argv)
        sys.argv[1:] = argv
        first = launch_rank() == "0"
        if not first:  # the first process writes the run's .hydra/ files; the others run its config
            sys.argv.append("hydra.output_subdir=null")
        with resume_guard(sys.argv[1:] if first else []) as restore_run_files:
            RESTORE_RUN_FILES[:] = [restore_run_files]
            _hydra_main()
        if SWEEP_RESULTS:
            print(sweep_summary(SWEEP_RESULTS), flush=True)
        if FAILED_SWEEP_JOBS:
            raise UserError(f"{len(FAILED_SWEEP_JOBS)} job(s) of the sweep failed:\n  " + "\n  ".join(FAILED_SWEEP_JOBS))


if __name__ == "__main__":  # python -m mnist_precision.train: run the importable module's main(), the one whose
    from mnist_precision import train  # SWEEP_RESULTS Hydra's callback fills (this file runs a second time as __main__)

    train.main()
