"""Instructions per training step and per epoch boundary, counted by valgrind's callgrind: the plain loop, bare
Lightning and mnist-train.

Wall-clock ratios on a shared 2-core machine move by up to 2x between rounds of one run; an instruction count
does not move (the same code, inputs and seed give the same count, whatever else the machine runs). It does
not weigh instructions by their cost (an interpreter's run slower than a matmul kernel's), so it explains the
timed ratios of `mnist-bench` rather than replacing them.

Each of the three runs takes the same model, optimizer, batches (resident tensors, batch 128) and one thread,
and counts steps FIRST..FIRST+STEPS-1 of the first epoch: STEPS=50 holds one of mnist-train's logging steps
(`trainer.log_every_n_steps=50`), so the figure is the average a user's epoch pays. It then counts the epoch
boundary, from the end of the first epoch's last training step to the start of the second epoch's first: the
whole validation pass for all three, and what else each does there (mnist-train: its checkpoints, epoch-end
metrics, TensorBoard, the epoch line).

    python scripts/step_instructions.py [mnist-train overrides ...]    # needs valgrind; about 10 minutes on 2 cores
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from itertools import islice
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
        per_step, boundary = {}, {}
        for i, (run, worker) in enumerate(workers.items()):
            _, stderr = worker.communicate()
            dumps = [list(Path(tmp).glob(f"{i}.*.{n}")) for n in (1, 2)]  # callgrind_control --dump's files, in order
            if worker.returncode != 0 or [len(found) for found in dumps] != [1, 1]:
                sys.exit(f"{run}: the counted run failed:\n{stderr[-3000:]}")
            steps, epoch_end = (total_instructions(found[0]) for found in dumps)
            per_step[run], boundary[run] = steps / STEPS, epoch_end
    plain = per_step["plain loop"]
    print(f"Instructions per training step (callgrind, steps {FIRST}-{FIRST + STEPS - 1}, one thread) and per epoch boundary, "
          f"overrides: {overrides or 'none'}")
    print("| run | instructions per step | / plain loop | more than the plain loop | epoch boundary |")
    print("|---|---|---|---|---|")
    for run, count in per_step.items():
        print(f"| {run} | {count / 1e6:.2f} M | {count / plain:.3f} | {(count - plain) / 1e6:.2f} M | {boundary[run] / 1e6:.0f} M |")


def total_instructions(dump: Path) -> int:
    return int(next(line for line in dump.read_text().splitlines() if line.startswith("totals:")).split()[1])


def worker(run: str, tmp: str, overrides: list[str]) -> None:
    import lightning as L
    import torch

    from mnist_precision.kit.build import build_run, compose_training_config
    from mnist_precision.tools.bench import first_optimizer, on_device, task_parts

    def callgrind(*args: str) -> None:  # the running callgrind's own switch, by process id
        subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)

    class Count(L.Callback):
        """Counts steps FIRST..FIRST+STEPS-1 of epoch 0 (dump 1), then from there to epoch 1's first step (dump 2)."""

        def __init__(self) -> None:
            self.epoch = 0

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int) -> None:
            if self.epoch == 0 and batch_idx == FIRST:
                callgrind("--zero")
                callgrind("--instr=on")
            elif self.epoch == 1 and batch_idx == 0:
                callgrind("--instr=off")
                callgrind("--dump")

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int) -> None:
            if self.epoch == 0 and batch_idx == FIRST + STEPS - 1:  # the epoch's last step
                for switch in ("--instr=off", "--dump", "--zero", "--instr=on"):
                    callgrind(switch)

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.epoch += 1

    epochs = [f"trainer.limit_train_batches={FIRST + STEPS}", "trainer.limit_test_batches=1", "trainer.max_epochs=2"]
    cfg = compose_training_config([*overrides, *epochs], Path(tmp) / run.replace(" ", "_"))
    built = build_run(cfg)
    count = Count()
    if run == "mnist-train":
        built.trainer.callbacks.append(count)
        built.fit()
        return
    module, datamodule, _ = task_parts(cfg)  # mnist-bench's baselines: the task's own module and data module
    if run == "plain loop":  # as mnist-bench's: the module's own steps, training then validation
        optimizer = first_optimizer(module.configure_optimizers())
        batches, validation = datamodule.train_dataloader(), datamodule.val_dataloader()
        for epoch in range(2):
            if hasattr(getattr(batches, "sampler", None), "set_epoch"):
                batches.sampler.set_epoch(epoch)
            module.train()
            for batch_idx, batch in enumerate(islice(batches, FIRST + STEPS)):
                count.on_train_batch_start(None, None, None, batch_idx)
                if epoch == 1:
                    return
                loss = module.training_step(on_device(datamodule, batch, torch.device("cpu")), batch_idx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                count.on_train_batch_end(None, None, None, None, batch_idx)
            count.on_train_epoch_end(None, None)
            module.eval()
            with torch.no_grad():
                for batch_idx, batch in enumerate(validation):
                    module.validation_step(on_device(datamodule, batch, torch.device("cpu")), batch_idx)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=FIRST + STEPS, callbacks=[count])
    trainer.fit(module, datamodule=datamodule)  # mnist-bench's floor: Lightning with every feature of its own off


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
