"""Instructions per training step, counted by valgrind's callgrind: the plain loop, bare Lightning and mnist-train.

Wall-clock ratios on a shared 2-core machine move by up to 2x between rounds of one run; an instruction count
does not move (the same code, inputs and seed give the same count, whatever else the machine runs). It does
not weigh instructions by their cost (an interpreter's run slower than a matmul kernel's), so it explains the
timed ratios of `mnist-bench` rather than replacing them.

Each of the three runs takes the same model, optimizer, batches (resident tensors, batch 128) and one thread,
and counts steps FIRST..FIRST+STEPS-1 of the first epoch: STEPS=50 holds one of mnist-train's logging steps
(`trainer.log_every_n_steps=50`), so the figure is the average a user's epoch pays.

    python scripts/step_instructions.py [mnist-train overrides ...]    # needs valgrind; 5-10 minutes on 2 cores
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FIRST, STEPS = 10, 50
RUNS = ("plain loop", "bare lightning", "mnist-train")


def main() -> None:
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"{' and '.join(missing)} not found: this count needs valgrind (Debian/Ubuntu: apt install valgrind).")
    overrides = sys.argv[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        workers = {
            run: subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/{i}.%p",
                 sys.executable, __file__, "--worker", run, tmp, *overrides],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i, run in enumerate(RUNS)
        }
        per_step = {}
        for i, (run, worker) in enumerate(workers.items()):
            _, stderr = worker.communicate()
            dumps = list(Path(tmp).glob(f"{i}.*.1"))  # callgrind_control --dump's file
            if worker.returncode != 0 or len(dumps) != 1:
                sys.exit(f"{run}: the counted run failed:\n{stderr[-3000:]}")
            totals = next(line for line in dumps[0].read_text().splitlines() if line.startswith("totals:"))
            per_step[run] = int(totals.split()[1]) / STEPS
    plain = per_step["plain loop"]
    print(f"Instructions per training step (callgrind, steps {FIRST}-{FIRST + STEPS - 1}, one thread), overrides: {overrides or 'none'}")
    print("| run | instructions per step | / plain loop | more than the plain loop |")
    print("|---|---|---|---|")
    for run, count in per_step.items():
        print(f"| {run} | {count / 1e6:.2f} M | {count / plain:.3f} | {(count - plain) / 1e6:.2f} M |")


def worker(run: str, tmp: str, overrides: list[str]) -> None:
    import lightning as L
    import torch
    import torch.nn.functional as F

    from mnist_precision.bench import loader
    from mnist_precision.build import build_run, compose_training_config

    def callgrind(*args: str) -> None:  # the running callgrind's own switch, by process id
        subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)

    class Count(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int) -> None:
            if batch_idx == FIRST:
                callgrind("--zero")
                callgrind("--instr=on")

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int) -> None:
            if batch_idx == FIRST + STEPS - 1:
                callgrind("--instr=off")
                callgrind("--dump")

    few = [f"trainer.limit_train_batches={FIRST + STEPS}", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
           "trainer.max_epochs=1"]
    cfg = compose_training_config([*overrides, *few], Path(tmp) / run.replace(" ", "_"))
    built = build_run(cfg)
    count = Count()
    if run == "mnist-train":
        built.trainer.callbacks.append(count)
        built.fit()
        return
    built.datamodule.setup()
    net = built.model.net
    optimizer = built.model.optimizer_factory(params=net.parameters())
    batches, _ = loader(cfg, *built.datamodule.splits["train"], shuffle=True, train=True)
    if run == "plain loop":
        for batch_idx, (images, targets) in enumerate(batches):
            count.on_train_batch_start(None, None, None, batch_idx)
            loss = F.cross_entropy(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count.on_train_batch_end(None, None, None, None, batch_idx)
            if batch_idx == FIRST + STEPS - 1:
                return

    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return (self.net(batch[0]).argmax(1) == batch[1].argmax(1)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer

    validation, _ = loader(cfg, *built.datamodule.splits["val"], shuffle=False, train=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, barebones=True, limit_train_batches=FIRST + STEPS,
                        limit_val_batches=1, use_distributed_sampler=False, callbacks=[count])
    trainer.fit(Bare(), train_dataloaders=batches, val_dataloaders=validation)  # validates, as the bench's bare run does


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
