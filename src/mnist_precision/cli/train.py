"""`mnist-train` (also `python -m mnist_precision.cli.train`): fit, then test the best checkpoint.

The whole path, top to bottom: `main` checks the command line (and turns `resume=` into the run's own overrides) before
Hydra starts; `_hydra_main` runs one job of it in its run directory; `train` builds the run (kit.build), fits, tests and
gathers the metrics. Only Hydra is imported before the command line is parsed, so `--help` and bad overrides answer in
a fraction of a second; torch and Lightning load when a run starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from mnist_precision.kit.config import CONF_DIR, command_name
from mnist_precision.kit.console import quiet_profiler_logs, setup_job_console, use_job_log
from mnist_precision.kit.dashboard import tags
from mnist_precision.kit.errors import (
    RunFailed,
    RunRefused,
    TrainingInterrupted,
    UserError,
    explain_checkpoint_mismatch,
    explain_failed_rendezvous,
    explain_full_disk,
    explain_lightning_refusal,
    explain_lost_peer,
    first_line,
    log_job_error,
    report_user_errors,
)
from mnist_precision.kit.launch import (
    DDP_JOB,
    SLURM_JOB_FILE,
    ddp_rank_argv,
    end_distributed_job,
    launch_rank,
    requeue_slurm_job,
    requeued_run,
    slurm_job_id,
    started_by_lightning_for_another_rank,
    trained_by_this_slurm_job,
)
from mnist_precision.kit.results import summary, write_metrics
from mnist_precision.kit.runs import (
    LAST_CHECKPOINT,
    check_training_left,
    job_entries,
    log_dir_from,
    override_value,
    remove_refused_run,
    resume_guard,
    run_lock,
    suggest_close_matches,
    train_argv,
)
from mnist_precision.kit.schema import load_schemas

if TYPE_CHECKING:
    import lightning as L

    from mnist_precision.kit.build import Run

LOG = logging.getLogger("mnist_precision")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming if asked), test the best checkpoint, log hparams with the final metrics; return them."""
    from mnist_precision.kit.build import build_run
    from mnist_precision.kit.dashboard import log_dashboard

    started = time.perf_counter()
    run = build_run(cfg)
    ckpt_path = str(Path(cfg.resume) / LAST_CHECKPOINT) if cfg.resume else cfg.ckpt_path
    if ckpt_path:
        check_training_left(run.trainer, ckpt_path, f"resume={cfg.resume}" if cfg.resume else f"ckpt_path={cfg.ckpt_path}")
    log_dashboard(run.trainer, cfg, {}, "running")  # the layout and the knobs from the start; the metrics at the end
    try:
        metrics = fit_and_test(run, cfg, ckpt_path)
    except Exception as error:  # the HParams row says how the run ended, and why
        with suppress(OSError):
            log_dashboard(run.trainer, cfg, {}, f"{'stopped' if isinstance(error, TrainingInterrupted) else 'failed'}: {first_line(error)}")
        raise
    metrics["time/wall_seconds"] = time.perf_counter() - started
    log_dashboard(run.trainer, cfg, metrics, "finished")
    return metrics


def fit_and_test(run: Run, cfg: DictConfig, ckpt_path: str | None) -> dict[str, float]:
    """Fit (resuming from `ckpt_path`), test the best checkpoint; the final metrics, times and memory."""
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mnist_precision.kit.monitor import TrainingMonitor, peak_memory_mb

    try:
        with (explain_checkpoint_mismatch(ckpt_path), explain_failed_rendezvous(run.trainer), explain_lost_peer(run.trainer),
              explain_lightning_refusal(run.trainer)):
            run.fit(ckpt_path)
    except SIGTERMException:
        raise interrupted(run.trainer) from None
    metrics = as_floats(run.trainer.callback_metrics)  # test() starts a fresh set
    best = best_checkpoint(run.trainer, cfg.monitor.metric)
    if best is not None:
        metrics[f"{cfg.monitor.metric}_best"] = float(best.best_model_score)
    monitor = next((cb for cb in run.trainer.callbacks if isinstance(cb, TrainingMonitor)), None)
    if monitor is not None and monitor.fit_seconds is not None:
        metrics["time/fit_seconds"] = monitor.fit_seconds
    if cfg.test:
        run.test(best.best_model_path if best is not None else None, verbose=False)  # the summary block reports the results
        metrics.update(as_floats(run.trainer.callback_metrics))
    metrics["memory/peak_mb"] = peak_memory_mb(run.trainer.strategy.root_device)
    metrics["threads"] = torch.get_num_threads()  # (threads=auto's choice, or the count a resumed run kept)
    return metrics


def interrupted(trainer: L.Trainer) -> TrainingInterrupted:
    """What a signal that stopped training says: where it stopped, what was saved, and how to go on."""
    from mnist_precision.kit.checkpoints import LastCheckpoint

    last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
    signum = (last.signal if last else None) or signal.SIGTERM
    where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
    if last is None or not last.saved_on_signal:
        return TrainingInterrupted(f"stopped by {signal.Signals(signum).name} at {where}; no checkpoint was saved.", signum)
    run_dir = Path(last.path).parent.parent
    if last.exact:
        saved = f"stopped by {signal.Signals(signum).name} at {where}; the exact state is saved in {last.path}."
    else:
        saved = (f"stopped by {signal.Signals(signum).name} at {where}; the state is saved in {last.path}, but not exactly: "
                 "the training loader cannot save its position, so a resume trains the rest of this epoch on a fresh pass "
                 "over it.")
    if signum in (signal.SIGUSR1, signal.SIGUSR2) and slurm_job_id():  # SLURM's warning before the time limit
        requeued = requeue_slurm_job() if trainer.is_global_zero else ""
        if requeued.startswith("requeued"):
            return TrainingInterrupted(f"{saved} {requeued}.", signum, requeued=True)
        saved += f" {requeued}."
    return TrainingInterrupted(f"{saved}\nContinue with: {command_name('train')} resume={run_dir}", signum)


def as_floats(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def best_checkpoint(trainer: L.Trainer, monitor: str):
    """The ModelCheckpoint that keeps the best checkpoints by the task's monitored metric, if it saved one (none under
    fast_dev_run; a run started with ckpt_path= inherits the source run's best path, which may no longer exist)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor == monitor
                 and cb.best_model_path and Path(cb.best_model_path).is_file()), None)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Each run leaves metrics.json in its run dir: the final metrics, or the error that stopped it (rank 0 alone).

    Returns the best value of the monitored validation metric, what a sweeper (Optuna) optimises: tuning on a test
    metric would fit the test set.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.trainer.get("profiler"):
        quiet_profiler_logs()
    setup_job_console()
    rank = launch_rank()
    new_run = rank == "0" and not cfg.resume  # (main() locked a resumed run before Hydra rewrote its .hydra/ files)
    at_start = job_entries(run_dir)
    if rank != "0":  # another process of a DDP job (see ddp_rank_argv): its own log, in the job's directory
        use_job_log(run_dir / f"{hydra_cfg.job.name}_rank_{rank}.log", console=not started_by_lightning_for_another_rank())
        LOG.info(f"rank {rank} of the job {' '.join(hydra_cfg.overrides.task)}")
    elif not cfg.resume and trained_by_this_slurm_job(run_dir):  # requeued by SLURM, relaunched by submitit: resume in place
        LOG.info(f"SLURM job {slurm_job_id()} was requeued: resuming {run_dir}")
        with open_dict(cfg):
            cfg.resume = str(run_dir)
    environment = dict(os.environ)
    search_path = [arg for arg in hydra_cfg.overrides.hydra if arg.startswith("hydra.searchpath=")]  # where a task's configs are
    os.environ[DDP_JOB] = json.dumps({"overrides": [*hydra_cfg.overrides.task, *search_path], "run_dir": str(run_dir)})
    try:
        with run_lock(run_dir) if new_run else nullcontext():
            if rank == "0" and slurm_job_id():  # what a requeued job looks for (launch.requeued_run)
                (run_dir / SLURM_JOB_FILE).write_text(slurm_job_id())
            metrics = train(cfg)
    except Exception as error:
        error = explain_full_disk(error, run_dir)
        code = log_job_error(error)
        if rank != "0" or not is_rank_zero() or getattr(error, "requeued", False):
            # (requeued: the job runs again and writes its result then; a sweep's launcher must not see one now)
            raise SystemExit(0 if started_by_lightning_for_another_rank() else code) from None
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        refused = refused_input(error)
        if sweep or not refused:
            write_metrics(run_dir, {"error": str(error)}, tags(cfg))
        elif not cfg.resume:  # nothing behind: TensorBoard and resume=latest would find an empty run
            remove_refused_run(run_dir, at_start, f"{hydra_cfg.job.name}.log")
        if not sweep:  # (a refused resume puts the run's .hydra/ files back: runs.resume_guard)
            raise (RunRefused(code) if refused else SystemExit(code)) from None
        return None  # a sweep goes on, and ends with its summary and exit status (results.SweepReport)
    finally:
        end_distributed_job(environment)
    if rank != "0" or not is_rank_zero():
        return None
    try:
        write_metrics(run_dir, metrics, tags(cfg))
    except OSError as error:
        LOG.error(f"error: {explain_full_disk(error, run_dir)}")
        raise SystemExit(1) from None
    LOG.info(summary(metrics, run_dir, cfg))
    return metrics.get(f"{cfg.monitor.metric}_best", metrics.get(cfg.monitor.metric))


def is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def refused_input(error: Exception) -> bool:
    """Bad input (a UserError that is not a RunFailed): a single run refused for it leaves no directory behind. A sweep
    keeps its failed jobs' directories, where metrics.json says why."""
    return isinstance(error, UserError) and not isinstance(error, RunFailed)


def main() -> None:
    with report_user_errors():
        load_schemas()
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
        with resume_guard(sys.argv[1:] if first else []), suggest_close_matches(sys.argv[1:], "train"):
            _hydra_main()


if __name__ == "__main__":
    main()
