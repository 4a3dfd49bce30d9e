"""Builds a run from its config: the task's data module and LightningModule, and the Trainer with the machinery around
them (precision plugins, checkpoint IO, callbacks, loggers), then applies the guarantees and speedups to the module.

`data` and `model` are built with `hydra.utils.instantiate` from their `_target_`, whatever classes they name; what
the machinery needs of them is the contract in docs/adapting.md.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, open_dict

from mnist_precision.kit import guarantees, speedups
from mnist_precision.kit.checkpoints import AtomicCheckpointIO
from mnist_precision.kit.checks import check_config, check_model, check_optimizer_and_scheduler, signature_problems
from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.dashboard import mlflow_run_to_resume
from mnist_precision.kit.errors import UserError, first_line
from mnist_precision.kit.precision import precision_arguments, runs_on_cpu
from mnist_precision.kit.runs import quote_values
from mnist_precision.kit.schema import load_schemas


@dataclass
class Run:
    """What `build_run` makes of a config: fit it, then test it."""

    datamodule: L.LightningDataModule
    model: L.LightningModule
    trainer: L.Trainer

    def fit(self, ckpt_path: str | None = None) -> None:
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)

    def test(self, ckpt_path: str | None = None, verbose: bool = True) -> dict[str, float]:
        return self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=verbose)[0]


def compose_training_config(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """The config `mnist-train <overrides>` composes, outside a Hydra run (tests, mnist-bench's workers)."""
    load_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=quote_values(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)  # `${hydra:runtime.output_dir}` has no value outside a run
    return cfg


def build_run(cfg: DictConfig) -> Run:
    check_config(cfg)
    skip_nvml_probe_without_gpu()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    torch.set_num_threads(intra_op_threads(cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    precision = precision_arguments(cfg.precision, cfg.trainer)
    for plugin in precision.get("plugins", []):
        if hasattr(plugin, "optimizer_config") and cfg.get("optimizer") is not None:  # bf16-kahan, bf16-sr
            cfg = copy.deepcopy(cfg)  # (the caller's config keeps the optimizer the user chose: a resume builds from it again)
            with open_dict(cfg):
                cfg.optimizer = plugin.optimizer_config(cfg.optimizer)
    check_optimizer_and_scheduler(cfg, precision.get("plugins", []))
    model = build("model", cfg.model)
    check_model(model)
    if cfg.compile:
        speedups.compile_network(model, on_cpu=runs_on_cpu(cfg.trainer.accelerator))
    loggers = [build(f"logger.{name}", node, **mlflow_run_to_resume(node, cfg.resume))
               for name, node in (cfg.get("logger") or {}).items() if node is not None]
    callbacks = [build(f"callbacks.{name}", node) for name, node in (cfg.get("callbacks") or {}).items() if node is not None]
    callbacks = [callback for callback in callbacks if usable(callback, cfg.trainer, loggers)]
    plugins = [AtomicCheckpointIO(), *precision.pop("plugins", [])]
    no_profiler = {} if cfg.trainer.get("profiler") else {"profiler": speedups.NoProfiler()}  # what None means, minus its cost
    # _convert_: Lightning reads plain dicts (max_time={hours: 12}), not OmegaConf's DictConfig.
    trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, **precision, **no_profiler,
                    _convert_="all")
    datamodule = build("data", cfg.data)
    guarantees.apply(trainer, model, keep_saved_threads=cfg.threads == "auto")
    trainer.callbacks.append(speedups.Speedups())
    return Run(datamodule, model, trainer)


def intra_op_threads(setting: int | str) -> int:
    """`threads=N`: N. `threads=auto`: torch's default (OMP_NUM_THREADS, else one per core) unless other processes keep
    the cores busy, then one thread per core they leave free (the 1-minute load average), at least one. On a shared
    machine a thread per core oversubscribes: docs/performance.md has the measurement."""
    if setting != "auto":
        return int(setting)
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return default
    free = len(os.sched_getaffinity(0)) - os.getloadavg()[0]
    return max(1, min(default, round(free)))


def usable(callback: L.Callback, trainer: DictConfig, loggers: list[Any]) -> bool:
    """Lightning refuses a progress bar callback when the bar is off, and a learning-rate monitor without a logger."""
    if isinstance(callback, ProgressBar):
        return bool(trainer.enable_progress_bar)
    if isinstance(callback, LearningRateMonitor):
        return bool(loggers)
    return True


def build(key: str, node: DictConfig | None, **kwargs: Any) -> Any:
    """`instantiate(node)`; an argument the target refuses (unknown, wrong type or value) is one message naming the key.

    The target's own signature is the schema of a third-party object (Lightning's Trainer, torch's optimizers): its
    annotated simple types are checked first, since many targets take a wrong type silently (the Trainer reads
    `enable_progress_bar="maybe"` as true).
    """
    if node is not None and "_target_" in node:
        problems = signature_problems(key, node)
        if problems:
            raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:  # a target that instantiates its own
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"{key}: {first_line(cause)}") from None


def skip_nvml_probe_without_gpu() -> None:
    """On a machine without an NVIDIA GPU, stop torch from probing for one on every optimizer step.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that `torch.cuda.is_available()` asks NVML
    (which never initialises CUDA, and so never breaks a later fork). torch's Adam calls it on every step
    (`Optimizer._accelerator_graph_capture_health_check`), and until CUDA is initialised the answer is not
    cached: with a CUDA build of torch and no driver, every step loads libnvidia-ml again and fails
    (docs/performance.md). With no GPU there is no fork to protect.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
