"""Precision: `conf/precision/` entries made into the Trainer's arguments, and the true-half plugin the half-weight
precisions share.

`32`, `16-mixed`, `bf16-mixed` are Lightning's own; `16-true`/`bf16-true` are Lightning's with two guarantees any module
gets (`TruePrecision`); `16-master`/`bf16-master` are this project's FP32 master-copy plugin (master_precision.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from mnist_precision.kit.errors import UserError


class TruePrecision(HalfPrecision):
    """Lightning's `16-true`/`bf16-true` (every weight, activation and optimizer state in half precision), and:

    - the LightningModule's outputs are cast to FP32, so the loss computed from `self(x)` is FP32 (a half-precision
      log-softmax loses the small terms), and its gradient comes back through the cast;
    - torchmetrics' states stay FP32 (a float16 sum stops counting at 2048);
    - the inputs are cast where the model takes them (`self(x)`), not when the batch is fetched: the data module's
      preprocessing on the device (`on_after_batch_transfer`) runs in FP32, as under autocast, and targets stay as the
      data module made them (a regression target would lose its precision in half).
    """

    def __init__(self, precision: str = "16-true") -> None:
        super().__init__(precision)  # type: ignore[arg-type]
        self.dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
        self._hooks: list[Any] = []  # the forward hooks' handles
        self._outer_dtype = torch.float32  # the default dtype outside the model's forward

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        self._to_half(module)
        for handle in self._hooks:  # (called again for each stage of the same trainer: one pair of hooks is enough)
            handle.remove()
        self._hooks = [module.register_forward_pre_hook(self._half_inputs, with_kwargs=True),
                       module.register_forward_hook(self._fp32_outputs, always_call=True)]
        return module

    @override
    def forward_context(self) -> AbstractContextManager:
        """Lightning's half default dtype (for tensors a forward creates) is set around the model's forward alone (the
        hooks above), not around the whole step: a step's `self.log(name, metric)` moves the metric, and torchmetrics
        takes its dtype from a tensor made then, so under a half default every later input would be cast to half."""
        return nullcontext()

    def _half_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The forward's floating-point inputs in half precision, and the half default dtype for what it creates."""
        self._outer_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        return apply_to_collection((args, kwargs), Tensor, self._to_dtype)

    def _to_dtype(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def _fp32_outputs(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        torch.set_default_dtype(self._outer_dtype)
        return outputs_to_fp32(module, inputs, output)

    @override
    def convert_input(self, data: Any) -> Any:
        """Nothing, as the batch is fetched (before the data module's preprocessing): the model's forward casts its
        inputs (`_half_inputs`)."""
        return data

    def keeps_fp32(self, module: nn.Module) -> bool:
        """Whether a submodule keeps its own weights in FP32 (none here; the master copy keeps its norm layers)."""
        return False

    def _to_half(self, module: nn.Module) -> None:
        if isinstance(module, Metric):
            return
        if not self.keeps_fp32(module):
            for parameter in module.parameters(recurse=False):
                if parameter.is_floating_point():
                    parameter.data = parameter.data.to(self.dtype)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    setattr(module, name, buffer.to(self.dtype))
        for child in module.children():
            self._to_half(child)


def outputs_to_fp32(module: nn.Module, inputs: Any, output: Any) -> Any:
    """A forward hook: floating-point outputs (a tensor, or a tuple/list/dict of them) in FP32."""
    if isinstance(output, Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, (tuple, list)):
        return type(output)(outputs_to_fp32(module, inputs, item) for item in output)
    if isinstance(output, dict):
        return {key: outputs_to_fp32(module, inputs, value) for key, value in output.items()}
    return output


MASTER = ("16-master", "bf16-master")


def precision_arguments(precision: DictConfig, trainer: DictConfig) -> dict[str, Any]:
    """Trainer arguments for a `conf/precision/` entry: a `plugins` list, or Lightning's own `precision` name."""
    from mnist_precision.kit.master_precision import MasterCopyPrecision

    name = precision.name
    if name in MASTER:
        settings = {key: value for key, value in precision.items() if key != "name"}
        try:
            return {"plugins": [MasterCopyPrecision(name, device="cpu" if runs_on_cpu(trainer.accelerator) else "cuda", **settings)]}
        except (TypeError, ValueError) as error:
            raise UserError(f"precision={name}: {error}") from None
    if name in ("16-true", "bf16-true"):
        return {"plugins": [TruePrecision(name)]}
    if name == "16-mixed" and runs_on_cpu(trainer.accelerator):
        # Given precision="16-mixed" on CPU, Lightning silently trains in bf16 instead. torch has
        # float16 autocast and GradScaler on CPU, so ask for them explicitly: 16-mixed means float16.
        return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": name}


def runs_on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
