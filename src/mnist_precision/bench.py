"""`mnist-bench`: what each precision buys, and what the template costs against a hand-written loop.

For every model x precision it trains with `mnist-train`'s own code and config (checkpoints,
TensorBoard and all) and records steady-state samples/s (median over the epochs after the warm-up),
the training-epoch time, peak memory, test accuracy, final loss and skipped steps. For each model it
also times, on the same resident tensors, model and batch size, a minimal hand-written PyTorch loop,
the same in a bare LightningModule (Lightning's own floor: no callbacks, logger or metrics), and the
usual per-sample torchvision pipeline (`ToTensor` + `Normalize` through a DataLoader).
Each measurement runs in a fresh process, so peak memory is its own.

Writes bench.json, bench.md, bench.png and TensorBoard scalars into the run directory.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from mnist_precision.build import build_run, compose_training_config, runs_on_cpu
from mnist_precision.callbacks import EpochThroughput, synchronize
from mnist_precision.config import CONF_DIR
from mnist_precision.data import MNIST_MEAN, MNIST_STD, MNISTDataModule
from mnist_precision.errors import report_user_errors


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def steady_state(history: list[tuple[int, float]], warmup: int) -> dict[str, float]:
    timed = history[warmup:] or history
    return {
        "samples_per_sec": statistics.median(samples / seconds for samples, seconds in timed),
        "epoch_seconds": statistics.median(seconds for _, seconds in timed),
    }


def measure_template(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """`mnist-train` as users run it, minus the final test's figures (kept: test accuracy)."""
    cfg = compose_training_config(overrides, Path(output_dir))
    run = build_run(cfg)
    timer = next(cb for cb in run.trainer.callbacks if isinstance(cb, EpochThroughput))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    fit_metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    test_metrics = run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)[0]
    plugin = run.trainer.precision_plugin
    return {
        **steady_state(timer.history, warmup),
        "peak_memory_mb": peak_memory_mb(run.model.device),
        "test_acc": test_metrics["test/acc"],
        "final_loss": fit_metrics.get("train/loss_epoch"),
        "skipped_steps": getattr(plugin, "skipped_steps", None),
    }


def bench_device(cfg: DictConfig) -> torch.device:
    """The device mnist-train uses for this config, so the baselines run where the template runs."""
    return torch.device("cpu" if runs_on_cpu(cfg.trainer.accelerator) else "cuda")


def resident_training_data(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    device = bench_device(cfg)
    datamodule: MNISTDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    images, targets = datamodule.splits["train"]
    return images.to(device), targets.to(device), device


def measure_plain_loop(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """The same model, optimizer, batch size and steps in a minimal hand-written loop over resident tensors."""
    cfg = compose_training_config(overrides, Path(output_dir))
    torch.manual_seed(cfg.seed)
    images, targets, device = resident_training_data(cfg)
    net = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    batch_size, n = cfg.data.batch_size, len(images)
    history = []
    for epoch in range(cfg.trainer.max_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).to(device)
        synchronize(device)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(net(images[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        history.append((n, time.perf_counter() - start))
    return {**steady_state(history, warmup), "peak_memory_mb": peak_memory_mb(device), "final_loss": float(loss)}


def measure_bare_lightning(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """Lightning's own floor: the same model and data in a LightningModule with no callbacks, logger or metrics."""
    import lightning as L

    cfg = compose_training_config(overrides, Path(output_dir))
    torch.manual_seed(cfg.seed)
    images, targets, device = resident_training_data(cfg)

    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = instantiate(cfg.model)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return instantiate(cfg.optimizer)(params=self.parameters())

    from mnist_precision.data import EpochPermutation, TensorBatchLoader

    timer = EpochThroughput()
    trainer = L.Trainer(accelerator=device.type, devices=1, max_epochs=cfg.trainer.max_epochs, logger=False, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    loader = TensorBatchLoader(images, targets, cfg.data.batch_size, EpochPermutation(len(images), True, cfg.seed))
    trainer.fit(Bare(), train_dataloaders=loader)
    return {**steady_state(timer.history, warmup), "peak_memory_mb": peak_memory_mb(device), "final_loss": None}


def measure_per_sample_pipeline(overrides: list[str], output_dir: str, warmup: int) -> dict[str, Any]:
    """What a typical template does: torchvision transforms per sample, collated by a DataLoader (2 epochs)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import MNIST
    from torchvision.transforms import Compose, Normalize, ToTensor

    cfg = compose_training_config(overrides, Path(output_dir))
    torch.manual_seed(cfg.seed)
    datamodule: MNISTDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    device = bench_device(cfg)
    dataset = MNIST(datamodule.data_dir, train=True, transform=Compose([ToTensor(), Normalize((MNIST_MEAN,), (MNIST_STD,))]))
    split = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.data.split_seed))
    loader = DataLoader(Subset(dataset, split[cfg.data.val_size :].tolist()), batch_size=cfg.data.batch_size, shuffle=True)
    net = instantiate(cfg.model).to(device)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    history = []
    for _ in range(min(cfg.trainer.max_epochs, warmup + 1)):  # slow by design: one timed epoch is enough
        synchronize(device)
        start, samples = time.perf_counter(), 0
        for x, y in loader:
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += len(x)
        synchronize(device)
        history.append((samples, time.perf_counter() - start))
    return {**steady_state(history, warmup), "peak_memory_mb": peak_memory_mb(device), "final_loss": float(loss)}


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1, initializer=_quiet) as pool:
        return pool.apply(fn, args)


def _quiet() -> None:
    """Keep the children's Lightning banners out of the progress lines."""
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def bench(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    settings = cfg.bench
    base = [o for o in HydraConfig.get().overrides.task if not o.startswith(("bench.", "model=", "precision=", "trainer.max_epochs="))]
    base += [f"trainer.max_epochs={settings.warmup_epochs + settings.epochs}", "trainer.enable_progress_bar=false",
             "trainer.enable_model_summary=false"]
    if settings.limit_train_batches:
        base.append(f"trainer.limit_train_batches={settings.limit_train_batches}")
    jobs = []
    for model in settings.models:
        model_overrides = [f"model={model}", *settings.model_overrides.get(model, [])]
        jobs += [("template", model, str(p), model_overrides + [f"precision={p}"]) for p in settings.precisions]
        if settings.baselines:
            jobs += [(kind, model, "32", model_overrides) for kind in ("bare lightning", "plain loop", "per-sample pipeline")]
    measure = {"template": measure_template, "bare lightning": measure_bare_lightning, "plain loop": measure_plain_loop,
               "per-sample pipeline": measure_per_sample_pipeline}
    results = []
    for number, (kind, model, precision, overrides) in enumerate(jobs, 1):
        print(f"[{number}/{len(jobs)}] {model:9s} {precision:12s} {kind} ...", end=" ", flush=True)
        output_dir = run_dir / "runs" / f"{model}_{precision}_{kind.replace(' ', '_')}"
        result = in_fresh_process(measure[kind], base + overrides, str(output_dir), settings.warmup_epochs)
        results.append({"model": model, "precision": precision, "kind": kind, **result})
        print(f"{result['samples_per_sec']:,.0f} samples/s, {result['epoch_seconds']:.2f} s/epoch", flush=True)
    return results


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):
        by_kind = {r["kind"]: r for r in results if r["model"] == model and r["precision"] == "32"}
        if {"template", "plain loop"} <= by_kind.keys():
            plain = by_kind["plain loop"]["epoch_seconds"]
            row = {"model": model, "template / plain loop (epoch time)": by_kind["template"]["epoch_seconds"] / plain}
            if "bare lightning" in by_kind:
                row["bare lightning / plain loop"] = by_kind["bare lightning"]["epoch_seconds"] / plain
            if "per-sample pipeline" in by_kind:
                row["template speed-up over per-sample pipeline"] = by_kind["per-sample pipeline"]["epoch_seconds"] / by_kind["template"]["epoch_seconds"]
            rows.append(row)
    return rows


def markdown(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], machine: str) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"Machine: {machine}", "", "| model | precision | run | samples/s | epoch (s) | peak memory (MiB) | test acc (%) | final loss | skipped steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = None if r.get("test_acc") is None else 100 * r["test_acc"]
        lines.append(f"| {r['model']} | {r['precision']} | {r['kind']} | {r['samples_per_sec']:,.0f} | {r['epoch_seconds']:.3f} | "
                     f"{r['peak_memory_mb']:,.0f} | {fmt(acc, '.2f')} | {fmt(r.get('final_loss'), '.4f')} | {fmt(r.get('skipped_steps'), 'd')} |")
    if ratio_rows:
        keys = list(dict.fromkeys(k for row in ratio_rows for k in row))
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "-")) if k == "model" else fmt(row.get(k), ".2f") for k in keys) + " |" for row in ratio_rows]
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
