"""Precision: `conf/precision/` entries made into the Trainer's arguments, and the true-half plugin the half-weight
precisions share.

`32`, `16-mixed`, `bf16-mixed` are Lightning's own; `16-true`/`bf16-true` are Lightning's with two guarantees any module
gets (`TruePrecision`); `16-master`/`bf16-master` are this project's FP32 master-copy plugin (master_precision.py);
`bf16-kahan`/`bf16-sr` are `bf16-true` with compensated updates (`CompensatedPrecision`); `fp8` is FP32 with float8
matmuls in the linear layers (`Float8Precision`).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.errors import UserError
from mnist_precision.kit.private_api import TORCHAO_ADAMW

LOG = logging.getLogger("mnist_precision")


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
        self._outer_dtypes: list[torch.dtype | None] = []  # the default dtype outside each forward call in progress

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

    def _half_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The forward's floating-point inputs in half precision, and the half default dtype for what it creates.

        Under DDP Lightning calls the step through the wrapper's forward, with the module's `forward` swapped for the
        step for that call (`_ForwardRedirection`): that call is the step, not the model's forward, and is left alone
        (its inputs are the batch; the step's own `self(x)` is the forward)."""
        step = getattr(module.forward, "__self__", None) is not module
        self._outer_dtypes.append(None if step else torch.get_default_dtype())
        if step:
            return None
        torch.set_default_dtype(self.dtype)
        return apply_to_collection((args, kwargs), Tensor, self._to_dtype)

    def _to_dtype(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def _fp32_outputs(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        outer = self._outer_dtypes.pop()
        if outer is None:  # (the step, above)
            return None
        torch.set_default_dtype(outer)
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


# precision -> the library, and for each torch optimizer its counterpart there with the arguments that compensate.
COMPENSATED = {
    "bf16-kahan": ("torch-optimi", {
        "torch.optim.Adam": ("optimi.Adam", {"kahan_sum": True}),
        "torch.optim.AdamW": ("optimi.AdamW", {"kahan_sum": True}),
        "torch.optim.SGD": ("optimi.SGD", {"kahan_sum": True, "torch_init": True}),  # torch's momentum buffer start
    }),
    "bf16-sr": ("torchao", {
        "torch.optim.Adam": (TORCHAO_ADAMW, {"bf16_stochastic_round": True}),  # AdamW with no weight decay is Adam
        "torch.optim.AdamW": (TORCHAO_ADAMW, {"bf16_stochastic_round": True}),
        **{f"torchao.optim.{name}": (f"torchao.optim.{name}", {"bf16_stochastic_round": True})  # optimizer=adamw8bit, ...
           for name in ("AdamW8bit", "AdamW4bit", "AdamWFp8")},
    }),
}


def optimizer_options() -> dict[str, str]:
    """The `optimizer` group's options by the class each builds: {"torchao.optim.AdamW8bit": "adamw8bit", ...}."""
    return {OmegaConf.load(path).get("_target_"): path.stem for path in sorted((CONF_DIR / "optimizer").glob("*.yaml"))}


class CompensatedPrecision(TruePrecision):
    """`bf16-true` (bfloat16 weights, activations and optimizer state, with TruePrecision's guarantees), updated by an
    optimizer that keeps what bfloat16 rounds off: `bf16-kahan` (Kahan-compensated updates, torch-optimi) or `bf16-sr`
    (stochastically rounded updates, torchao). Pure bfloat16 loses an update smaller than half a weight's last bit
    (a weight near 1 moves in steps of 2^-8); these keep FP32's accuracy at 10 (kahan) or 8 (sr) bytes a parameter.

    The machinery puts the library's optimizer in place of the torch one the `optimizer` group names, with the same
    hyperparameters (`optimizer_config`), before the module is built; `connect` checks what the module built.
    """

    def __init__(self, precision: str) -> None:
        if precision not in COMPENSATED:
            raise ValueError(f"precision must be one of {', '.join(COMPENSATED)}, got {precision!r}")
        super().__init__("bf16-true")
        self.name = precision

    def optimizer_config(self, node: DictConfig) -> DictConfig:
        """The `optimizer` config with the library's optimizer in place of torch's: torch's defaults for what the config
        leaves out (the libraries' defaults differ: optimi's Adam has betas (0.9, 0.99) and eps 1e-6), each setting
        passed on, a torch switch left off dropped; raises UserError for what the library cannot do."""
        library, counterparts = COMPENSATED[self.name]
        target = node.get("_target_")
        if target not in counterparts:
            options = optimizer_options()
            offered = ", ".join(options[name] for name in counterparts if name in options)
            raise UserError(f"precision={self.name} compensates the updates of optimizer={offered} ({library}), not "
                            f"those of {target}: choose one of those, or precision=bf16-master (FP32 master weights) for "
                            "another optimizer.")
        replacement, switches = counterparts[target]
        torch_defaults = {name: parameter.default for name, parameter in inspect.signature(get_class(target)).parameters.items()
                          if parameter.default is not inspect.Parameter.empty}
        settings = {**torch_defaults, **{key: value for key, value in node.items() if not str(key).startswith("_")}}
        if target == "torch.optim.Adam" and replacement == TORCHAO_ADAMW and settings.get("weight_decay"):
            raise UserError(f"precision={self.name}: {library} has no Adam with L2 weight decay (optimizer.weight_decay="
                            f"{settings['weight_decay']}): use optimizer=adamw, or optimizer.weight_decay=0.")
        accepted = inspect.signature(get_class(replacement)).parameters
        arguments = {}
        for name, value in settings.items():
            if name in accepted:
                arguments[name] = value
            elif value not in (None, False, 0):  # a torch switch left off (fused, foreach, maximize, ...) means nothing
                raise UserError(f"precision={self.name}: {replacement} ({library}) has no {name}: set "
                                f"optimizer.{name}={'false' if value is True else 0}, or use precision=bf16-master.")
        # _convert_: plain lists (torch's default betas), not OmegaConf's, in the optimizer's state: checkpoints load
        # with weights_only
        return OmegaConf.create({"_target_": replacement, "_partial_": True, "_convert_": "all", **arguments, **switches})

    @override
    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple:
        """Refuse an optimizer the module built itself rather than from the `optimizer` config: it would update the
        bfloat16 weights uncompensated, as bf16-true does."""
        expected = tuple(get_class(replacement) for replacement, _ in COMPENSATED[self.name][1].values())
        for optimizer in optimizers:
            if not isinstance(optimizer, expected):
                raise UserError(f"precision={self.name}: the module's configure_optimizers built a {type(optimizer).__name__}, "
                                "not the optimizer the `optimizer` config names (which the machinery makes compensated): "
                                "build it from that config, as task/module.py does.")
        return super().connect(model, optimizers, lr_schedulers)


class Float8Precision(Precision):
    """`fp8`: the network's linear layers multiply in float8 with torchao's float8 training (inputs and weights in e4m3,
    gradients in e5m2, each scaled per tensor from its current largest value); everything else, weights and optimizer
    state included, stays FP32. torchao's float8 matmul takes a layer whose two dimensions are multiples of 16: the
    others (an output layer of 10 classes) stay FP32. The speed needs a GPU with FP8 tensor cores (compute capability
    8.9: Ada, Hopper and later); on a CPU it trains as an accuracy check. (Not under bfloat16 autocast: torchao's float8
    layers follow only a GPU's autocast, and under a CPU's they fail in inference mode, where Lightning tests.)"""

    def __init__(self, device: str) -> None:
        if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            name, capability = torch.cuda.get_device_name(), ".".join(map(str, torch.cuda.get_device_capability()))
            raise UserError(f"precision=fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or more: Ada, Hopper); "
                            f"this {name} has {capability}. Use precision=bf16-mixed.")
        super().__init__()
        self.name = "fp8"  # (Lightning's own name for it is 32-true)
        self.on_cpu = device == "cpu"

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear

        linears = {name: layer for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}
        if not any(isinstance(layer, Float8Linear) or takes_float8(layer) for layer in linears.values()):
            shapes = ", ".join(f"{name} {layer.in_features}->{layer.out_features}" for name, layer in linears.items()) or "none"
            raise UserError(f"precision=fp8: none of the model's linear layers has both dimensions a multiple of 16, which "
                            f"torchao's float8 matmul needs (its linear layers: {shapes}). Use precision=bf16-mixed.")
        if not any(isinstance(layer, Float8Linear) for layer in linears.values()):  # (convert_module is called for each stage)
            kept = [f"{name} ({layer.in_features}->{layer.out_features})" for name, layer in linears.items() if not takes_float8(layer)]
            said = f"precision=fp8: float8 matmuls in {len(linears) - len(kept)} of {len(linears)} linear layers"
            said += f"; FP32 in {', '.join(kept)} (dimensions not multiples of 16)." if kept else "."
            LOG.info(said + (" On a CPU this is an accuracy check: float8's speed needs a GPU with FP8 tensor cores." if self.on_cpu else ""))
        return convert_to_float8_training(module, module_filter_fn=lambda layer, name: type(layer) is nn.Linear and takes_float8(layer))


def takes_float8(layer: nn.Linear) -> bool:
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


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
    if name in COMPENSATED:
        return {"plugins": [CompensatedPrecision(name)]}
    if name == "fp8":
        return {"plugins": [Float8Precision(device="cpu" if runs_on_cpu(trainer.accelerator) else "cuda")]}
    if name == "16-mixed" and runs_on_cpu(trainer.accelerator):
        # Given precision="16-mixed" on CPU, Lightning silently trains in bf16 instead. torch has
        # float16 autocast and GradScaler on CPU, so ask for them explicitly: 16-mixed means float16.
        return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": name}


def runs_on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
