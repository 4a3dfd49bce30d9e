"""FP32 master-copy mixed precision: `precision=16-master` and `precision=bf16-master`.

Classic mixed precision (Micikevicius et al. 2018; NVIDIA apex amp O2; the Flux tutorial's
"FP32 master copy"), which Lightning dropped with apex:

    model weights, activations, gradients   float16 / bfloat16 (norm layers stay FP32)
    loss                                    FP32, multiplied by the loss scale before backward
    master weights, optimizer state         FP32: the optimizer steps on these
    after a clean step                      master weights are copied back into the half model

torch's `GradScaler` does the scaling, the unscaling, the inf/NaN check, the step skipping and the
dynamic scale. What torch lacks, and this file adds: the FP32 master copy that the optimizer sees
in place of the half parameters, the copies between the two, and checkpointing the masters. The half
model itself is `precision.TruePrecision`'s (FP32 outputs, so the loss is FP32; FP32 torchmetrics states).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from typing_extensions import override

from mnist_precision.kit.precision import TruePrecision
from mnist_precision.kit.private_api import NORM_LAYERS, found_inf, run_after_closure

MasterPrecision = Literal["16-master", "bf16-master"]


class MasterCopyPrecision(TruePrecision):
    """Half-precision model, FP32 master weights in the optimizer, loss scaling with skipped overflow steps.

    Args:
        precision: "16-master" (float16) or "bf16-master" (bfloat16).
        device: where the gradients live, "cpu" or "cuda" (for the GradScaler).
        loss_scale: "dynamic", a positive number for a static scale (the Flux tutorial uses 128), or
            None for the default: dynamic for float16, a static 1 (no scaling) for bfloat16.
        init_scale, growth_factor, backoff_factor, growth_interval: the dynamic scale's schedule.
    """

    def __init__(
        self,
        precision: MasterPrecision = "16-master",
        device: str = "cuda",
        loss_scale: Literal["dynamic"] | float | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if precision not in ("16-master", "bf16-master"):
            raise ValueError(f"precision must be '16-master' or 'bf16-master', got {precision!r}")
        super().__init__("16-true" if precision == "16-master" else "bf16-true")
        self.precision = precision  # type: ignore[assignment]
        if loss_scale is None:
            loss_scale = "dynamic" if precision == "16-master" else 1.0
        self.dynamic = loss_scale == "dynamic"
        if not self.dynamic and (isinstance(loss_scale, str) or not float(loss_scale) > 0):
            raise ValueError(f"precision.loss_scale must be 'dynamic' or a number > 0, got {loss_scale!r}")
        if not init_scale > 0:
            raise ValueError(f"precision.init_scale must be > 0, got {init_scale}")
        if not growth_factor > 1:
            raise ValueError(f"precision.growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"precision.backoff_factor must be between 0 and 1, got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"precision.growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.static_scale = None if self.dynamic else float(loss_scale)  # update(static_scale) pins it every step
        self.scaler = torch.amp.GradScaler(
            device, init_scale=self.static_scale or init_scale, growth_factor=growth_factor,
            backoff_factor=backoff_factor, growth_interval=growth_interval,
        )
        self.masters: dict[str, Tensor] = {}  # parameter name -> FP32 master
        self._half_to_master: dict[nn.Parameter, Tensor] = {}
        self._skipped_steps = torch.zeros(())  # a float count, like found_inf; moved to the gradients' device in connect()
        self._found_inf = torch.zeros(())

    @override
    def keeps_fp32(self, module: nn.Module) -> bool:
        return isinstance(module, NORM_LAYERS)

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Half weights, FP32 norm layers; the FP32 weights before the cast become the masters.

        The masters start from the unrounded FP32 weights, as the Flux tutorial keeps its FP32 model (apex O2,
        apex FP16_Optimizer and Megatron copy them from the already-rounded half weights instead). So the
        first update is FP32's own, and on an MLP the masters equal 16-mixed's FP32 weights to the bit.
        """
        fp32 = {name: p for name, p in module.named_parameters() if p.is_floating_point()}
        self.masters = {name: p.detach().float().clone() for name, p in fp32.items()}
        super().convert_module(module)
        halves = {name: p for name, p in fp32.items() if p.dtype == self.dtype}
        self.masters = {name: master for name, master in self.masters.items() if name in halves}
        self._half_to_master = {p: self.masters[name] for name, p in halves.items()}
        return module

    @staticmethod
    def check_optimizer(optimizer: Optimizer, clip_val: float | None) -> None:
        """Refuse what the master copy cannot drive (raises ValueError): LBFGS, whose step() re-evaluates the loss
        closure on the half model; and clipping with a fused optimizer, which unscales inside step(), after clipping."""
        if isinstance(optimizer, LBFGS):
            raise ValueError("the master copy cannot drive LBFGS: its step() re-evaluates the loss closure on the half model.")
        if clip_val and any(group.get("fused") for group in optimizer.param_groups):
            raise ValueError("a fused optimizer cannot clip gradients under the master copy: it unscales inside step(), "
                             "after clipping. Set optimizer.fused=false or trainer.gradient_clip_val=null.")

    def connect(self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Put the FP32 masters in the optimizers in place of the half parameters they stand for."""
        distributed = dist.is_available() and dist.is_initialized()
        for half, master in self._half_to_master.items():
            master.data = master.data.to(half.device)  # the model moved to its device after convert_module
            if distributed:
                dist.broadcast(master, src=0)  # every rank starts from rank 0's masters
        self._masters_to_model()
        self._skipped_steps = self._skipped_steps.to(next(iter(self._half_to_master), torch.empty(0)).device)
        for optimizer in optimizers:
            self.check_optimizer(optimizer, clip_val=None)
            for group in optimizer.param_groups:
                group["params"] = [self._half_to_master.get(p, p) for p in group["params"]]
        return model, optimizers, lr_schedulers

    def pre_backward(self, tensor: Tensor, module: "pl.LightningModule") -> Tensor:  # type: ignore[override]
        return super().pre_backward(self.scaler.scale(tensor.float()), module)

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Optimizer, model: "pl.LightningModule", closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        closure_result = closure()  # forward and backward of the last micro-batch
        if closure_result is None and model.automatic_optimization:
            return None  # training_step skipped backward
        self._gradients_to_masters()
        self.scaler.unscale_(optimizer)  # FP32 master gradients, unscaled, inf/NaN recorded on the device
        run_after_closure(self, model, optimizer)  # on_before_optimizer_step hooks, then clipping
        self._found_inf = found_inf(self.scaler, optimizer)
        # Skipped when found_inf: on the device for fused optimizers; others make GradScaler read the flag (a sync).
        step_output = self.scaler.step(optimizer, **kwargs)
        self._skipped_steps += self._found_inf  # on the device: no sync
        self._masters_to_model()  # after a skipped step the masters are unchanged, so this changes nothing
        self.scaler.update(self.static_scale)  # dynamic: back off or grow; static: stays put
        return step_output

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for inf/NaN gradients so far (reading it is a device sync)."""
        return int(self._skipped_steps)

    @property
    def skipped_last_step(self) -> bool:
        """Whether the last optimizer step was skipped: a device sync, so read only where the host must decide
        (a per-step LR schedule is held on a skipped step)."""
        return bool(self._found_inf)

    @torch.no_grad()
    def _gradients_to_masters(self) -> None:
        for half, master in self._half_to_master.items():
            master.grad = None if half.grad is None else half.grad.float()
            half.grad = None  # the half grads would otherwise keep accumulating across steps

    @torch.no_grad()
    def _masters_to_model(self) -> None:
        for half, master in self._half_to_master.items():
            half.copy_(master)

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale()

    STATE_KEYS = ("scaler", "masters", "skipped_steps")  # what a checkpoint holds of it (runs.check_layout checks them)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "masters": self.masters, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state_dict["scaler"])
        self._skipped_steps.fill_(state_dict["skipped_steps"])
        with torch.no_grad():
            for name, saved in state_dict["masters"].items():
                self.masters[name].copy_(saved)
        self._masters_to_model()


def fp32_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """A checkpoint's weights in FP32 for inference: the FP32 masters where the plugin kept them."""
    masters = checkpoint.get(MasterCopyPrecision.__qualname__, {}).get("masters", {})
    return {name: masters.get(name, value).float() if value.is_floating_point() else value for name, value in checkpoint["state_dict"].items()}
