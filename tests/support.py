"""What the tests share: the tasks they run on, config composition, CLI results, checkpoint comparison, TensorBoard's
reader (the fixtures are in conftest.py).

The machinery's tests (kit/, tools/, conformance/) run on `quadrants/`, a second task written the way a user would write
theirs; the conformance suite also runs on the task the config names (its test data: mnist_task/harness.py). A user who
replaces the task replaces mnist_task/ and nothing else here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_precision.kit.build import compose_training_config

TESTS = Path(__file__).resolve().parent
QUADRANTS_CONF = TESTS / "quadrants" / "conf"
# Every test run: on the CPU, no bars, and torch's default number of threads fixed for the session (threads=auto picks by
# the machine's load, and runs a test compares bit for bit must sum in the same order).
THREADS = f"threads={torch.get_num_threads()}"
QUIET = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
         THREADS]


@dataclass(frozen=True)
class Task:
    """A task the tests run: the overrides that select it and give it a few batches of test data, and the environment
    its commands need."""

    name: str
    overrides: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def quadrants(loader: str = "plain", net: str = "quadrants_mlp") -> Task:
    """The second task: 8 training batches of 64 (512 images), 2 validation and 2 test batches, in memory."""
    selected = (f"hydra.searchpath=[file://{QUADRANTS_CONF}]", "data=quadrants", f"net={net}", "model=quadrants", f"data.loader={loader}",
                # what the machinery's tests expect of it, whatever a user makes conf/train.yaml's defaults
                "monitor.metric=val/acc", "monitor.mode=max", "optimizer=adam", "scheduler=none", "seed=42", "test=true")
    return Task(f"quadrants ({loader} loader)", selected, {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})


def task_command(task: Task, log_dir: Path, *args: str, command: str = "train", runner: list[str] | None = None) -> list[str]:
    """`python -m mnist_precision.cli.<command>` on `task`, quiet, writing under `log_dir` (flags first, as Hydra wants)."""
    flags = [arg for arg in args if arg.startswith("-")]
    overrides = [arg for arg in args if not arg.startswith("-")]
    return [sys.executable, *(runner or []), "-m", f"mnist_precision.cli.{command}", *flags, *task.overrides, *QUIET,
            f"paths.log_dir={log_dir}", *overrides]


def task_env(task: Task, *python_path: Path, **extra: str) -> dict[str, str]:
    """The environment a task's command runs in: the task's own, warnings off, more directories on PYTHONPATH."""
    env = {**os.environ, **task.env, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0", **extra}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, python_path), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def compose_config(task: Task, overrides: list[str], output_dir: Path, quiet: bool = True) -> DictConfig:
    """The training config as `mnist-train` composes it for `task`, writing into `output_dir` (QUIET: on the CPU, no bars)."""
    cfg = compose_training_config([*task.overrides, *(QUIET if quiet else ["trainer=cpu", THREADS]), *overrides], output_dir)
    with open_dict(cfg):
        cfg.paths.log_dir = str(output_dir)
    return cfg


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def same_tensor(a, b) -> bool:
    """Bit for bit; a tensor subclass (torchao's low-bit optimizer states) by the tensors it is made of."""
    if hasattr(a, "__tensor_flatten__"):
        names, context = a.__tensor_flatten__()
        return type(a) is type(b) and names == b.__tensor_flatten__()[0] and all(same_tensor(getattr(a, n), getattr(b, n)) for n in names)
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same weights, optimizer state and progress, bit for bit."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer_states"][0]["state"].items(), b["optimizer_states"][0]["state"].items(), strict=True):
        assert ka == kb
        for name in va:
            assert same_tensor(va[name], vb[name]), (ka, name)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]


def straight_and_resumed(make_config, tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    """The last checkpoints of 4 uninterrupted epochs and of 2 epochs resumed (resume=) to 4."""
    from mnist_precision.cli.train import train

    train(make_config(*overrides, "trainer.max_epochs=4", output_dir=tmp_path / "straight"))
    interrupted = make_config(*overrides, "trainer.max_epochs=2", output_dir=tmp_path / "resumed")
    train(interrupted)
    with open_dict(interrupted):
        interrupted.trainer.max_epochs = 4
        interrupted.resume = str(tmp_path / "resumed")
    train(interrupted)
    straight, resumed = load(tmp_path / "straight/checkpoints/last.ckpt"), load(tmp_path / "resumed/checkpoints/last.ckpt")
    assert resumed["global_step"] == straight["global_step"] > 0  # the resumed run really trained on
    return straight, resumed


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def files_under(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*") if p.is_file()}


def tensorboard_events(run_dir: Path) -> EventAccumulator:
    """A run's TensorBoard directory as TensorBoard reads it: its own EventAccumulator, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


def assert_same_epoch_scalars(straight: Path, resumed: Path) -> None:
    """Every scalar an uninterrupted run logged (timings aside) has the same value at the same step in a resumed run's
    TensorBoard: its epochs report as the uninterrupted run's (a stopped session's partial epoch may add points)."""
    a, b = tensorboard_events(straight), tensorboard_events(resumed)
    tags = [tag for tag in a.Tags()["scalars"] if tag != "train/samples_per_sec" and not tag.startswith(("time/", "memory/"))]
    assert {"train/loss_epoch", "val/acc"} <= set(tags)
    for tag in tags:
        # the resumed session's value where both sessions logged a step: the later one written (the reader's order
        # follows the event files' names, which need not put the later session last)
        after = {event.step: event.value for event in sorted(b.Scalars(tag), key=lambda event: event.wall_time)}
        assert {event.step: event.value for event in a.Scalars(tag)}.items() <= after.items(), (tag, [(e.step, e.value) for e in a.Scalars(tag)], [(e.step, e.value) for e in b.Scalars(tag)])


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of each event of one scalar in a run's TensorBoard directory, read with TensorBoard's own reader."""
    return [(event.step, event.value) for event in tensorboard_events(run_dir).Scalars(tag)]


class TinyRegression(L.LightningModule):
    """A one-layer LightningModule for tests of Lightning's own behaviour, away from MNIST."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_tiny(tmp_path: Path, model: L.LightningModule, callbacks: list[L.Callback], batches: int = 3) -> None:
    """One epoch of `batches` random batches of 4, nothing written but what the callbacks write."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4 * batches, 4)), batch_size=4)
    checkpointing = any(isinstance(callback, L.pytorch.callbacks.ModelCheckpoint) for callback in callbacks)
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=data)


def only_run_dir(log_dir: Path, kind: str = "train") -> Path:
    runs = sorted((log_dir / kind).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def sweep_jobs(sweep: Path) -> list[Path]:
    """A sweep's job directories (`0_<overrides>`, `1_<overrides>`, ...), in job order."""
    return sorted((path for path in sweep.iterdir() if path.is_dir() and path.name[0].isdigit()), key=lambda path: int(path.name.split("_")[0]))


def event_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of each event of one scalar in a run's TensorBoard directory."""
    return [step for step, _ in tensorboard_scalars(run_dir, tag)]
