"""The training monitor: what the machinery tracks on every training step of any module, with no host-device sync
in a step that does not log (the training loss, the non-finite-loss guard, the loss scale, samples/s, fit time)."""

from __future__ import annotations

import logging
import math
import resource
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn

from mnist_precision.kit.errors import TrainingDiverged
from mnist_precision.kit.private_api import should_log_this_step

LOG = logging.getLogger("mnist_precision")


class TrainingMonitor(L.Callback):
    """Everything the template tracks per training step, from what `training_step` returns: no task code needed.

    - `train/loss_step` on logging steps (every `trainer.log_every_n_steps`), `train/loss_epoch` after each epoch: the
      mean, over the epoch's samples and every rank, of the loss `training_step` returned (a step skipped for a
      non-finite loss left out). The losses stay on their device and are read in one transfer on logging steps.
    - The non-finite loss guard, on the same reads, at the end of each epoch and before any checkpoint is written,
      so the first bad step is named exactly and a diverged state is never saved. Without a loss scaler (32,
      bf16-mixed, 16-true, bf16-true) one non-finite loss stops the run. Under one (16-mixed, 16-master,
      bf16-master), a non-finite loss makes non-finite gradients, so the step is skipped like any overflow; the run
      stops only after `patience` of them in a row: one bad batch is not a divergence, but a loss that stays inf or
      NaN while steps are skipped is.
    - `train/loss_scale` and `train/skipped_steps` (reading them is a sync): on logging steps.
    - `memory/bytes_per_param` and `memory/optimizer_bytes_per_param`, measured after the first step
      (`bytes_per_parameter`), once per epoch.
    - `train/samples_per_sec`, once per epoch. (Lightning's ThroughputMonitor synchronises CUDA after
      every batch, which costs more than a whole step of a small model.)
    - `fit_seconds`: from the first training step to the end of the last epoch (validation and checkpoints
      included; start-up, sanity check and test not), timed with CUDA events on a GPU.

    One callback rather than several: Lightning calls each per-step hook a callback overrides through a profiler
    context, besides the hook's own work.
    """

    def __init__(self, patience: int = 5) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self.patience = patience
        self._losses: list[Tensor] = []  # unchecked losses, on their device
        self._where: list[tuple[int, int, int, int]] = []  # (global step, epoch, batch, batch size) of each
        self._step = 0
        self._streak = 0  # non-finite losses in a row, up to the last check
        self._first_bad: tuple[float, tuple[int, int, int, int]] = (0.0, (0, 0, 0, 0))  # the streak's first loss and place
        self._loss_sum = 0.0  # the epoch's checked finite losses, each times its batch size
        self._loss_samples = 0
        self._start = 0.0
        self._samples = 0
        self._timing = False
        self.history: list[tuple[int, float]] = []  # (samples, training seconds) per epoch, for mnist-bench
        self.fit_seconds: float | None = None
        self._fit_clock: Stopwatch | None = None
        self._restored: tuple[float, int] = (0.0, 0)  # the epoch's sums in the checkpoint a run resumed from
        self._bytes_per_parameter: tuple[float, float] | None = None  # measured after the first step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._loss_sum, self._loss_samples = 0.0, 0
        self._start, self._samples, self._timing = time.perf_counter(), 0, True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """The epoch's running loss sum so far, so that a run resumed mid-epoch reports the epoch's `train/loss_epoch` as an
        uninterrupted run does. Lightning asks for it whenever it writes a checkpoint, so the guard checks the losses here
        first: it raises before a diverged state is written."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return {"loss_sum": self._loss_sum, "loss_samples": self._loss_samples}
        self.check_losses(trainer)
        totals = torch.tensor([self._loss_sum, float(self._loss_samples)], dtype=torch.float64, device=trainer.strategy.root_device)
        loss_sum, samples = trainer.strategy.reduce(totals, reduce_op="sum").tolist()  # every rank's (every rank saves)
        return {"loss_sum": loss_sum, "loss_samples": int(samples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = (state_dict.get("loss_sum", 0.0), state_dict.get("loss_samples", 0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_clock = Stopwatch(pl_module.device)
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch: its sums go on from the checkpoint's
        # (every rank's together, restored on rank 0 alone: the epoch's all-reduce counts them once), its clock from here.
        self._loss_sum, self._loss_samples = self._restored if trainer.is_global_zero else (0.0, 0)
        self._start, self._samples, self._timing = time.perf_counter(), 0, True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fit_clock is not None:
            self.fit_seconds = self._fit_clock.seconds()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the optimizer step this batch belongs to (counted up before batch end)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        size = batch_size(batch)
        self._samples += size
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss)  # already detached by Lightning
            self._where.append((self._step, trainer.current_epoch, batch_idx, size))
        if self._bytes_per_parameter is None and trainer.global_step > self._step:  # after the fit's first optimizer step
            self._bytes_per_parameter = bytes_per_parameter(pl_module, trainer.optimizers)  # (Lightning frees the
            for said in unquantised_states(pl_module, trainer.optimizers):                  # gradients before validation)
                LOG.info(said)
        if should_log_this_step(trainer):
            self.check_losses(trainer)
            if loss is not None:
                pl_module.log("train/loss_step", loss * trainer.accumulate_grad_batches, on_step=True, on_epoch=False)
            self._log_loss_scale(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_losses(trainer)
        self._stop_timer(pl_module)
        totals = torch.tensor([self._loss_sum, float(self._loss_samples)], dtype=torch.float64, device=pl_module.device)
        loss_sum, samples = trainer.strategy.reduce(totals, reduce_op="sum").tolist()  # one all-reduce an epoch
        if samples:
            pl_module.log("train/loss_epoch", loss_sum / samples * trainer.accumulate_grad_batches, prog_bar=True)
        if self._bytes_per_parameter is not None:
            pl_module.log("memory/bytes_per_param", self._bytes_per_parameter[0], rank_zero_only=True)
            pl_module.log("memory/optimizer_bytes_per_param", self._bytes_per_parameter[1], rank_zero_only=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_timer(pl_module)  # validation time is not training throughput

    def check_losses(self, trainer: L.Trainer) -> None:
        """Read the losses since the last check (one transfer): add the finite ones to the epoch's mean, and raise
        `TrainingDiverged` if the non-finite ones break the rule above."""
        if not self._losses:
            return
        values = torch.stack(self._losses).float().tolist()
        where, self._losses, self._where = self._where, [], []
        limit = self.patience if getattr(trainer.precision_plugin, "scaler", None) is not None else 1
        diverged = False
        for value, place in zip(values, where, strict=True):
            if math.isfinite(value):
                self._streak = 0
                self._loss_sum += value * place[3]
                self._loss_samples += place[3]
                continue
            if self._streak == 0:
                self._first_bad = (value, place)
            self._streak += 1
            if self._streak >= limit:
                diverged = True
                break
        # Every rank checks at the same steps; all stop together, or under a launcher that does not kill the others
        # on an exception (torchrun, SLURM) they would wait in the next all-reduce until it times out.
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(diverged, all=False) and not diverged:
            raise TrainingDiverged(f"the training loss became inf/NaN on another rank (this is rank {trainer.global_rank}).")
        if diverged:
            value, (step, epoch, batch, _) = self._first_bad
            raise TrainingDiverged(divergence_message(trainer, value, (step, epoch, batch), limit))

    def _log_loss_scale(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is None:
            return
        pl_module.log("train/loss_scale", scaler.get_scale(), on_step=True, on_epoch=False)
        if hasattr(type(plugin), "skipped_steps"):  # (on the class: reading the property is a sync)
            pl_module.log("train/skipped_steps", float(plugin.skipped_steps), on_step=True, on_epoch=False)

    def _stop_timer(self, pl_module: L.LightningModule) -> None:
        if not self._timing or self._samples == 0:
            return
        synchronize(pl_module.device)
        self._timing = False
        elapsed = time.perf_counter() - self._start
        self.history.append((self._samples, elapsed))
        world_size = pl_module.trainer.world_size
        pl_module.log("train/samples_per_sec", self._samples * world_size / elapsed, on_epoch=True, rank_zero_only=True)


def bytes_per_parameter(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[float, float]:
    """What training holds per parameter of the model, counted from the live tensors after a step: its weights and
    gradients, and what its optimizers hold beside them (FP32 master weights and their gradients, moments, Kahan
    buffers). Returns (all of it, the optimizers' part), in bytes. Each storage counts once (a master that shares a
    parameter's memory adds nothing); a tensor subclass (torchao's 8-bit, 4-bit and FP8 optimizer states) counts the
    tensors it is made of (torch's `__tensor_flatten__` protocol). Buffers (BatchNorm's running statistics) are not
    parameters' memory and are left out."""
    seen: set[tuple[int, torch.device]] = set()

    def size(tensor: Tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            return sum(size(getattr(tensor, name)) for name in names)
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()

    parameters = list(model.parameters())
    count = sum(parameter.numel() for parameter in parameters) or 1
    held = sum(size(tensor) for parameter in parameters for tensor in (parameter, parameter.grad) if tensor is not None)
    optimizer_held = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            optimizer_held += sum(size(tensor) for master in group["params"] for tensor in (master, master.grad) if tensor is not None)
        optimizer_held += sum(size(value) for state in optimizer.state.values() for value in state.values() if isinstance(value, Tensor))
    return (held + optimizer_held) / count, optimizer_held / count


def unquantised_states(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """What a low-bit optimizer (`optimizer=adamw8bit`, torchao's) kept in FP32, when that is most of the model: torchao
    quantises the moments of a tensor of at least 4096 elements whose count is a multiple of its block size, and keeps
    FP32 moments for any other, silently. (The paper CNN's largest weight, 84 x 1014, is not a multiple of 256: there
    `adamw8bit` holds what AdamW holds.)"""
    said = []
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for optimizer in optimizers:
        block = getattr(optimizer, "block_size", None)  # (torchao's full-precision AdamW, bf16-sr's, has an infinite one)
        if not isinstance(block, int) or not type(optimizer).__module__.startswith("torchao.optim"):
            continue
        kept = [parameter for parameter, state in optimizer.state.items()
                if not any(hasattr(value, "__tensor_flatten__") for value in state.values())]  # (no tensor subclass: FP32)
        share = sum(parameter.numel() for parameter in kept) / max(1, sum(parameter.numel() for parameter in optimizer.state))
        if share > 0.5:
            largest = sorted(kept, key=lambda parameter: parameter.numel(), reverse=True)[:3]
            shown = ", ".join(f"{names.get(id(parameter), '?')} ({parameter.numel()})" for parameter in largest)
            said.append(f"{type(optimizer).__name__} keeps FP32 moments for {share:.0%} of the parameters (the largest: {shown}): "
                        f"torchao quantises only a tensor of at least 4096 elements whose count is a multiple of {block}. "
                        "memory/optimizer_bytes_per_param says what it holds.")
    return said


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of a tensor, or of the first tensor of a tuple or list
    (the usual batch); anything else, Lightning's own inference."""
    if isinstance(batch, Tensor):
        return batch.size(0)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0].size(0)
    return extract_batch_size(batch)


def divergence_message(trainer: L.Trainer, loss: float, where: tuple[int, int, int], limit: int) -> str:
    step, epoch, batch = where
    precision = getattr(trainer.precision_plugin, "name", trainer.precision)  # the configured name (bf16-kahan, fp8, ...)
    message = f"the training loss is {loss} at step {step} (epoch {epoch}, batch {batch}) with precision={precision}"
    if limit > 1:
        message += f", and stayed inf/NaN for {limit} steps in a row (each skipped by the loss scaler)"
    return message + ". " + _divergence_hint(precision)


def _divergence_hint(precision: str) -> str:
    if precision == "16-true":
        return (
            "Pure float16 weights and optimizer state underflow (Adam's eps=1e-8 is 0 in float16). "
            "Use precision=16-master (FP32 master copy with loss scaling), 16-mixed or bf16-mixed."
        )
    if precision == "bf16-true":
        return "Pure bfloat16 training lost precision; use precision=bf16-mixed or bf16-master."
    return "Lower the learning rate (optimizer.lr=...), add gradient clipping (trainer.gradient_clip_val=1.0), or check the inputs."


class Stopwatch:
    """Seconds since it was made: CUDA events on a GPU (the time the GPU's stream took), else the host's clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start_time = time.perf_counter()

    def seconds(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.start_time
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.start.elapsed_time(end) / 1000


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a wall-clock reading means what it says (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """The run's peak memory: the GPU's allocated tensors on a GPU, else the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
