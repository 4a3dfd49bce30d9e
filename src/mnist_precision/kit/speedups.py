"""Per-step speedups the builder applies to whatever LightningModule and data module it is given: each removes work
Lightning does on every training step and changes nothing else (same calls, same results). What each saves:
docs/performance.md.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torchmetrics import Metric

from mnist_precision.kit.errors import UserError
from mnist_precision.kit.private_api import skip_inherited_step_hooks


class Speedups(L.Callback):
    """Applies them all in `setup`, when the trainer holds every callback: the configured ones, Lightning's own, those
    the module adds in `configure_callbacks` and any added after the run was built."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        skip_inherited_step_hooks(trainer.callbacks, pl_module)
        fast_attributes(pl_module)
        cache_step_signatures(pl_module)
        pass_resident_batches_through(trainer.datamodule, pl_module)


class FastAttributes:
    """Sets a string or None on a name the instance already holds as a plain attribute without nn.Module's checks.

    Lightning records the running hook in a plain attribute of the module around each hook call (`_current_fx_name`,
    dozens of sets a step). nn.Module.__setattr__ first asks whether the value is a Parameter, a Module or a buffer;
    a str or None assigned to a name already in `__dict__` ends in object.__setattr__ there anyway.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (value is None or type(value) is str) and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickled (and deep-copied) as the user's own class: the subclass made below exists in this process only.
        return _rebuild, (type(self).__mro__[2], self.__getstate__())


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    instance = cls.__new__(cls)
    instance.__setstate__(state)
    return instance


@functools.cache
def _with_fast_attributes(cls: type) -> type:
    return type(cls.__name__, (FastAttributes, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def fast_attributes(model: L.LightningModule) -> None:
    """Give the module `FastAttributes` by swapping its class for a subclass of it, as torch's
    `nn.utils.parametrize` injects its own: the user's class itself is untouched."""
    if not isinstance(model, FastAttributes):
        model.__class__ = _with_fast_attributes(type(model))


def cache_step_signatures(model: L.LightningModule) -> None:
    """Lightning reads `training_step`'s (and the evaluation steps') signature with `inspect.getfullargspec` on every
    step, to decide which arguments to pass; inspect returns a function's `__signature__` before building one."""
    for name in ("training_step", "validation_step", "test_step"):
        function = getattr(type(model), name, None)
        if inspect.isfunction(function) and "__signature__" not in vars(function):
            function.__signature__ = inspect.signature(function)


def pass_resident_batches_through(datamodule: L.LightningDataModule, model: L.LightningModule) -> None:
    """A batch that is a tuple or list of tensors already on the training device (resident data, or any batch on CPU)
    is returned as it is; Lightning's default `transfer_batch_to_device` walks it with `apply_to_collection` and calls
    `.to()` on each tensor, every step. Any other batch goes Lightning's way. Set on the data module, which Lightning
    asks first; a module or data module that overrides the hook keeps its own."""
    if datamodule is None or is_overridden("transfer_batch_to_device", datamodule) or is_overridden("transfer_batch_to_device", model):
        return
    datamodule.transfer_batch_to_device = ResidentBatchesPassThrough(datamodule.transfer_batch_to_device).transfer


class ResidentBatchesPassThrough:
    """The data module's `transfer_batch_to_device`, with resident batches handed back as they are. (An object's bound
    method rather than a closure: Lightning reads the hook's code to see whether it is overridden, and a data module
    holding it still pickles.)"""

    def __init__(self, default: Any) -> None:
        self.default = default

    def transfer(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        if type(batch) in (tuple, list) and all(isinstance(part, Tensor) and part.device == device for part in batch):
            return batch
        return self.default(batch, device, dataloader_idx)


class NoProfiler(PassThroughProfiler):
    """What `Trainer(profiler=None)` means, Lightning's PassThroughProfiler, without the cost of doing nothing.

    Lightning wraps every hook call in `profiler.profile(name)`. The default's `profile` is a contextlib generator,
    built, entered and exited each time, to do nothing; one shared `nullcontext` does the same nothing.
    """

    _NOTHING = nullcontext()

    def profile(self, action_name: str) -> AbstractContextManager:
        return self._NOTHING


def compile_network(model: L.LightningModule, on_cpu: bool) -> None:
    """`compile=true`: each submodule of the LightningModule that holds weights (the network, whatever the module calls
    it) compiled in place with `nn.Module.compile`, so that a step's `self(x)` or `self.net(x)` runs compiled under any
    precision, the module's own hooks (the precision plugins' casts) outside it. In place, the state dict keeps the
    plain module's keys (`torch.compile(net)` wraps it and prefixes `_orig_mod.`): a compiled run's checkpoint resumes,
    evaluates and exports with `compile=false`, and the other way round. `dynamic=True`: compiled for any batch size
    from the start, so the epoch's last, smaller batch does not compile it again."""
    check_compiler(on_cpu)
    for child in model.children():
        if not isinstance(child, Metric) and any(True for _ in child.parameters()):
            child.compile(dynamic=True)


def check_compiler(on_cpu: bool) -> None:
    """torch.compile's backend (Inductor) builds C++ on a CPU and Triton kernels on a GPU: say what to install, before
    the run starts, rather than fail at its first step. On a CPU it looks for $CXX, else g++ (torch._inductor.config)."""
    if on_cpu:
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise UserError(f"compile=true on a CPU needs a C++ compiler for torch's Inductor, and {compiler} "
                            f"{'($CXX) ' if 'CXX' in os.environ else ''}is not on PATH: install one (apt install g++, or "
                            "set CXX to yours), or run with compile=false.")
    elif importlib.util.find_spec("triton") is None:
        raise UserError("compile=true on a GPU needs Triton for torch's Inductor: pip install triton (the CUDA build of "
                        "torch installs it), or run with compile=false.")
