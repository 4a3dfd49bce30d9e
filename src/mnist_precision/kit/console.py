"""What a run prints, in one place: the warnings and log lines known to be harmless, and where the rest go.

Hydra's job logging (`conf/hydra/job_logging/console.yaml`) sends plain messages to the console (warnings and
errors to stderr) and everything, timestamped, to the run's `train.log`. Python warnings join that log
(`logging.captureWarnings`), so a warning is in train.log as well as on the screen.

Only what the user can do nothing about is silenced, each with its reason. Anything else still shows.
Set `PYTHONWARNINGS` (e.g. `PYTHONWARNINGS=default`) to see every warning again: the filters below are then
not installed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from pathlib import Path

# (message pattern, why it is harmless here). Matched against both Python warnings and log records.
KNOWN_HARMLESS: list[tuple[str, str]] = [
    (r"💡 Tip: .*litlogger", "Lightning's advertisement for its cloud logger, printed by every Trainer"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "torch 2.10+ deprecates an API that Lightning 2.6's _pytree still calls; Lightning's to fix, no effect on results"),
    (r"Checkpoint directory .* exists and is not empty",
     "resume= writes into the run's own checkpoints/ on purpose: that is what resuming is"),
    (r"The dirpath has changed from .*, therefore .* won't be reloaded",
     "ckpt_path= and mnist-eval start a new run from another run's checkpoint: its best-k bookkeeping belongs to the "
     "old run and must not be reloaded"),
    (r"Precision \S+ is not supported by the model summary",
     "the summary's size column falls back to 32 bits a weight for 16-mixed/bf16-mixed (right: their weights are FP32) "
     "and for the master copy (a half model plus FP32 masters, 48 bits a weight: no single width is right)"),
    (r"It is recommended to use `self.log\('(train/loss_epoch|train/samples_per_sec|memory/bytes_per_param|"
     r"memory/optimizer_bytes_per_param)', \.\.\., sync_dist=True\)`",
     "under DDP: the training monitor logs the epoch's training loss already summed over the ranks (one all-reduce of the "
     "sums), samples/s from rank 0 already multiplied by the world size, and rank 0's bytes a parameter (every rank holds "
     "the same). Matched by key; sync_dist=True on these would cost one all-reduce each, an epoch, for nothing"),
    (r"is an Enum subclass and is now natively supported by torch.compile",
     "torchao 0.18 registers an Enum with torch's pytree on import, which torch 2.14 deprecates; nothing to do for users"),
    (r"OptimState(8bit|4bit|Fp8) does not implement _stable_hash_for_caching",
     "torchao 0.18's low-bit optimizer states lack a hash torch's compile cache asks for: the state is compiled again "
     "instead of taken from the cache; torchao's to add"),
    (r"To copy construct from a tensor, it is recommended to use sourceTensor\.detach\(\)\.clone\(\)",
     "torchao's optimizers (bf16-sr, adamw8bit, ...) keep the learning rate as a tensor, so that a schedule does not "
     "recompile their update; Lightning's LearningRateMonitor copies it with torch.tensor(), which torch warns about"),
    (r"'set_vital' is deprecated, please do not call",
     "torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch 2.14 deprecates; torchdata's to fix, no effect"),
    (r"No CUDA runtime is found, using CUDA_HOME",
     "torch.utils.cpp_extension, imported by torch's compile stack, reports a CUDA toolkit on a machine without a GPU"),
    (r"The following callbacks returned in `LightningModule.configure_callbacks` will override existing callbacks",
     "a module's configure_callbacks is called when it fits and again when it tests: the test's callbacks replace the fit's"),
    (r"SLURM auto-requeueing enabled\. Setting signal handlers\.",
     "under SLURM, printed by each fit and test: while training, LastCheckpoint's save-and-requeue takes the signal"),
    (r"Experiment with name \S+ not found\. Creating it\.",
     "MLFlowLogger's notice when it creates the run's experiment: each run has its own MLflow store (conf/logger/mlflow.yaml)"),
    (r"(Received|Bypassing) SIGTERM: 15",
     "Lightning's notice of a SIGTERM, printed per process; the error line says which signal stopped training and where "
     "the state was saved"),
]
TORCH_LOGGERS = ("torch.utils.cpp_extension", "torch.utils._pytree")  # where torch logs the known-harmless lines above
_PATTERN = re.compile("|".join(f"(?:{pattern})" for pattern, _ in KNOWN_HARMLESS))


def is_known_harmless(message: str) -> bool:
    return _PATTERN.search(message) is not None


class KnownNoise(logging.Filter):
    """Drops the log records (and captured warnings) listed in KNOWN_HARMLESS."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_known_harmless(record.getMessage())


class MessageOnly(logging.Formatter):
    """The console's format: the message alone. A logged traceback (log.exception) goes to train.log only."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


class BelowWarning(logging.Filter):
    """Passes INFO and below: the stdout handler's half (warnings and errors go to stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def setup_job_console() -> None:
    """For the Hydra entry points, once Hydra has configured the job's logging: Lightning's lines go through Hydra's
    handlers alone (whose KnownNoise filter drops the harmless ones), warnings join the log, and the known-harmless
    warnings are ignored. The `lightning` package adds its own stderr handler on import, which printed every
    Lightning line twice."""
    import lightning  # noqa: F401  (imported here so that its handler exists to be removed)

    logging.getLogger("lightning").handlers.clear()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's own handler prints its store's set-up at INFO
    logging.captureWarnings(True)
    logging.raiseExceptions = False  # a log file on a full disk must not print a traceback per line; the error says why
    threading.excepthook = _thread_exception
    for name in TORCH_LOGGERS:  # torch's loggers print through torch's own handler, not Hydra's: filter at the source
        if not any(isinstance(existing, KnownNoise) for existing in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(KnownNoise())
    if os.environ.get("PYTHONWARNINGS"):
        return
    for pattern, _ in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")


def quiet_profiler_logs() -> None:
    """For a profiled run (debug=profiler), before torch loads: torch's C++ log (read once, when torch loads) and Kineto,
    its profiler library, print the profiler's own progress and caveats on stderr ("profiler_start", "Memory block of
    unknown size was allocated before the profiling started", "gpuGetDeviceCount failed" without a GPU), nothing a
    user acts on. Set TORCH_CPP_LOG_LEVEL=WARNING or KINETO_LOG_LEVEL=0 to see them."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above its highest level (USDT): nothing


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """A background thread that failed to write (TensorBoard's event writer on a full disk) prints nothing: the main
    thread meets the same error at its next write and reports it in one message (errors.explain_full_disk)."""
    from mnist_precision.kit.errors import WRITE_ERRORS

    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRORS:
        return
    threading.__excepthook__(args)


def use_job_log(path: Path, console: bool = True) -> None:
    """Send what Hydra's job logging writes to the job's log file to `path` instead: for the other processes of a DDP
    job, which share the job's directory (train.log is rank 0's). Without `console`, to that file alone: processes that
    share rank 0's terminal would print each error again."""
    root = logging.getLogger()
    if not console:
        for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
            root.removeHandler(handler)
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        replacement = logging.FileHandler(path)
        replacement.setFormatter(handler.formatter)
        replacement.setLevel(handler.level)
        for log_filter in handler.filters:
            replacement.addFilter(log_filter)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(replacement)
