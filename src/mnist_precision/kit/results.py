"""What a run leaves and says at its end: `metrics.json` (the final metrics, or the error that stopped it), the summary
block, and a sweep's summary and exit status."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def write_metrics(run_dir: Path, metrics: dict, tags: list[str] | None = None) -> None:
    """metrics.json (with the run's tags, if any), written whole or not at all (a full disk must not leave half a file
    for a sweep to read)."""
    partial = run_dir / "metrics.json.partial"
    try:
        partial.write_text(json.dumps({**metrics, "tags": tags} if tags else metrics, indent=2))
        partial.replace(run_dir / "metrics.json")
    except OSError:
        partial.unlink(missing_ok=True)
        if "error" not in metrics:  # the error that stopped a run is on the console and in train.log already
            raise


def shown_order(name: str) -> tuple[int, bool, str]:
    """How metrics are listed (epoch lines, summary): train/... first, then val/..., then the rest; in each, the loss
    first, then the others alphabetically."""
    stage = name.split("/", 1)[0]
    return ({"train": 0, "val": 1}.get(stage, 2), "loss" not in name, name)


def summary(metrics: dict[str, float], run_dir: Path, cfg: DictConfig) -> str:
    """The end of a run: the test metrics, the best monitored value, times, and where to look (the run, and each
    logger's viewer)."""
    best = f"{cfg.monitor.metric}_best"
    parts = [f"{name}={metrics[name]:.4f}" for name in sorted(metrics, key=shown_order) if name.startswith("test/")]
    if not cfg.get("test", True):
        parts.append("not tested (test=false)")
    if best in metrics:
        parts.append(f"{best}={metrics[best]:.4f}")
    if "time/fit_seconds" in metrics:
        parts.append(f"fit {metrics['time/fit_seconds']:.1f} s")
    parts.append(f"wall {metrics['time/wall_seconds']:.1f} s")
    if "train/samples_per_sec" in metrics:
        parts.append(f"{metrics['train/samples_per_sec']:,.0f} samples/s")
    if "threads" in metrics:
        parts.append(f"threads {metrics['threads']:.0f}")
    lines = ["  ".join(parts), f"run dir: {run_dir}"]
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").glob("*.ckpt"))
    if checkpoints:
        lines.append(f"checkpoints: {', '.join(checkpoints)}")
    for node in (cfg.get("logger") or {}).values():  # each logger's viewer, for what it wrote (none under fast_dev_run)
        kind = str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]
        if kind == "TensorBoardLogger" and any(run_dir.rglob("events.out.tfevents.*")):
            lines.append(f"TensorBoard: tensorboard --logdir {run_dir}")
        elif kind == "MLFlowLogger" and (not (uri := str(node.tracking_uri)).startswith("sqlite:///")
                                         or Path(uri.removeprefix("sqlite:///")).is_file()):
            lines.append(f"MLflow: mlflow ui --backend-store-uri {node.tracking_uri}")
        elif kind == "CSVLogger" and (csv := Path(node.save_dir) / node.name / "metrics.csv").is_file():
            lines.append(f"CSV: {csv}")
    return "\n".join(lines)


def sweep_summary(results: list[dict[str, float]], monitor: str) -> str:
    """Mean and spread of each test metric, the best monitored value and the training time over a sweep's jobs (e.g.
    one recipe over seeds)."""

    def spread(key: str, unit: str = "", digits: int = 4) -> str:
        values = [r[key] for r in results if key in r]
        if not values:
            return ""
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{key} {statistics.mean(values):.{digits}f}{unit} ± {std:.{digits}f}{unit} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"

    keys = sorted({key for r in results for key in r if key.startswith("test/")}) + [f"{monitor}_best"]
    parts = [spread(key) for key in keys] + [spread("time/fit_seconds", " s", 2)]
    return f"sweep of {len(results)} job(s): " + "; ".join(part for part in parts if part)


class SweepReport(Callback):
    """At the end of a sweep, in the process that launched it: each job's metrics.json, read back from its directory,
    summed up on stdout; failed jobs named on stderr, and exit status 1 if any failed.

    So the sweep's summary and exit status are right whichever launcher ran the jobs: in this process (Hydra's basic
    launcher), as local processes (submitit_local) or as SLURM jobs. Registered in conf/train.yaml (hydra.callbacks).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Optuna's lines (its study, each trial's result) through Hydra's log on stdout, plain: its own handler writes
        them on stderr in colour codes, into a redirected log too."""
        if "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")):
            import optuna

            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = sorted(path for path in Path(config.hydra.sweep.dir).iterdir() if path.is_dir() and not path.name.startswith("."))
        results, failed = [], []
        for job in jobs:
            metrics = json.loads((job / "metrics.json").read_text()) if (job / "metrics.json").is_file() else {"error": "no metrics.json"}
            if "error" in metrics:
                failed.append(f"{job}: {metrics['error']}")
            else:
                results.append(metrics)
        if results:
            print(sweep_summary(results, config.monitor.metric), flush=True)
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep failed:\n  " + "\n  ".join(failed), file=sys.stderr, flush=True)
            raise SystemExit(1)
