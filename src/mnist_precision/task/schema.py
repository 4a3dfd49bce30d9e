"""Typed schemas of the task's config groups (data, net, model), registered in Hydra's ConfigStore.

A new network `mnist_precision.task.nets.resnet(width: int)` gets `@dataclass class ResNetConfig: width: int = at_least(1)`
here, an entry `("net", "resnet"): ResNetConfig` in the `register` call, and `conf/net/resnet.yaml` whose defaults start
with `- /net_resnet_schema@_here_`. Hydra then refuses an unknown key or a wrong type while composing, and ranges are
checked before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from mnist_precision.kit.schema import at_least, one_of, register


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
    pipeline: str = one_of("resident", "per_sample")


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
class ClassifierConfig:
    """The LightningModule: it builds its network, optimizer and scheduler from their configs (task.module)."""

    _target_: str = MISSING
    _recursive_: bool = False
    _convert_: str = "all"
    net: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    num_classes: int = at_least(2)


register({
    ("data", "mnist"): DataConfig,
    ("net", "mlp"): MLPConfig,
    ("net", "cnn"): PaperCNNConfig,
    ("net", "convnet"): ConvNetConfig,
    ("net", "speedrun_cnn"): SpeedrunCNNConfig,
    ("model", "classifier"): ClassifierConfig,
})
