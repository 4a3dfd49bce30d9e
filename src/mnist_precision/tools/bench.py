"""`mnist-bench`: what each precision buys, and what the template costs against a hand-written loop.

For every network x precision it trains with `mnist-train`'s own code and config (checkpoints, TensorBoard
and all) and records the whole-epoch time (training, validation, checkpoints: what a user waits for),
steady-state training samples/s, peak memory, the test metrics, final loss and skipped steps. For each
network it also times, with the task's own LightningModule and data module, batches and optimizer (FP32):

- a hand-written PyTorch loop: `training_step`, backward and the optimizer step, then `validation_step` over the
  validation batches, each epoch, with no Lightning around them;
- the same module and data module under a Trainer with every feature off (no logger, checkpoints, progress bar,
  summary or sanity check): Lightning's own floor.

Each configuration runs in its own worker process (so peak memory is its own), and the workers of one model
take turns epoch by epoch: each epoch starts when the previous configuration's epoch has ended, so the
configurations see the same machine within a second or two of each other. A ratio is the median, over the
timed epochs of `bench.rounds` runs, of the ratio of two epochs run one right after the other: on a shared
machine whose speed drifts by 2x over seconds, that pairing is what makes one run's ratio mean something.
The other figures are the median over the rounds of the median over the timed epochs of a round.

`bench.variants` adds the template again with other overrides (no checkpoints, no logger, the MNIST task's per-sample
pipeline, ...), taking turns with the rest: what each costs or saves, as a paired ratio to the template.

Writes bench.json, bench.md, bench.png and TensorBoard scalars into the run directory.
"""

from __future__ import annotations

import json
import multiprocessing
import operator
import re
import shutil
import statistics
import sys
import time
from itertools import islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig

from mnist_precision.kit.build import build_run, compose_training_config, intra_op_threads, skip_nvml_probe_without_gpu
from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.errors import UserError, report_user_errors
from mnist_precision.kit.monitor import TrainingMonitor, batch_size, peak_memory_mb, synchronize
from mnist_precision.kit.precision import runs_on_cpu
from mnist_precision.kit.private_api import skip_inherited_step_hooks
from mnist_precision.kit.runs import job_entries, override_key, override_value, quote_values, remove_refused_run, suggest_close_matches
from mnist_precision.kit.schema import load_schemas

BASELINES = ("bare lightning", "plain loop")
COMPILED = "template, compiled"  # bench.compile=true: each precision again with compile=true
VARIANT = "template: "  # a bench.variants configuration's kind is "template: <name>"
NEEDS_MONITOR = ("mnist-bench times the template's epochs with its training monitor: keep callbacks.training_monitor "
                 "(callbacks=none and ~callbacks.training_monitor drop it)")


class Turns:
    """A worker's side of the epoch-by-epoch alternation. `mark()` at the start of every epoch and once after the last:
    it closes the running epoch (its whole time goes to the parent), then waits until the parent says go."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.spans: list[tuple[float, float]] = []  # (start, end) of each epoch, on the machine's monotonic clock
        self.started: float | None = None

    def mark(self, device: torch.device) -> None:
        synchronize(device)
        if self.started is None:
            self.connection.send(("ready", None))
        else:
            self.spans.append((self.started, time.perf_counter()))
            self.connection.send(("epoch", self.spans[-1]))
        self.connection.recv()  # go
        self.started = time.perf_counter()


class TakeTurns(L.Callback):
    """A Trainer's epochs take their turns: first of the callbacks, so the others' clocks start after the wait. Given the
    samples an epoch trains on, it also times training alone, up to validation (for a Trainer with no training monitor)."""

    def __init__(self, turns: Turns, samples_per_epoch: int = 0) -> None:
        self.turns = turns
        self.samples_per_epoch = samples_per_epoch
        self.history: list[tuple[int, float]] = []  # (samples, training seconds) per epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.turns.mark(pl_module.device)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.samples_per_epoch and not trainer.sanity_checking:
            synchronize(pl_module.device)
            self.history.append((self.samples_per_epoch, time.perf_counter() - self.turns.started))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.turns.mark(pl_module.device)


def steady_state(history: list[tuple[int, float]], turns: Turns, steps_per_epoch: int, warmup: int) -> dict[str, Any]:
    """Medians over the epochs after the warm-up: training samples/s (from (samples, training seconds) per epoch)
    and whole-epoch seconds; with the steps an epoch takes, for the per-step overhead; and each timed epoch's seconds,
    for the paired ratios, and when each epoch ran."""
    epoch_seconds = [end - start for start, end in turns.spans]
    timed, whole = history[warmup:] or history, epoch_seconds[warmup:] or epoch_seconds
    return {
        "epoch_spans": turns.spans,
        "samples_per_sec": statistics.median(samples / seconds for samples, seconds in timed),
        "timed_samples_per_sec": [samples / seconds for samples, seconds in timed],
        "epoch_seconds": statistics.median(whole),
        "steps_per_epoch": steps_per_epoch,
        "timed_epoch_seconds": whole,
    }


def batches(n_batches: int, limit: int | float | None) -> int:
    """What Lightning makes of `limit_*_batches`: None = all, an int = that many, a float = that fraction."""
    if limit is None:
        return n_batches
    return min(int(limit), n_batches) if isinstance(limit, int) else int(n_batches * limit)


def measure_template(overrides: list[str], output_dir: str, warmup: int, turns: Turns) -> dict[str, Any]:
    """`mnist-train` as users run it: fit (whole epochs timed), then test for the metrics."""
    cfg = compose_training_config(overrides, Path(output_dir))
    run = build_run(cfg)
    monitor = next((cb for cb in run.trainer.callbacks if isinstance(cb, TrainingMonitor)), None)
    if monitor is None:
        raise UserError(NEEDS_MONITOR)
    run.trainer.callbacks.insert(0, TakeTurns(turns))  # (its empty step hooks are skipped as every callback's: kit.speedups)
    run.fit()
    fit_metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    test_metrics = run.test(verbose=False)
    plugin = run.trainer.precision_plugin
    return {
        **steady_state(monitor.history, turns, run.trainer.num_training_batches, warmup),
        "peak_memory_mb": peak_memory_mb(run.model.device),
        "test": {name: float(value) for name, value in test_metrics.items()},
        "final_loss": fit_metrics.get("train/loss_epoch"),
        "skipped_steps": getattr(plugin, "skipped_steps", None),
    }


def bench_device(cfg: DictConfig) -> torch.device:
    """The device mnist-train uses for this config, so the baselines run where the template runs."""
    return torch.device("cpu" if runs_on_cpu(cfg.trainer.accelerator) else "cuda")


def task_parts(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """The task's module and data module, built from the config as mnist-train builds them, and a Trainer that the data
    module may ask for its device and rank (it never fits here)."""
    torch.manual_seed(cfg.seed)
    device = bench_device(cfg)
    trainer = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    datamodule.trainer = trainer
    datamodule.prepare_data()
    datamodule.setup("fit")
    return module.to(device), datamodule, trainer


def samples_per_epoch(loader: Any, limit: int) -> int:
    return sum(batch_size(batch) for batch in islice(loader, limit))


def measure_plain_loop(overrides: list[str], output_dir: str, warmup: int, turns: Turns) -> dict[str, Any]:
    """The task's own training and validation steps in a hand-written loop: the same module, optimizer and batches."""
    cfg = compose_training_config(overrides, Path(output_dir))
    module, datamodule, _ = task_parts(cfg)
    device = module.device
    optimizer = first_optimizer(module.configure_optimizers())
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    n_train = batches(len(train_loader), cfg.trainer.limit_train_batches)
    n_val = batches(len(val_loader), cfg.trainer.limit_val_batches)
    history = []
    for epoch in range(cfg.trainer.max_epochs):
        if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        turns.mark(device)
        samples = 0
        module.train()
        for index, batch in enumerate(islice(train_loader, n_train)):
            batch = on_device(datamodule, batch, device)
            loss = module.training_step(batch, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += batch_size(batch)
        synchronize(device)
        history.append((samples, time.perf_counter() - turns.started))
        module.eval()
        with torch.no_grad():
            for index, batch in enumerate(islice(val_loader, n_val)):
                module.validation_step(on_device(datamodule, batch, device), index)
        synchronize(device)
    turns.mark(device)
    return {**steady_state(history, turns, n_train, warmup), "peak_memory_mb": peak_memory_mb(device), "final_loss": float(loss)}


def on_device(datamodule: L.LightningDataModule, batch: Any, device: torch.device) -> Any:
    """A batch as Lightning hands it to a step: moved to the device, then through the data module's
    `on_after_batch_transfer` (the MNIST task standardises its images there)."""
    return datamodule.on_after_batch_transfer(move_data_to_device(batch, device), 0)


def measure_bare_lightning(overrides: list[str], output_dir: str, warmup: int, turns: Turns) -> dict[str, Any]:
    """Lightning's own floor: the same module and data module under a Trainer with every feature of its own off."""
    cfg = compose_training_config(overrides, Path(output_dir))
    module, datamodule, probe = task_parts(cfg)
    n_train = batches(len(datamodule.train_dataloader()), cfg.trainer.limit_train_batches)
    samples = samples_per_epoch(datamodule.train_dataloader(), n_train)
    clock = TakeTurns(turns, samples_per_epoch=samples)
    skip_inherited_step_hooks([clock], L.LightningModule())  # its epoch hooks only: the floor's own module is untouched
    trainer = L.Trainer(accelerator=probe.strategy.root_device.type, devices=1, max_epochs=cfg.trainer.max_epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_train_batches=cfg.trainer.limit_train_batches, limit_val_batches=cfg.trainer.limit_val_batches,
                        callbacks=[clock])
    trainer.fit(module, datamodule=datamodule)
    return {**steady_state(clock.history, turns, trainer.num_training_batches, warmup), "peak_memory_mb": peak_memory_mb(module.device),
            "final_loss": None}


def first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The optimizer `configure_optimizers` returned, in any of the forms Lightning accepts (the plain loop steps no
    scheduler: the bench compares at a constant learning rate)."""
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    if isinstance(configured, (list, tuple)):
        configured = configured[0]
        configured = configured["optimizer"] if isinstance(configured, dict) else configured
    return configured


MEASURE: dict[str, Callable[..., dict[str, Any]]] = {
    "template": measure_template, "bare lightning": measure_bare_lightning, "plain loop": measure_plain_loop,
}


def _worker(kind: str, overrides: list[str], output_dir: str, warmup: int, connection: Connection) -> None:
    """One configuration, in its own process: its Lightning banners and progress bar out of the progress lines, and
    every run, the baselines too, without torch's per-step NVML probe (a plain loop never imports Lightning, which asks
    for it). Its result or its error goes back through the connection."""
    import logging
    import os
    import sys
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- the worker's own, for its lifetime (the bar still draws)
    skip_nvml_probe_without_gpu()
    torch.set_num_threads(int(override_value(overrides, "threads")))  # the baselines do not build through build_run
    try:
        measure = MEASURE["template" if kind.startswith(VARIANT) or kind == COMPILED else kind]
        connection.send(("result", measure(overrides, output_dir, warmup, Turns(connection))))
    except Exception as error:  # the parent raises it (a UserError is reported as such)
        connection.send(("error", error if isinstance(error, UserError) else RuntimeError(f"{kind}: {type(error).__name__}: {error}")))


def bench(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    settings = cfg.bench
    overrides = HydraConfig.get().overrides
    base = [o for o in overrides.task if not o.startswith(("bench.", "net=", "precision=", "trainer.max_epochs=", "threads="))]
    base += [o for o in overrides.hydra if o.startswith("hydra.searchpath=")]  # where a task's configs outside conf/ are
    base += [f"trainer.max_epochs={settings.warmup_epochs + settings.epochs}"]  # progress bar and all, as users run it
    torch.set_num_threads(intra_op_threads(cfg.threads))  # decided once: every configuration, baselines too, runs on as many
    base += [f"threads={torch.get_num_threads()}"]
    if settings.limit_train_batches:
        base.append(f"trainer.limit_train_batches={settings.limit_train_batches}")
    variants = checked_variants(settings)
    jobs = []
    for net in settings.nets:
        net_overrides = [f"net={net}", *settings.net_overrides.get(net, [])]
        for precision in map(str, settings.precisions):
            jobs.append(("template", net, precision, base + net_overrides + [f"precision={precision}"]))
            if settings.compile:  # right after the eager run it is compared with
                jobs.append((COMPILED, net, precision, jobs[-1][3] + ["compile=true"]))
            if precision == "32":  # each variant's epochs right after the template's it is compared with
                jobs += [(VARIANT + name, net, "32", jobs[-1][3] + overrides) for name, overrides in variants.items()]
        if settings.baselines:
            jobs += [(kind, net, "32", base + net_overrides) for kind in BASELINES]
    check_composes(jobs)
    rounds: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for round_number in range(1, settings.rounds + 1):
        for net in settings.nets:  # one network's workers at a time: each holds the data and a net
            numbers = [number for number, job in enumerate(jobs) if job[1] == net]
            print(f"round {round_number}/{settings.rounds}, {net}: {len(numbers)} configurations taking turns epoch by epoch", flush=True)
            for number, result in zip(numbers, take_turns([jobs[n] for n in numbers], run_dir, round_number, settings.warmup_epochs), strict=True):
                rounds[number].append(result)
                kind, _, precision, _ = jobs[number]
                print(f"[{number + 1}/{len(jobs)}] {net:9s} {precision:12s} {kind:20s} {result['epoch_seconds']:.3f} s/epoch, "
                      f"{result['samples_per_sec']:,.0f} samples/s (training)", flush=True)
    return [{"net": net, "precision": precision, "kind": kind, **median_of_rounds(results)}
            for (kind, net, precision, _), results in zip(jobs, rounds, strict=True)]


FIXED_BY_THE_BENCH = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.limit_train_batches")


def checked_variants(settings: DictConfig) -> dict[str, list[str]]:
    """`bench.variants`: name -> training overrides, each run as one more template configuration at precision 32 and
    compared with the template itself, epoch by epoch (what a callback, the logger or a setting costs)."""
    variants = settings.get("variants") or {}
    if not isinstance(variants, Mapping) or not all(
            isinstance(overrides, Sequence) and not isinstance(overrides, str) and all(isinstance(o, str) for o in overrides)
            for overrides in variants.values()):
        raise UserError("bench.variants must map names to lists of training overrides, e.g. "
                        "\"bench.variants={no_tensorboard:['logger=none']}\"")
    if variants and "32" not in [str(p) for p in settings.precisions]:
        raise UserError("bench.variants are compared with the template at precision 32: keep 32 in bench.precisions")
    for name, overrides in variants.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):  # it names a run directory and a column
            raise UserError(f"bench.variants: the name {name!r} may hold only letters, digits, _ and -")
        keys = {override: override_key(override) or "" for override in overrides}
        fixed = [override for override, key in keys.items() if key.split(".")[0] in ("net", "precision") or key in FIXED_BY_THE_BENCH]
        if fixed:
            raise UserError(f"bench.variants.{name}: {', '.join(fixed)} would change what it is compared on: the bench sets the "
                            "net, the precision (32) and the epochs and batches of every configuration")
    return {str(name): list(overrides) for name, overrides in variants.items()}


def check_composes(jobs: list[tuple[str, str, str, list[str]]]) -> None:
    """Every configuration's overrides compose (a net, a variant's logger=...), checked before any worker starts:
    a bad one is one message here, not a worker's error and Hydra's traceback after the others have started.
    (Composed with the running mnist-bench app's Hydra, whose config directory is the training config's too.)"""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    first_jobs: dict[tuple[str, ...], tuple[str, str, str, list[str]]] = {}
    for job in jobs:
        first_jobs.setdefault(tuple(job[3]), job)
    for kind, net, precision, overrides in first_jobs.values():
        try:
            cfg = compose("train", overrides=quote_values(overrides))
        except (HydraException, OmegaConfBaseException) as error:
            message = str(error).split("\nConfig search path")[0].strip()
            raise UserError(f"the {kind} configuration ({net}, precision {precision}): {message}") from None
        if kind.startswith("template") and not (cfg.get("callbacks") or {}).get("training_monitor"):
            raise UserError(f"the {kind} configuration ({net}, precision {precision}): {NEEDS_MONITOR}")


def take_turns(jobs: list[tuple[str, str, str, list[str]]], run_dir: Path, round_number: int, warmup: int) -> list[dict[str, Any]]:
    """Starts one worker process per configuration; then, over and over, lets each run one epoch in turn (the others
    wait), until each has sent its result. Nothing runs beside an epoch: every worker's setup and sanity check are done
    before the first epoch starts, and its test and exit happen in its last turn."""
    context = multiprocessing.get_context("spawn")
    workers, output_dirs = [], []
    for kind, net, precision, overrides in jobs:
        here, there = context.Pipe()
        output_dir = run_dir / "runs" / f"{net}_{precision}_{kind.replace(': ', '_').replace(' ', '_')}_round{round_number}"
        output_dirs.append(output_dir)
        process = context.Process(target=_worker, args=(kind, overrides, str(output_dir), warmup, there), daemon=True)
        process.start()
        there.close()  # the worker's end is the worker's: a worker that dies is then an EOFError here, not a hang
        workers.append((process, here))
    results: list[dict[str, Any] | None] = [None] * len(jobs)

    def reply(number: int) -> None:
        try:
            what, value = workers[number][1].recv()
        except EOFError:
            raise RuntimeError(f"the {jobs[number][0]} worker ({jobs[number][1]}) died; rerun to see why") from None
        if what == "error":
            raise value
        if what == "result":
            results[number] = value
            workers[number][0].join()  # its exit (seconds, for a process holding torch) must not overlap the next epoch
            # Writing the checkpoints is part of what the template's epochs cost; keeping them is not what a bench is
            # for (a wide_mlp bench kept 5 GB of them).
            shutil.rmtree(output_dirs[number] / "checkpoints", ignore_errors=True)

    try:
        for number in range(len(jobs)):  # all set up (data, net, sanity check) before the first epoch starts
            reply(number)
        while None in results:
            for number, (_, connection) in enumerate(workers):
                if results[number] is None:
                    connection.send("go")
                    reply(number)
    finally:
        for process, connection in workers:
            connection.close()
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return results


def median_of_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Timings: the median over the rounds (each round's own figure is kept too); everything else: the last round's."""
    merged = {key: value for key, value in results[-1].items() if key not in ("timed_epoch_seconds", "timed_samples_per_sec", "epoch_spans")}
    for key in ("samples_per_sec", "epoch_seconds"):
        merged[key] = statistics.median(r[key] for r in results)
    for key in ("samples_per_sec", "epoch_seconds", "timed_epoch_seconds", "timed_samples_per_sec", "epoch_spans"):
        merged[f"{key}_by_round"] = [r[key] for r in results]
    return merged


def paired(run: dict[str, Any], reference: dict[str, Any], compare: Callable[[float, float], float], key: str = "timed_epoch_seconds") -> float:
    """The median, over the timed epochs of every round, of compare(run's epoch, the reference's epoch run right
    before or after it): their whole-epoch times, or (key="timed_samples_per_sec") their training speeds."""
    pairs = [(mine, theirs) for rounds in zip(run[f"{key}_by_round"], reference[f"{key}_by_round"], strict=True)
             for mine, theirs in zip(*rounds, strict=False)]  # a round cut short pairs the epochs it has
    return statistics.median(compare(mine, theirs) for mine, theirs in pairs)


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per net, FP32, from epochs paired in time: the whole-epoch time against the plain loop, the per-step overhead
    that makes the difference, and each `bench.variants` configuration against the template."""
    rows = []
    for net in dict.fromkeys(r["net"] for r in results):
        by_kind = {r["kind"]: r for r in results if r["net"] == net and r["precision"] == "32"}
        if "template" not in by_kind:
            continue
        template, row = by_kind["template"], {"net": net}
        if "plain loop" in by_kind:
            plain = by_kind["plain loop"]
            row["template / plain loop (epoch time)"] = paired(template, plain, operator.truediv)
            row["template overhead (us/step)"] = overhead_us_per_step(template, plain)
            if "bare lightning" in by_kind:
                row["bare lightning / plain loop"] = paired(by_kind["bare lightning"], plain, operator.truediv)
                row["bare lightning overhead (us/step)"] = overhead_us_per_step(by_kind["bare lightning"], plain)
        if "bare lightning" in by_kind:
            row["template / bare lightning"] = paired(template, by_kind["bare lightning"], operator.truediv)  # what the template adds to Lightning
        for kind, variant in by_kind.items():
            if kind.startswith(VARIANT):
                row[f"{kind.removeprefix(VARIANT)} / template"] = paired(variant, template, operator.truediv)
        if len(row) > 1:
            rows.append(row)
    return rows


def speed_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per net and precision, from epochs paired in time: the template's training samples/s against FP32's (what the
    precision buys), and with bench.compile=true, compiled against eager."""
    rows = []
    for net in dict.fromkeys(r["net"] for r in results):
        runs = {(r["kind"], r["precision"]): r for r in results if r["net"] == net}
        fp32 = runs.get(("template", "32"))
        for (kind, precision), run in runs.items():
            if kind != "template":
                continue
            row = {"net": net, "precision": precision}
            if fp32 is not None and precision != "32":
                row["training speed / FP32's"] = paired(run, fp32, operator.truediv, "timed_samples_per_sec")
            if (COMPILED, precision) in runs:
                row["compiled / eager (training speed)"] = paired(runs[(COMPILED, precision)], run, operator.truediv, "timed_samples_per_sec")
            if len(row) > 2:
                rows.append(row)
    return rows


def matmul_speedup(device: torch.device, size: int = 1024, pairs: int = 7, budget_seconds: float = 20.0) -> float:
    """How much faster this device multiplies two size x size matrices in bfloat16 than in FP32: the most a bf16 recipe
    can gain on a net whose time is its matmuls. The median of FP32/bf16 time ratios, each pair run back to back: `pairs`
    of them, or as many as `budget_seconds` allow (at least one: a CPU without bfloat16 units takes a minute a matmul)."""
    from torch.utils.benchmark import Timer

    def seconds(dtype: torch.dtype) -> float:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        return Timer("a @ b", globals={"a": a, "b": b}).timeit(1).median

    started = time.perf_counter()
    seconds(torch.float32), seconds(torch.bfloat16)  # warm up
    ratios = []
    while not ratios or (len(ratios) < pairs and time.perf_counter() - started < budget_seconds):
        ratios.append(seconds(torch.float32) / seconds(torch.bfloat16))
    return statistics.median(ratios)


def overhead_us_per_step(run: dict[str, Any], plain: dict[str, Any]) -> float:
    return 1e6 * paired(run, plain, operator.sub) / plain["steps_per_epoch"]


def markdown(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], machine: str, speeds: list[dict[str, Any]] = (),
             matmul: float | None = None, matmul_size: int = 0) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    tests = list(dict.fromkeys(name for r in results for name in r.get("test", {})))
    header = ["net", "precision", "run", "epoch (s)", "steps/epoch", "training samples/s", "peak memory (MiB)", *tests, "final loss",
              "skipped steps"]
    lines = [f"Machine: {machine}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["net"], r["precision"], r["kind"], f"{r['epoch_seconds']:.3f}", str(r["steps_per_epoch"]), f"{r['samples_per_sec']:,.0f}",
                 f"{r['peak_memory_mb']:,.0f}", *(fmt(r.get("test", {}).get(name), ".4f") for name in tests),
                 fmt(r.get("final_loss"), ".4f"), fmt(r.get("skipped_steps"), "d")]
        lines.append("| " + " | ".join(cells) + " |")
    if ratio_rows:
        keys = list(dict.fromkeys(k for row in ratio_rows for k in row))
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "-")) if k == "net" else fmt(row.get(k), ".0f" if "us/step" in k else ".2f")
                                    for k in keys) + " |" for row in ratio_rows]
    if speeds:
        keys = [key for key in ("net", "precision", "training speed / FP32's", "compiled / eager (training speed)")
                if any(key in row for row in speeds)]
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row[k]) if k in ("net", "precision") else fmt(row.get(k), ".2f") for k in keys) + " |" for row in speeds]
    if matmul is not None:
        lines += ["", f"bf16 / FP32 matmul speed on this device ({matmul_size} x {matmul_size}): {matmul:.3g}x, the most a bf16 "
                      "recipe gains where matmuls are the time (wide_mlp)."]
    lines += ["", "epoch: whole epochs (training, validation, checkpoints), median over the timed epochs, then over the rounds."]
    return "\n".join(lines) + "\n"


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    template = [r for r in results if r["kind"] == "template"]
    nets = list(dict.fromkeys(r["net"] for r in template))
    precisions = list(dict.fromkeys(r["precision"] for r in template))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(precisions), 1)
    for i, precision in enumerate(precisions):
        rows = {r["net"]: r for r in template if r["precision"] == precision}
        xs = [m + i * width for m in range(len(nets))]
        axes[0].bar(xs, [rows[m]["samples_per_sec"] if m in rows else 0 for m in nets], width, label=precision)
        axes[1].bar(xs, [rows[m]["peak_memory_mb"] if m in rows else 0 for m in nets], width, label=precision)
    for axis, title in zip(axes, ["training samples/s", "peak memory (MiB)"], strict=True):
        axis.set_xticks([m + width * (len(precisions) - 1) / 2 for m in range(len(nets))], nets)
        axis.set_title(title)
    axes[0].legend(title="precision")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def machine_description() -> str:
    import os
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s) a configuration")


def write_report(results: list[dict[str, Any]], run_dir: Path, matmul: float | None = None, matmul_size: int = 0) -> str:
    ratio_rows, speeds = ratios(results), speed_rows(results)
    machine = machine_description()
    (run_dir / "bench.json").write_text(json.dumps({"machine": machine, "results": results, "ratios": ratio_rows, "speeds": speeds,
                                                    "bf16_matmul_speedup": matmul, "matmul_size": matmul_size}, indent=2))
    table = markdown(results, ratio_rows, machine, speeds, matmul, matmul_size)
    (run_dir / "bench.md").write_text(table)
    chart(results, run_dir / "bench.png")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for r in results:
            tag = f"bench/{r['net']}/{r['precision']}/{r['kind'].replace(' ', '_')}"
            for key in ("samples_per_sec", "epoch_seconds", "peak_memory_mb"):
                writer.add_scalar(f"{tag}/{key}", r[key], 0)
    return table


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    at_start = job_entries(run_dir)
    with report_user_errors():
        try:
            results = bench(cfg, run_dir)
        except UserError:
            if not (run_dir / "runs").exists():  # refused before any configuration ran: no run dir holding only a log
                remove_refused_run(run_dir, at_start, f"{hydra_cfg.job.name}.log")
            raise
    matmul = matmul_speedup(bench_device(cfg), cfg.bench.matmul) if cfg.bench.matmul else None
    print(write_report(results, run_dir, matmul, cfg.bench.matmul or 0))
    print(f"bench.json, bench.md, bench.png and tensorboard/ in {run_dir}")


def main() -> None:
    load_schemas()
    with suggest_close_matches(sys.argv[1:], "bench"):
        _hydra_main()


if __name__ == "__main__":
    main()
