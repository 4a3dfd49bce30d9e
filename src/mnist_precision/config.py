"""Where the project's files live, the resolver the configs use, and the value checks run before any work."""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib.metadata import entry_points
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnist_precision import schema  # noqa: F401  (registers the config groups' schemas with Hydra)
from mnist_precision.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # src/mnist_precision/config.py -> project root (editable install)
CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_LOG_DIR = PROJECT_ROOT / "logs"


@functools.cache
def command_name(task: str) -> str:
    """The console script that runs `<this package>.<task>:main`: `mnist-train` here, whatever a renamed copy calls it.

    From the installed entry points, else from this checkout's pyproject.toml (a copy not yet reinstalled), else
    `python -m <package>.<task>`. The help texts and messages use it, so a renamed template names its own commands.
    """
    target = f"{__package__}.{task}:main"
    for entry_point in entry_points(group="console_scripts"):
        if entry_point.value == target:
            return entry_point.name
    try:
        import tomllib

        scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        return next(name for name, value in scripts.items() if value == target)
    except (ImportError, OSError, KeyError, StopIteration):
        return f"python -m {__package__}.{task}"


def run_name_suffix(override_dirname: str, limit: int = 80) -> str:
    """`_precision=16-master,model=cnn`: what a run's overrides change, appended to its directory's name, so TensorBoard's
    run list and legends say what differs. Empty without overrides; `/` becomes `-`, quotes go, cut at `limit`."""
    name = override_dirname.replace("/", "-").replace("'", "").replace('"', "")[:limit]
    return f"_{name}" if name else ""


OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("run_name_suffix", run_name_suffix, replace=True)  # run and sweep-job directory names
OmegaConf.register_new_resolver("command", command_name, replace=True)  # ${command:train} in the help texts
OmegaConf.register_new_resolver("basename", lambda path: Path(path).name, replace=True)  # the MLflow run's name

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_config(cfg: DictConfig) -> None:
    """Raise one `UserError` listing every invalid value, before anything is built."""
    problems = [
        *_check_schemas(cfg),
        *_check_number(cfg, "optimizer.lr", minimum=0, exclusive=True),
        *_check_number(cfg, "trainer.max_epochs", integer=True, minimum=-1),
        *_check_number(cfg, "seed", integer=True, minimum=0),
    ]
    if OmegaConf.select(cfg, "callbacks.training_monitor") is not None:
        problems += _check_number(cfg, "callbacks.training_monitor.patience", integer=True, minimum=1)
    if OmegaConf.select(cfg, "callbacks.last_checkpoint") is not None:
        problems += _check_number(cfg, "callbacks.last_checkpoint.keep_every_n_epochs", integer=True, minimum=0)
    if cfg.trainer.get("gradient_clip_val") is not None:
        problems += _check_number(cfg, "trainer.gradient_clip_val", minimum=0)
    for key, minimum in {"accumulate_grad_batches": 1, "log_every_n_steps": 0, "check_val_every_n_epoch": 1, "max_steps": -1}.items():
        if cfg.trainer.get(key) is not None:  # (Lightning takes a negative log_every_n_steps silently)
            problems += _check_number(cfg, f"trainer.{key}", integer=True, minimum=minimum)
    if "precision" in cfg.trainer:  # what a lightning-hydra-template user types; Trainer would take it over ours
        problems.append(f"trainer.precision is not read here: precision is its own config group. Use precision={cfg.trainer.precision}")
    if cfg.matmul_precision not in ("highest", "high", "medium"):
        problems.append(f"matmul_precision must be highest, high or medium, got {cfg.matmul_precision!r}")
    problems += _check_devices(cfg.trainer)
    problems += _check_nodes(cfg.trainer)
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))


def _check_schemas(cfg: DictConfig) -> list[str]:
    """The ranges and choices the groups' schemas declare (schema.at_least, schema.one_of); Hydra checked the types."""
    problems = []
    for group in ("data", "model", "precision", "scheduler"):
        node = cfg.get(group)
        if node is None or not dataclasses.is_dataclass(OmegaConf.get_type(node)):
            continue
        for spec in dataclasses.fields(OmegaConf.get_type(node)):
            key, value = f"{group}.{spec.name}", node.get(spec.name)
            if "choices" in spec.metadata and value not in spec.metadata["choices"]:
                choices = ", ".join(str(choice).lower() for choice in spec.metadata["choices"])
                problems.append(f"{key} must be one of {choices}, got {value!r}")
            elif "minimum" in spec.metadata:
                problems += _check_number(cfg, key, integer=spec.type in (int, "int"), minimum=spec.metadata["minimum"],
                                          exclusive=spec.metadata["above"])
    return problems


def _check_number(cfg: DictConfig, key: str, integer: bool = False, minimum: float = 0, exclusive: bool = False) -> list[str]:
    value = OmegaConf.select(cfg, key)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return [f"{key} must be {kind}, got {value!r}"]
    if value < minimum or (exclusive and value == minimum):
        return [f"{key} must be {'>' if exclusive else '>='} {minimum}, got {value}"]
    return []


def _check_devices(trainer: DictConfig) -> list[str]:
    import torch  # here, not at the top: `mnist-train --help` must not wait for torch

    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        return [f"trainer.accelerator={accelerator!r} is not one of {', '.join(ACCELERATORS)}"]
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return [f"trainer.accelerator={accelerator} but torch sees no CUDA GPU here; use trainer=cpu (or trainer=ddp_cpu)"]
    if accelerator == "mps" and not torch.backends.mps.is_available():
        return ["trainer.accelerator=mps but MPS is not available here; use trainer=cpu"]
    devices = trainer.get("devices", "auto")
    if devices in ("auto", -1, "-1") or isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return []
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        return [f"trainer.devices must be a positive integer, auto or a list of device ids, got {devices!r}"]
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available = torch.cuda.device_count() if uses_gpu else (os.cpu_count() or 1)
    kind = "GPUs" if uses_gpu else "CPU cores"
    if devices > available:
        return [f"trainer.devices={devices} but this machine has {available} {kind}"]
    return []


def _check_nodes(trainer: DictConfig) -> list[str]:
    """Several machines need a launcher that starts and numbers the other nodes; without one, rank 0 would wait
    for nodes that never come."""
    nodes = trainer.get("num_nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        return [f"trainer.num_nodes must be a positive integer, got {nodes!r}"]
    if nodes == 1:
        return []
    from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    launched = any(environment.detect() for environment in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment))
    if launched or {"NODE_RANK", "MASTER_ADDR"} <= os.environ.keys():
        return []
    return [f"trainer.num_nodes={nodes} but this process is not one of several nodes: run it under SLURM "
            "(hydra/launcher=slurm), torchrun, or start it on each node with NODE_RANK, MASTER_ADDR and MASTER_PORT set "
            "(README: Scaling out)"]
