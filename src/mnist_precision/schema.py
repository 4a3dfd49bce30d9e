"""Typed schemas of this project's config groups: Hydra structured configs, registered in Hydra's ConfigStore.

Each YAML option names its schema first in its defaults list (`conf/model/mlp.yaml`: `- /model_mlp_schema@_here_`),
so Hydra checks it while composing, before any work starts: a key the schema does not have is refused, and a value
of the wrong type (`data.batch_size=abc`, `data.normalize=maybe`) or outside a choice (`scheduler.interval=daily`) is
one message naming the key. Ranges are declared here too (`at_least`), and checked by `config.check_config`.

Third-party objects (Lightning's Trainer and callbacks, torch's optimizers and schedulers) keep their own signatures as
their schema: an argument they refuse is reported by `build.build`, naming the key, before training starts.

A new model `mnist_precision.models.resnet(width: int)` gets `@dataclass class ResNetConfig: width: int = at_least(1)`
here, an entry `("model", "resnet"): ResNetConfig` in SCHEMAS, and `conf/model/resnet.yaml` with `- /model_resnet_schema@_here_`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def schema_name(group: str, name: str) -> str:
    """The ConfigStore name of a group's schema: an option names it first in its defaults, `- /<group>_<name>_schema@_here_`."""
    return f"{group}_{name}_schema"


def at_least(minimum: float, above: bool = False) -> Any:
    """A field whose value must be >= minimum (> minimum with `above`); its value comes from the YAML option."""
    return field(default=MISSING, metadata={"minimum": minimum, "above": above})


def one_of(*choices: Any) -> Any:
    """A field whose value must be one of `choices` (strings like "16-mixed", which an Enum's names cannot be)."""
    return field(default=MISSING, metadata={"choices": choices})


@dataclass
class DataConfig:
    _target_: str = MISSING
    data_dir: str = MISSING
    download: bool = MISSING
    val_size: int = at_least(1)
    split_seed: int = at_least(0)
    shuffle_seed: int = at_least(0)
    batch_size: int = at_least(1)
    eval_batch_size: int = at_least(1)
    normalize: bool = MISSING
    on_device: Any = one_of("auto", True, False)  # keep the tensors on the accelerator: a union OmegaConf cannot type


@dataclass
class MLPConfig:
    _target_: str = MISSING
    hidden: int = at_least(1)
    layers: int = 1  # hidden layers of width `hidden` (wide_mlp: 3)


@dataclass
class PaperCNNConfig:
    _target_: str = MISSING


@dataclass
class ConvNetConfig:
    _target_: str = MISSING
    channels: int = at_least(1)
    hidden: int = at_least(1)
    dropout: float = at_least(0)


@dataclass
class SpeedrunCNNConfig:
    _target_: str = MISSING
    channels: list[int] = MISSING
    hidden: int = at_least(1)


@dataclass
class LightningPrecisionConfig:
    """Lightning's own precisions, passed to the Trainer as they are."""

    name: str = one_of("32", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


@dataclass
class MasterPrecisionConfig:
    """The FP32 master-copy plugin (master_precision.MasterCopyPrecision, which also checks how the settings combine)."""

    name: str = one_of("16-master", "bf16-master")
    loss_scale: Any = MISSING  # "dynamic", or a number > 0 for a static scale
    init_scale: float = at_least(0, above=True)
    growth_factor: float = at_least(1)
    growth_interval: int = at_least(1)
    backoff_factor: float = at_least(0, above=True)


@dataclass
class SchedulerConfig:
    lr_scheduler: Optional[Any] = None  # a torch.optim.lr_scheduler class, _partial_: its own signature is its schema
    interval: str = one_of("epoch", "step")  # when it steps: after each epoch, or after each optimizer step


SCHEMAS = {  # (group, name): schema
    ("data", "mnist"): DataConfig,
    ("model", "mlp"): MLPConfig,
    ("model", "cnn"): PaperCNNConfig,
    ("model", "convnet"): ConvNetConfig,
    ("model", "speedrun_cnn"): SpeedrunCNNConfig,
    ("precision", "lightning"): LightningPrecisionConfig,
    ("precision", "master"): MasterPrecisionConfig,
    ("scheduler", "scheduler"): SchedulerConfig,
}
for (_group, _name), _schema in SCHEMAS.items():  # root configs, not a config group: --help lists groups as choices
    ConfigStore.instance().store(name=schema_name(_group, _name), node=_schema)
