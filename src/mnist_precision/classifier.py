"""`MNISTClassifier`: logit cross-entropy against one-hot targets, accuracy for every split."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_precision.data import NUM_CLASSES
from mnist_precision.private_api import should_log_this_step

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def batch_loss(logits: Tensor, one_hot: Tensor, reduction: str = "mean") -> Tensor:
    # FP32 loss whatever the compute dtype: half-precision log-softmax loses the small terms.
    return F.cross_entropy(logits.float(), one_hot.float(), reduction=reduction)


@dataclass
class RunningSums:
    """An epoch's summed loss, correct predictions and sample count (training or validation), on the device, no host sync.

    A batch only keeps references to its detached logits and its targets; every `FOLD_EVERY` batches, and when the sums
    are read, their loss and correct predictions are summed in a few ops over all of them. Per batch that would be six
    small ops (argmax, gather, two sums, two additions): 0.05 M of an MLP step's 11 M instructions on CPU (callgrind),
    and six kernel launches on a GPU. A plain object, not module attributes or buffers: nn.Module's __setattr__ costs
    microseconds on every step, and half-precision plugins would cast buffers to float16.
    """

    FOLD_EVERY: ClassVar[int] = 32  # batches held at most: their logits and targets, 32 x 128 x 10 x 2 floats for the MLP

    loss: Tensor
    correct: Tensor
    samples: int = 0
    pending: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def zeros(cls, device: torch.device) -> RunningSums:
        # FP32 whatever the default dtype (16-true and bf16-true change it around the steps): counts above 2048 stay exact.
        return cls(torch.zeros((), dtype=torch.float32, device=device), torch.zeros((), dtype=torch.float32, device=device))

    def add(self, logits: Tensor, one_hot: Tensor) -> None:
        self.pending.append((logits.detach(), one_hot))
        self.samples += one_hot.size(0)
        if len(self.pending) == self.FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        if not self.pending:
            return
        logits, one_hot = torch.cat([logits for logits, _ in self.pending]), torch.cat([one_hot for _, one_hot in self.pending])
        self.pending = []
        self.loss.add_(batch_loss(logits, one_hot, reduction="sum"))
        self.correct.add_(one_hot.gather(1, logits.argmax(dim=1, keepdim=True)).sum())  # the target's weight at each prediction

    def stacked(self) -> Tensor:
        self.fold()
        return torch.stack([self.loss, self.correct, torch.tensor(float(self.samples), dtype=torch.float32, device=self.loss.device)])


class MNISTClassifier(L.LightningModule):
    """Wraps any network that maps images to 10 logits.

    Args:
        net: the network (see `mnist_precision.models`).
        optimizer: builds the optimizer from the parameters (a Hydra `_partial_`).
        lr_scheduler: builds the scheduler from the optimizer, or None. A scheduler that takes
            `total_steps` (OneCycleLR) gets `trainer.estimated_stepping_batches`.
        lr_interval: step the scheduler every "epoch" or every optimizer "step".
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        lr_interval: str = "epoch",
    ):
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.lr_interval = lr_interval
        # Training and validation accuracy and loss are in-place additions per batch, summed over ranks at
        # epoch end and logged once: torchmetrics' update() costs ~0.4 ms per call here (measured, 2-core CPU), a
        # fifth of an MLP step, and its argument checks read the device (torch.unique); a self.log() per
        # batch costs 0.2-0.7 ms (README, Performance). Test, run once, uses torchmetrics.
        self._train_sums = RunningSums.zeros(self.device)
        self._val_sums = RunningSums.zeros(self.device)
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning records the running hook in a plain attribute of the module around each hook call: 32 sets
        # a training step. nn.Module.__setattr__ first asks whether the value is a Parameter, Module or Buffer
        # (Python-level isinstance checks), 1.5 us a set here against 0.3 us. A str or None assigned to a name
        # already in __dict__ (so not a parameter, buffer or submodule) ends in object.__setattr__ there anyway.
        if (value is None or type(value) is str) and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, one_hot = batch
        logits = self(images)
        loss = batch_loss(logits, one_hot)
        self._train_sums.add(logits, one_hot)
        if should_log_this_step(self.trainer):  # self.log() costs 0.2-0.7 ms: only on steps Lightning writes
            # Not prog_bar=True: Lightning would then read the latest logged value on the host after every step, a
            # device sync on a GPU (Lightning issue #21232). The TQDM bar shows it when it redraws (callbacks.StepLossBar).
            self.log("train/loss_step", loss)
            if self._lr_changes_every_step:
                self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    # Lightning reads training_step's signature with inspect.getfullargspec on every step, to decide whether to pass
    # batch_idx: ~10 us of a step on CPU (timed). inspect returns a function's __signature__ before building one.
    training_step.__signature__ = inspect.signature(training_step)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning calls this hook on every optimizer step, and its default checks the clipping settings each time (7.5 us
        # a step with the hook's dispatch on CPU, timed) before the precision plugin returns for a value of None or 0.
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def _lr_changes_every_step(self) -> bool:
        return self.scheduler_factory is not None and self.lr_interval == "step"

    def on_train_epoch_start(self) -> None:
        self._train_sums = RunningSums.zeros(self.device)
        if not self._lr_changes_every_step:
            # Constant through the epoch: logged once, as Lightning's LearningRateMonitor does for an epoch scheduler
            # (that callback itself would add its hook calls to every step).
            self.log("lr", self.optimizers().param_groups[0]["lr"])

    def on_train_epoch_end(self) -> None:
        loss, acc = self._epoch_means(self._train_sums)
        self.log("train/loss_epoch", loss)
        self.log("train/acc", acc, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = RunningSums.zeros(self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, one_hot = batch
        self._val_sums.add(self(images), one_hot)

    def on_validation_epoch_end(self) -> None:
        loss, acc = self._epoch_means(self._val_sums)
        self.log("val/loss", loss, prog_bar=True)
        if self.trainer.sanity_checking:
            return  # a couple of batches from an untrained model are no "best"
        self.val_acc_best(acc)
        self.log("val/acc", acc, prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def _epoch_means(self, sums: RunningSums) -> tuple[Tensor, Tensor]:
        """The mean loss and the accuracy over every rank's samples of the epoch (one all-reduce)."""
        loss_sum, correct, samples = self.trainer.strategy.reduce(sums.stacked(), reduce_op="sum")
        return loss_sum / samples, correct / samples

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, one_hot = batch
        logits = self(images)
        loss, preds, labels = batch_loss(logits, one_hot), logits.argmax(dim=1), one_hot.argmax(dim=1)
        self.test_acc(preds, labels)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        return {"preds": preds, "labels": labels}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # A step that loss scaling skipped (overflow) changed no weights: keep the schedule where it is.
        if self.lr_interval == "step" and getattr(self.trainer.precision_plugin, "skipped_last_step", False):
            return
        super().lr_scheduler_step(scheduler, metric)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning does not checkpoint RNG state; dropout draws from it, so exact resume needs it.
        # (Torch generators only: their states are tensors, loadable with weights_only=True.)
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["cuda_rng_states"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "cuda_rng_states" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng_states"])

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
            kwargs["total_steps"] = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_interval}}
