"""Composes the training config (outside a Hydra run) and builds the data module, LightningModule and Trainer from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_precision.checkpoint_io import AtomicCheckpointIO
from mnist_precision.classifier import MNISTClassifier
from mnist_precision.config import CONF_DIR, check_config
from mnist_precision.dashboard import mlflow_run_to_resume
from mnist_precision.data import MNISTDataModule
from mnist_precision.errors import UserError
from mnist_precision.master_precision import MasterCopyPrecision
from mnist_precision.private_api import skip_inherited_step_hooks
from mnist_precision.profiling import NoProfiler
from mnist_precision.runs import quote_values


@dataclass
class Run:
    """What `build_run` makes of a config: fit it, then test it."""

    datamodule: MNISTDataModule
    model: MNISTClassifier
    trainer: L.Trainer

    def fit(self, ckpt_path: str | None = None) -> None:
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)

    def test(self, ckpt_path: str | None = None, verbose: bool = True) -> dict[str, float]:
        return self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=verbose)[0]


def compose_training_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `mnist-train <overrides>` composes, outside a Hydra run (tests, mnist-bench's workers)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=quote_values(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)  # `${hydra:runtime.output_dir}` has no value outside a run
    return cfg


def build_run(cfg: DictConfig) -> Run:
    check_config(cfg)
    skip_nvml_probe_without_gpu()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    optimizer, lr_scheduler = build("optimizer", cfg.optimizer), build("scheduler", cfg.scheduler.lr_scheduler)
    check_learning_rates(optimizer, lr_scheduler, more_than_one_step=cfg.scheduler.interval == "step" or cfg.trainer.max_epochs != 1)
    model = MNISTClassifier(
        net=check_has_weights(build("model", cfg.model)),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        lr_interval=cfg.scheduler.interval,
    )
    callbacks = [build(f"callbacks.{name}", node) for name, node in (cfg.get("callbacks") or {}).items() if node is not None]
    if not cfg.trainer.enable_progress_bar:  # Lightning refuses a progress bar callback when the bar is off
        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    loggers = [build(f"logger.{name}", node, **mlflow_run_to_resume(node, cfg.resume))
               for name, node in (cfg.get("logger") or {}).items() if node is not None]
    precision = precision_arguments(cfg.precision, cfg.trainer, cfg.optimizer)
    plugins = [AtomicCheckpointIO(), *precision.pop("plugins", [])]
    no_profiler = {} if cfg.trainer.get("profiler") else {"profiler": NoProfiler()}  # what None means, minus its per-hook cost
    # _convert_: Lightning reads plain dicts (max_time={hours: 12}), not OmegaConf's DictConfig.
    trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, **precision, **no_profiler,
                    _convert_="all")
    skip_inherited_step_hooks(trainer.callbacks, model)  # with Lightning's own callbacks (progress bar, summary), all there now
    return Run(build("data", cfg.data), model, trainer)


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
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{key}: {detail}") from None


def signature_problems(key: str, node: DictConfig) -> list[str]:
    """Each configured argument whose value does not fit the target's annotation, where that annotation is made of
    bool, int, float, str, None, Literal, Optional and Union (anything else, a class or a container, is the target's
    to check). A bool is not an int here, and an int is a float."""
    import inspect
    import typing

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
    import typing

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


def check_has_weights(net: torch.nn.Module) -> torch.nn.Module:
    """A layer with no weights (a width of 0) trains to chance accuracy without any error: refuse it."""
    empty = [f"{name} {tuple(parameter.shape)}" for name, parameter in net.named_parameters() if parameter.numel() == 0]
    if empty:
        raise UserError(f"model: layers with no weights cannot train: {', '.join(empty)}. Check the model's sizes (model.*).")
    return net


def check_learning_rates(optimizer_factory: Any, scheduler_factory: Any, more_than_one_step: bool) -> None:
    """What the schemas cannot see, before any work: torch checks an optimizer's arguments only when it is built (inside
    fit) and a scheduler's only as it steps (StepLR's step_size=0 divides by zero at its second step). Both are built
    here on a stand-in parameter and stepped twice; a learning rate that is 0 for the first step, or from the second
    on, is refused too (onecycle's max_lr=0, exponential's gamma=0): such a run ends at chance accuracy with exit 0."""
    import inspect
    import math
    import warnings

    try:
        optimizer = optimizer_factory(params=[torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as error:
        raise UserError(f"optimizer: {error}") from None
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


def precision_arguments(precision: DictConfig, cfg_trainer: DictConfig, cfg_optimizer: DictConfig) -> dict[str, Any]:
    """Trainer arguments for a `conf/precision/` entry: Lightning's own precision names pass straight through."""
    if precision.name in ("16-master", "bf16-master"):
        check_master_copy_combination(precision.name, cfg_trainer, cfg_optimizer)
        settings = {key: value for key, value in precision.items() if key != "name"}
        device = "cpu" if runs_on_cpu(cfg_trainer.accelerator) else "cuda"
        try:
            return {"plugins": [MasterCopyPrecision(precision.name, device=device, **settings)]}
        except (TypeError, ValueError) as error:
            raise UserError(f"precision={precision.name}: {error}") from None
    if precision.name == "16-mixed" and runs_on_cpu(cfg_trainer.accelerator):
        # Given precision="16-mixed" on CPU, Lightning silently trains in bf16 instead. torch has
        # float16 autocast and GradScaler on CPU, so ask for them explicitly: 16-mixed means float16.
        return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision.name}


def check_master_copy_combination(name: str, trainer: DictConfig, optimizer: DictConfig) -> None:
    strategy = str(trainer.get("strategy", "auto"))
    if "fsdp" in strategy or "deepspeed" in strategy:
        raise UserError(
            f"precision={name} cannot be combined with strategy={strategy}: that strategy shards the parameters and keeps "
            "its own FP32 copies. Use its own mixed precision (precision=bf16-mixed) or strategy=ddp."
        )
    if str(optimizer.get("_target_", "")).endswith("LBFGS"):
        raise UserError(f"precision={name} cannot drive LBFGS: its step() re-evaluates the loss closure on the half model.")
    if optimizer.get("fused") and trainer.get("gradient_clip_val"):
        raise UserError(
            f"precision={name} with a fused optimizer cannot clip gradients: fused optimizers unscale inside step(), "
            "after clipping. Set optimizer.fused=false or trainer.gradient_clip_val=null."
        )


def skip_nvml_probe_without_gpu() -> None:
    """On a machine without an NVIDIA GPU, stop torch from probing for one on every optimizer step.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that `torch.cuda.is_available()` asks NVML
    (which never initialises CUDA, and so never breaks a later fork). torch's Adam calls it on every step
    (`Optimizer._accelerator_graph_capture_health_check`), and until CUDA is initialised the answer is not
    cached: with a CUDA build of torch and no driver, every step loads libnvidia-ml again and fails, about
    0.2 ms, 17 % of an MLP epoch on the development CPU (measured). With no GPU there is no fork to protect.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def runs_on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
