"""The checks of a composed configuration, made before any work: each bad value is one message naming its key.

Hydra checks types and unknown keys while composing (schema.py); `check_config` checks ranges and combinations;
`signature_problems` checks a third-party target's arguments against its own annotations; the optimizer and scheduler
are built and stepped on a stand-in; the built module is checked by `check_model`. (What the command line asks of
run directories and launchers is checked before Hydra composes anything: runs.py.)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import typing
import warnings
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationValidationError

from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.errors import UserError, first_line
from mnist_precision.kit.runs import use_precision

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_config(cfg: DictConfig) -> None:
    """Raise one `UserError` listing every invalid value, before anything is built."""
    problems = [
        *_check_number(cfg, "seed", integer=True, minimum=0),
        *_check_schemas(cfg),
        *(_check_number(cfg, "optimizer.lr", minimum=0, exclusive=True) if OmegaConf.select(cfg, "optimizer.lr") is not None else []),
        *_check_number(cfg, "trainer.max_epochs", integer=True, minimum=-1),
    ]
    if OmegaConf.select(cfg, "callbacks.last_checkpoint") is not None:
        problems += _check_number(cfg, "callbacks.last_checkpoint.keep_every_n_epochs", integer=True, minimum=0)
    if cfg.trainer.get("gradient_clip_val") is not None:
        problems += _check_number(cfg, "trainer.gradient_clip_val", minimum=0)
    for key, minimum in {"accumulate_grad_batches": 1, "log_every_n_steps": 0, "check_val_every_n_epoch": 1, "max_steps": -1}.items():
        if cfg.trainer.get(key) is not None:  # (Lightning takes a negative log_every_n_steps silently)
            problems += _check_number(cfg, f"trainer.{key}", integer=True, minimum=minimum)
    if "precision" in cfg.trainer:  # what a lightning-hydra-template user types; Trainer would take it over ours
        problems.append(f"trainer.precision is not read here: precision is its own config group; {use_precision(str(cfg.trainer.precision))}")
    if OmegaConf.select(cfg, "monitor.mode") not in ("min", "max"):
        problems.append(f"monitor.mode must be min or max, got {OmegaConf.select(cfg, 'monitor.mode')!r}")
    if not isinstance(OmegaConf.select(cfg, "monitor.metric"), str) or not OmegaConf.select(cfg, "monitor.metric"):
        problems.append(f"monitor.metric must name a logged metric (val/acc, val/loss, ...), got {OmegaConf.select(cfg, 'monitor.metric')!r}")
    if not OmegaConf.is_list(cfg.get("tags")) or not all(isinstance(tag, (str, int, float)) for tag in cfg.tags):
        problems.append(f"tags must be a list of labels, as in tags=[baseline,ablation], got {cfg.get('tags')!r}")
    if not isinstance(cfg.get("test"), bool):
        problems.append(f"test must be true or false, got {cfg.get('test')!r}")
    if not isinstance(cfg.get("compile", False), bool):
        problems.append(f"compile must be true or false, got {cfg.get('compile')!r}")
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if OmegaConf.select(cfg, "precision.name") in ("16-master", "bf16-master") and ("fsdp" in strategy or "deepspeed" in strategy):
        problems.append(f"precision={cfg.precision.name} cannot be combined with strategy={strategy}: that strategy shards the "
                        "parameters and keeps its own FP32 copies. Use its own mixed precision (precision=bf16-mixed) or strategy=ddp.")
    threads = cfg.get("threads")
    if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        problems.append(f"threads must be auto or a number of threads >= 1, got {threads!r}")
    if cfg.matmul_precision not in ("highest", "high", "medium"):
        problems.append(f"matmul_precision must be highest, high or medium, got {cfg.matmul_precision!r}")
    problems += _check_devices(cfg.trainer)
    problems += _check_nodes(cfg.trainer)
    problems += _unread_keys(cfg)
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))


def _unread_keys(cfg: DictConfig) -> list[str]:
    """Keys nothing reads, which Hydra's advice for an unknown key (`+key=...`) leads to: a top-level key the command's
    config does not define (`+tag=x`), or a key appended under a node that no `_target_` takes it to (`+monitor.x=1`).
    A key appended to a `_target_`'s node is checked against that target's signature (`signature_problems`)."""
    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    known = _defined_keys(hydra_cfg.job.config_name)
    problems = [f"{key}: nothing reads this key{_close_match(key, known)} (a key your own code reads belongs in "
                f"conf/{hydra_cfg.job.config_name}.yaml)" for key in cfg if key not in known]
    for override in hydra_cfg.overrides.task:
        key = override.partition("=")[0]
        if not key.startswith("+") or key.startswith("++") or "." not in key or key.startswith("+hydra."):
            continue
        parts = key[1:].split(".")
        nodes = [OmegaConf.select(cfg, ".".join(parts[:n])) for n in range(1, len(parts) + 1)]
        parent = nodes[-2]
        if not OmegaConf.is_dict(parent) or parts[-1] not in parent:
            continue  # removed again by a later override (a resume's ~callbacks.<name>)
        if parts[0] in known and not any(OmegaConf.is_dict(node) and "_target_" in node for node in nodes):
            siblings = [str(name) for name in parent if name != parts[-1]]
            problems.append(f"{key}: nothing reads {key[1:]}{_close_match(parts[-1], siblings, '.'.join(parts[:-1]) + '.')}")
    return problems


def _defined_keys(config_name: str) -> set[str]:
    """The top-level keys a primary config (conf/<name>.yaml) and the configs and groups in its defaults define."""
    config = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    keys = {"hydra"} | {str(key) for key in config if key != "defaults"}
    for entry in config.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            keys |= _defined_keys(entry)
        elif OmegaConf.is_dict(entry):
            keys |= {str(group).removeprefix("override ").removeprefix("optional ") for group in entry}
    return keys


def _close_match(key: str, candidates: typing.Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean {prefix}{match[0]}?)" if match else ""


def _check_schemas(cfg: DictConfig) -> list[str]:
    """The ranges and choices the groups' schemas declare (schema.at_least, schema.one_of); Hydra checked the types."""
    problems = []
    for group, node in cfg.items():
        if not OmegaConf.is_dict(node) or not dataclasses.is_dataclass(OmegaConf.get_type(node)):
            continue
        for spec in dataclasses.fields(OmegaConf.get_type(node)):
            key = f"{group}.{spec.name}"
            try:
                value = node.get(spec.name)
            except InterpolationValidationError as error:  # data.shuffle_seed: ${seed} with seed=abc
                problems.append(f"{key}: {first_line(error)}")
                continue
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
            "(docs/scaling.md)"]


def signature_problems(key: str, node: DictConfig) -> list[str]:
    """Each configured argument whose value does not fit the target's annotation, where that annotation is made of
    bool, int, float, str, None, Literal, Optional and Union (anything else, a class or a container, is the target's
    to check). A bool is not an int here, and an int is a float."""
    from hydra.utils import get_object

    try:
        target = get_object(node._target_)
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # an unknown target is instantiate's to report; unresolvable annotations: nothing to check
        return []
    problems = []
    for name, value in node.items():
        if name.startswith("_") or name not in hints or OmegaConf.is_config(value):
            continue
        expected = _simple_types(hints[name])
        if expected is not None and not any(_fits(value, kind) for kind in expected):
            described = " or ".join(sorted({_describe(kind) for kind in expected}))
            problems.append(f"{key}.{name} must be {described}, got {value!r}")
    return problems


def _simple_types(annotation: Any) -> list[Any] | None:
    """The annotation's alternatives if all are simple (bool, int, float, str, None, a Literal's values), else None."""
    if annotation in (bool, int, float, str, type(None)):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [("literal", value) for value in typing.get_args(annotation)]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        parts = [_simple_types(arg) for arg in typing.get_args(annotation)]
        return None if any(part is None for part in parts) else [kind for part in parts for kind in part]
    return None


def _fits(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):
        return value == kind[1] and type(value) is type(kind[1])
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind: Any) -> str:
    if isinstance(kind, tuple):
        return repr(kind[1])
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}[kind]


def check_model(model: L.LightningModule) -> None:
    """What the built module must be: a LightningModule; no layer without weights (a width of 0 trains to chance
    accuracy without any error); hyperparameters that a checkpoint holds as plain values (every checkpoint is loaded
    with `weights_only=True`, which refuses pickled objects)."""
    if not isinstance(model, L.LightningModule):
        raise UserError(f"model: {type(model).__qualname__} is not a LightningModule (model._target_ must build one).")
    empty = [f"{name} {tuple(parameter.shape)}" for name, parameter in model.named_parameters() if parameter.numel() == 0]
    if empty:
        raise UserError(f"model: layers with no weights cannot train: {', '.join(empty)}. Check the network's sizes.")
    objects = [f"{name} ({type(value).__qualname__})" for name, value in model.hparams.items() if not plain(value)]
    if objects:
        raise UserError(
            f"model: save_hyperparameters() stored objects a checkpoint cannot hold as plain values: {', '.join(objects)}. "
            "Leave them out (self.save_hyperparameters(ignore=[...])), or take their configs and build them in the module "
            "as the MNIST task does, which also lets load_from_checkpoint rebuild it."
        )


def plain(value: Any) -> bool:
    """Whether torch.load(weights_only=True) reads a value back: None, bool, int, float, str, tensors, and lists,
    tuples and dicts of those."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and plain(item) for key, item in value.items())
    return False


def check_optimizer_and_scheduler(cfg: DictConfig, precision_plugins: list[Any]) -> None:
    """What the schemas cannot see, before any work, for a config with `optimizer` and `scheduler` groups: torch checks
    an optimizer's arguments only when it is built (inside fit) and a scheduler's only as it steps (StepLR's step_size=0
    divides by zero at its second step). Both are built here on a stand-in parameter and stepped twice; a learning rate
    that is 0 for the first step, or from the second on, is refused too (onecycle's max_lr=0, exponential's gamma=0):
    such a run ends at chance accuracy with exit 0. A precision plugin that cannot drive the optimizer says so here."""
    if cfg.get("optimizer") is None:
        return
    from mnist_precision.kit.build import build

    optimizer_factory = build("optimizer", cfg.optimizer)
    scheduler_node = OmegaConf.select(cfg, "scheduler.lr_scheduler")
    scheduler_factory = build("scheduler.lr_scheduler", scheduler_node) if scheduler_node is not None else None
    more_than_one_step = OmegaConf.select(cfg, "scheduler.interval") == "step" or cfg.trainer.max_epochs != 1
    try:
        optimizer = optimizer_factory(params=[torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as error:
        raise UserError(f"optimizer: {error}") from None
    for plugin in precision_plugins:
        if hasattr(plugin, "check_optimizer"):
            try:
                plugin.check_optimizer(optimizer, cfg.trainer.get("gradient_clip_val"))
            except ValueError as error:
                raise UserError(f"precision={plugin.precision}: {error}") from None
    learning_rates = [optimizer.param_groups[0]["lr"]]
    if scheduler_factory is not None:
        stand_in = {"total_steps": 10} if "total_steps" in inspect.signature(scheduler_factory).parameters else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler = scheduler_factory(optimizer=optimizer, **stand_in)
                learning_rates = [optimizer.param_groups[0]["lr"]]
                for _ in range(2):
                    optimizer.step()
                    scheduler.step()
                    learning_rates.append(optimizer.param_groups[0]["lr"])
        except (ArithmeticError, TypeError, ValueError) as error:
            raise UserError(f"scheduler.lr_scheduler: {type(error).__name__}: {error}") from None
    first, second = learning_rates[0], learning_rates[1] if len(learning_rates) > 1 else learning_rates[0]
    if not (math.isfinite(first) and first > 0):
        raise UserError(f"the learning rate of the first step would be {first} (optimizer and scheduler settings): nothing would train.")
    if more_than_one_step and not (math.isfinite(second) and second > 0):
        raise UserError(f"the learning rate would be {second} after the first scheduler step (scheduler.lr_scheduler): "
                        "training would stop there.")
