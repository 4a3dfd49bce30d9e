"""Typed schemas for Hydra's structured configs, and the machinery's own: precision and scheduler.

Each YAML option names its schema first in its defaults list (`conf/precision/16-master.yaml`:
`- /precision_master_schema@_here_`), so Hydra checks it while composing, before any work starts: a key the schema does
not have is refused, and a value of the wrong type or outside a choice (`scheduler.interval=daily`) is one message
naming the key. Ranges are declared with `at_least` and checked by `checks.check_config`.

The task's schemas (data, networks, LightningModule) live in `<package>/task/schema.py`, registered the same way with
`register`; `load_schemas()` imports both before a config is composed. Third-party objects (Lightning's Trainer and
callbacks, torch's optimizers and schedulers) keep their own signatures as schema: `build.build` checks those.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mnist_precision.kit.config import PACKAGE


def schema_name(group: str, name: str) -> str:
    """The ConfigStore name of a group's schema: an option names it first in its defaults, `- /<group>_<name>_schema@_here_`."""
    return f"{group}_{name}_schema"


def register(schemas: dict[tuple[str, str], type]) -> None:
    """Store each `(group, name): dataclass` in Hydra's ConfigStore as a root config (not a group: `--help` would
    list the schemas as choices)."""
    for (group, name), schema in schemas.items():
        ConfigStore.instance().store(name=schema_name(group, name), node=schema)


def at_least(minimum: float, above: bool = False) -> Any:
    """A field whose value must be >= minimum (> minimum with `above`); its value comes from the YAML option."""
    return field(default=MISSING, metadata={"minimum": minimum, "above": above})


def one_of(*choices: Any) -> Any:
    """A field whose value must be one of `choices` (strings like "16-mixed", which an Enum's names cannot be)."""
    return field(default=MISSING, metadata={"choices": choices})


@dataclass
class LightningPrecisionConfig:
    """Lightning's own precisions, passed to the Trainer as they are."""

    name: str = one_of("32", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


@dataclass
class MasterPrecisionConfig:
    """The FP32 master-copy plugin (master_precision.MasterCopyPrecision checks the values and how they combine)."""

    name: str = one_of("16-master", "bf16-master")
    loss_scale: Any = MISSING  # "dynamic", or a number > 0 for a static scale
    init_scale: float = MISSING
    growth_factor: float = MISSING
    growth_interval: int = MISSING
    backoff_factor: float = MISSING


@dataclass
class CompensatedPrecisionConfig:
    """bfloat16 weights and optimizer state with compensated updates (precision.CompensatedPrecision)."""

    name: str = one_of("bf16-kahan", "bf16-sr")


@dataclass
class Float8PrecisionConfig:
    """float8 matmuls in the linear layers, FP32 elsewhere (precision.Float8Precision)."""

    name: str = one_of("fp8")


@dataclass
class SchedulerConfig:
    lr_scheduler: Optional[Any] = None  # a torch.optim.lr_scheduler class, _partial_: its own signature is its schema
    interval: str = one_of("epoch", "step")  # when it steps: after each epoch, or after each optimizer step


register({
    ("precision", "lightning"): LightningPrecisionConfig,
    ("precision", "master"): MasterPrecisionConfig,
    ("precision", "compensated"): CompensatedPrecisionConfig,
    ("precision", "float8"): Float8PrecisionConfig,
    ("scheduler", "scheduler"): SchedulerConfig,
})


def load_schemas() -> None:
    """Register the task's schemas too (`<package>/task/schema.py`, if the task has one) before a config is composed."""
    if importlib.util.find_spec(f"{PACKAGE}.task.schema") is not None:
        importlib.import_module(f"{PACKAGE}.task.schema")
