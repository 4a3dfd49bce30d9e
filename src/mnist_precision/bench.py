"""`mnist-bench`: what each precision buys, and what the template costs against a hand-written loop.

For every model x precision it trains with `mnist-train`'s own code and config (checkpoints, TensorBoard
and all) and records the whole-epoch time (training, validation, checkpoints: what a user waits for),
steady-state training samples/s, peak memory, test accuracy, final loss and skipped steps. For each
model it also times, on the same resident tensors, model, batch size and number of batches:

- a minimal hand-written PyTorch loop with the same validation pass each epoch;
- the same model in a bare LightningModule under `Trainer(barebones=True)`: Lightning's own floor;
- the usual per-sample torchvision pipeline (`ToTensor` + `Normalize` through a DataLoader, training
  and validation).

Each configuration runs in its own worker process (so peak memory is its own), and the workers take
turns, `bench.rounds` times: a ratio comes from measurements interleaved in one run on a noisy machine,
and each figure is the median over the rounds of the median over the timed epochs of a round.

Writes bench.json, bench.md, bench.png and TensorBoard scalars into the run directory.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import time
from itertools import islice, pairwise
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from mnist_precision.build import build_run, compose_training_config, runs_on_cpu, skip_nvml_probe_without_gpu
from mnist_precision.callbacks import TrainingMonitor, synchronize
from mnist_precision.config import CONF_DIR
from mnist_precision.data import MNIST_MEAN, MNIST_STD, EpochPermutation, MNISTDataModule, TensorBatchLoader
from mnist_precision.errors import report_user_errors

BASELINES = ("bare lightning", "plain loop", "per-sample pipeline")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def steady_state(history: list[tuple[int, float]], epoch_seconds: list[float], steps_per_epoch: int, warmup: int) -> dict[str, float]:
    """Medians over the epochs after the warm-up: training samples/s (from (samples, training seconds) per epoch)
    and whole-epoch seconds; with the steps an epoch takes, for the per-step overhead."""
    timed, whole = history[warmup:] or history, epoch_seconds[warmup:] or epoch_seconds
    return {
        "samples_per_sec": statistics.median(samples / seconds for samples, seconds in timed),
        "epoch_seconds": statistics.median(whole),
        "steps_per_epoch": steps_per_epoch,
    }


def between(marks: list[float]) -> list[float]:
    return [end - start for start, end in pairwise(marks)]


def batches(n_batches: int, limit: int | float | None) -> int:
    """What Lightning makes of `limit_*_batches`: None = all, an int = that many, a float = that fraction."""
    if limit is None:
        return n_batches
    return min(int(limit), n_batches) if isinstance(limit, int) else int(n_batches * limit)


def measure_template(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """`mnist-train` as users run it: fit (whole epochs timed), then test for the accuracy."""
    cfg = compose_training_config(overrides, Path(output_dir))
    run = build_run(cfg)
    monitor = next(cb for cb in run.trainer.callbacks if isinstance(cb, TrainingMonitor))
    run.fit()
    fit_metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    test_metrics = run.test(verbose=False)
    plugin = run.trainer.precision_plugin
    return {
        **steady_state(monitor.history, between(monitor.epoch_marks), run.trainer.num_training_batches, warmup),
        "peak_memory_mb": peak_memory_mb(run.model.device),
        "test_acc": test_metrics["test/acc"],
        "final_loss": fit_metrics.get("train/loss_epoch"),
        "skipped_steps": getattr(plugin, "skipped_steps", None),
    }


def bench_device(cfg: DictConfig) -> torch.device:
    """The device mnist-train uses for this config, so the baselines run where the template runs."""
    return torch.device("cpu" if runs_on_cpu(cfg.trainer.accelerator) else "cuda")


def resident_splits(cfg: DictConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.device]:
    device = bench_device(cfg)
    datamodule: MNISTDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    return {split: (images.to(device), targets.to(device)) for split, (images, targets) in datamodule.splits.items()}, device


def loader(cfg: DictConfig, images: torch.Tensor, targets: torch.Tensor, shuffle: bool, train: bool) -> tuple[TensorBatchLoader, int]:
    """The template's own batching of resident tensors, and how many batches the config's limit allows."""
    batch_size = cfg.data.batch_size if train else cfg.data.eval_batch_size
    batch_loader = TensorBatchLoader(images, targets, batch_size, EpochPermutation(len(images), shuffle, cfg.seed))
    limit = cfg.trainer.limit_train_batches if train else cfg.trainer.limit_val_batches
    return batch_loader, batches(len(batch_loader), limit)


def measure_plain_loop(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """The same model, optimizer, batches and validation pass in a minimal hand-written loop over resident tensors."""
    cfg = compose_training_config(overrides, Path(output_dir))
    torch.manual_seed(cfg.seed)
    splits, device = resident_splits(cfg)
    net = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    train_loader, n_train = loader(cfg, *splits["train"], shuffle=True, train=True)
    val_loader, n_val = loader(cfg, *splits["val"], shuffle=False, train=False)
    history, marks = [], []
    for epoch in range(cfg.trainer.max_epochs):
        train_loader.sampler.set_epoch(epoch)
        synchronize(device)
        marks.append(time.perf_counter())
        samples = 0
        net.train()
        for images, targets in islice(train_loader, n_train):
            loss = F.cross_entropy(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += len(images)
        synchronize(device)
        history.append((samples, time.perf_counter() - marks[-1]))
        net.eval()
        with torch.no_grad():
            correct = sum((net(images).argmax(1) == targets.argmax(1)).sum() for images, targets in islice(val_loader, n_val))
        float(correct)  # the validation accuracy, read as a template reads it
    synchronize(device)
    marks.append(time.perf_counter())
    return {**steady_state(history, between(marks), n_train, warmup), "peak_memory_mb": peak_memory_mb(device), "final_loss": float(loss)}


def measure_bare_lightning(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """Lightning's own floor: the same model, data and validation in a bare LightningModule, `Trainer(barebones=True)`."""
    import lightning as L

    cfg = compose_training_config(overrides, Path(output_dir))
    torch.manual_seed(cfg.seed)
    splits, device = resident_splits(cfg)

    class Bare(L.LightningModule):
        """Times itself in its own hooks (Lightning calls them anyway): no callback is added to the floor."""

        def __init__(self) -> None:
            super().__init__()
            self.net = instantiate(cfg.model)
            self.marks: list[float] = []
            self.history: list[tuple[int, float]] = []

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return (self.net(batch[0]).argmax(1) == batch[1].argmax(1)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return instantiate(cfg.optimizer)(params=self.parameters())

        def on_train_epoch_start(self) -> None:
            synchronize(self.device)
            self.marks.append(time.perf_counter())

        def on_validation_start(self) -> None:
            synchronize(self.device)
            samples = self.trainer.num_training_batches * cfg.data.batch_size  # (a partial last batch counts whole)
            self.history.append((samples, time.perf_counter() - self.marks[-1]))

        def on_train_end(self) -> None:
            synchronize(self.device)
            self.marks.append(time.perf_counter())

    train_loader, _ = loader(cfg, *splits["train"], shuffle=True, train=True)
    val_loader, _ = loader(cfg, *splits["val"], shuffle=False, train=False)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_epochs=cfg.trainer.max_epochs, barebones=True,
                        limit_train_batches=cfg.trainer.limit_train_batches, limit_val_batches=cfg.trainer.limit_val_batches,
                        use_distributed_sampler=False)
    bare = Bare()
    trainer.fit(bare, train_dataloaders=train_loader, val_dataloaders=val_loader)
    steps = trainer.num_training_batches
    return {**steady_state(bare.history, between(bare.marks), steps, warmup), "peak_memory_mb": peak_memory_mb(device), "final_loss": None}


def measure_per_sample_pipeline(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """What a typical template does: torchvision transforms per sample, collated by a DataLoader, for training and
    validation (warm-up + 1 timed epoch: slow by design)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import MNIST
    from torchvision.transforms import Compose, Normalize, ToTensor

    cfg = compose_training_config(overrides, Path(output_dir))
    torch.manual_seed(cfg.seed)
    datamodule: MNISTDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    device = bench_device(cfg)
    dataset = MNIST(datamodule.data_dir, train=True, transform=Compose([ToTensor(), Normalize((MNIST_MEAN,), (MNIST_STD,))]))
    split = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.data.split_seed)).tolist()
    train_loader = DataLoader(Subset(dataset, split[cfg.data.val_size :]), batch_size=cfg.data.batch_size, shuffle=True)
    val_loader = DataLoader(Subset(dataset, split[: cfg.data.val_size]), batch_size=cfg.data.eval_batch_size)
    n_train, n_val = batches(len(train_loader), cfg.trainer.limit_train_batches), batches(len(val_loader), cfg.trainer.limit_val_batches)
    net = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    history, marks = [], []
    for _ in range(min(cfg.trainer.max_epochs, warmup + 1)):
        synchronize(device)
        marks.append(time.perf_counter())
        samples = 0
        for x, y in islice(train_loader, n_train):
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += len(x)
        synchronize(device)
        history.append((samples, time.perf_counter() - marks[-1]))
        with torch.no_grad():
            float(sum((net(x.to(device)).argmax(1) == y.to(device)).sum() for x, y in islice(val_loader, n_val)))
    synchronize(device)
    marks.append(time.perf_counter())
    return {**steady_state(history, between(marks), n_train, warmup), "peak_memory_mb": peak_memory_mb(device), "final_loss": float(loss)}


MEASURE: dict[str, Callable[..., dict[str, Any]]] = {
    "template": measure_template, "bare lightning": measure_bare_lightning, "plain loop": measure_plain_loop,
    "per-sample pipeline": measure_per_sample_pipeline,
}


def _start_worker() -> None:
    """Each worker: its Lightning banners and progress bar out of the progress lines, and every run, the
    baselines too, without torch's per-step NVML probe (a plain loop never imports Lightning, which asks for it)."""
    import logging
    import os
    import sys
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- the worker's own, for its lifetime (the bar still draws)
    skip_nvml_probe_without_gpu()


def bench(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    settings = cfg.bench
    base = [o for o in HydraConfig.get().overrides.task if not o.startswith(("bench.", "model=", "precision=", "trainer.max_epochs="))]
    base += [f"trainer.max_epochs={settings.warmup_epochs + settings.epochs}"]  # progress bar and all, as users run it
    if settings.limit_train_batches:
        base.append(f"trainer.limit_train_batches={settings.limit_train_batches}")
    jobs = []
    for model in settings.models:
        model_overrides = [f"model={model}", *settings.model_overrides.get(model, [])]
        jobs += [("template", model, str(p), model_overrides + [f"precision={p}"]) for p in settings.precisions]
        if settings.baselines:
            jobs += [(kind, model, "32", model_overrides) for kind in BASELINES]
    context = multiprocessing.get_context("spawn")
    workers = [context.Pool(1, initializer=_start_worker) for _ in jobs]  # one process per configuration, reused each round
    rounds: list[list[dict[str, Any]]] = [[] for _ in jobs]
    try:
        for round_number in range(1, settings.rounds + 1):
            print(f"round {round_number}/{settings.rounds}", flush=True)
            for number, ((kind, model, precision, overrides), worker) in enumerate(zip(jobs, workers, strict=True), 1):
                print(f"[{number}/{len(jobs)}] {model:9s} {precision:12s} {kind} ...", end=" ", flush=True)
                output_dir = run_dir / "runs" / f"{model}_{precision}_{kind.replace(' ', '_')}_round{round_number}"
                result = worker.apply(MEASURE[kind], (base + overrides, str(output_dir), settings.warmup_epochs))
                rounds[number - 1].append(result)
                print(f"{result['epoch_seconds']:.3f} s/epoch, {result['samples_per_sec']:,.0f} samples/s (training)", flush=True)
    finally:
        for worker in workers:
            worker.close()
            worker.join()
    return [{"model": model, "precision": precision, "kind": kind, **median_of_rounds(results)}
            for (kind, model, precision, _), results in zip(jobs, rounds, strict=True)]


def median_of_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Timings: the median over the rounds (each round's own figure is kept too); everything else: the last round's."""
    merged = dict(results[-1])
    for key in ("samples_per_sec", "epoch_seconds"):
        merged[key] = statistics.median(r[key] for r in results)
        merged[f"{key}_by_round"] = [r[key] for r in results]
    return merged


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, FP32: whole-epoch time against the plain loop, and the per-step overhead that makes the difference."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):
        by_kind = {r["kind"]: r for r in results if r["model"] == model and r["precision"] == "32"}
        if {"template", "plain loop"} <= by_kind.keys():
            plain, template = by_kind["plain loop"], by_kind["template"]
            row = {"model": model, "template / plain loop (epoch time)": template["epoch_seconds"] / plain["epoch_seconds"],
                   "template overhead (us/step)": overhead_us_per_step(template, plain)}
            if "bare lightning" in by_kind:
                row["bare lightning / plain loop"] = by_kind["bare lightning"]["epoch_seconds"] / plain["epoch_seconds"]
                row["bare lightning overhead (us/step)"] = overhead_us_per_step(by_kind["bare lightning"], plain)
            if "per-sample pipeline" in by_kind:
                row["per-sample pipeline / template"] = by_kind["per-sample pipeline"]["epoch_seconds"] / template["epoch_seconds"]
            rows.append(row)
    return rows


def overhead_us_per_step(run: dict[str, Any], plain: dict[str, Any]) -> float:
    return 1e6 * (run["epoch_seconds"] - plain["epoch_seconds"]) / plain["steps_per_epoch"]


def markdown(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], machine: str) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"Machine: {machine}", "",
             "| model | precision | run | epoch (s) | steps/epoch | training samples/s | peak memory (MiB) | test acc (%) | final loss | skipped steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = None if r.get("test_acc") is None else 100 * r["test_acc"]
        lines.append(f"| {r['model']} | {r['precision']} | {r['kind']} | {r['epoch_seconds']:.3f} | {r['steps_per_epoch']} | "
                     f"{r['samples_per_sec']:,.0f} | {r['peak_memory_mb']:,.0f} | {fmt(acc, '.2f')} | {fmt(r.get('final_loss'), '.4f')} | "
                     f"{fmt(r.get('skipped_steps'), 'd')} |")
    if ratio_rows:
        keys = list(dict.fromkeys(k for row in ratio_rows for k in row))
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "-")) if k == "model" else fmt(row.get(k), ".0f" if "us/step" in k else ".2f")
                                    for k in keys) + " |" for row in ratio_rows]
    lines += ["", "epoch: whole epochs (training, validation, checkpoints), median over the timed epochs, then over the rounds."]
    return "\n".join(lines) + "\n"


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    template = [r for r in results if r["kind"] == "template"]
    models = list(dict.fromkeys(r["model"] for r in template))
    precisions = list(dict.fromkeys(r["precision"] for r in template))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(precisions), 1)
    for i, precision in enumerate(precisions):
        rows = {r["model"]: r for r in template if r["precision"] == precision}
        xs = [m + i * width for m in range(len(models))]
        axes[0].bar(xs, [rows[m]["samples_per_sec"] if m in rows else 0 for m in models], width, label=precision)
        axes[1].bar(xs, [rows[m]["peak_memory_mb"] if m in rows else 0 for m in models], width, label=precision)
    for axis, title in zip(axes, ["training samples/s", "peak memory (MiB)"], strict=True):
        axis.set_xticks([m + width * (len(precisions) - 1) / 2 for m in range(len(models))], models)
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
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, torch {torch.__version__}"


def write_report(results: list[dict[str, Any]], run_dir: Path) -> str:
    ratio_rows = ratios(results)
    machine = machine_description()
    (run_dir / "bench.json").write_text(json.dumps({"machine": machine, "results": results, "ratios": ratio_rows}, indent=2))
    table = markdown(results, ratio_rows, machine)
    (run_dir / "bench.md").write_text(table)
    chart(results, run_dir / "bench.png")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for r in results:
            tag = f"bench/{r['model']}/{r['precision']}/{r['kind'].replace(' ', '_')}"
            for key in ("samples_per_sec", "epoch_seconds", "peak_memory_mb"):
                writer.add_scalar(f"{tag}/{key}", r[key], 0)
    return table


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with report_user_errors():
        results = bench(cfg, run_dir)
    print(write_report(results, run_dir))
    print(f"bench.json, bench.md, bench.png and tensorboard/ in {run_dir}")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
