"""`MNISTClassifier`: logit cross-entropy against one-hot targets, accuracy for every split."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

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


@dataclass
class RunningSums:
    """An epoch's loss and correct predictions so far (training or validation), summed on the device without a host sync.

    A plain object, not module attributes or buffers: nn.Module's __setattr__ costs microseconds on every
    step, and half-precision plugins would cast buffers to float16.
    """

    loss: Tensor
    correct: Tensor
    samples: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> RunningSums:
        # FP32 whatever the default dtype (16-true and bf16-true change it around the steps): counts above 2048 stay exact.
        return cls(torch.zeros((), dtype=torch.float32, device=device), torch.zeros((), dtype=torch.float32, device=device))

    def add(self, batch_mean_loss: Tensor, correct: Tensor, samples: int) -> None:
        self.loss.add_(batch_mean_loss, alpha=samples)
        self.correct.add_(correct)
        self.samples += samples

    def stacked(self) -> Tensor:
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

    def _shared_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The loss, the logits and the one-hot targets of a batch."""
        images, one_hot = batch
        logits = self(images)
        # FP32 loss whatever the compute dtype: half-precision log-softmax loses the small terms.
        return F.cross_entropy(logits.float(), one_hot.float()), logits, one_hot

    def _eval_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        loss, logits, one_hot = self._shared_step(batch)
        return loss, logits.argmax(dim=1), one_hot.argmax(dim=1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits, one_hot = self._shared_step(batch)
        correct = one_hot.gather(1, logits.argmax(dim=1, keepdim=True)).sum()  # the target's weight at each prediction
        self._train_sums.add(loss.detach(), correct, one_hot.size(0))
        if should_log_this_step(self.trainer):  # self.log() costs 0.2-0.7 ms: only on steps Lightning writes
            # Not prog_bar=True: Lightning would then read the latest logged value on the host after every step, a
            # device sync on a GPU (Lightning issue #21232). The TQDM bar shows it when it redraws (callbacks.StepLossBar).
            self.log("train/loss_step", loss)
            if self._lr_changes_every_step:
                self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

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
        loss, preds, labels = self._eval_step(batch)
        self._val_sums.add(loss, (preds == labels).sum(), labels.size(0))

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
        loss, preds, labels = self._eval_step(batch)
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
