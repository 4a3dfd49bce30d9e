"""What TensorBoard shows of a run beyond its scalars: the HParams tab (the knobs that define the experiment and its
final metrics) and a custom-scalars layout (the charts that compare: losses, accuracy, loss scale, learning rate).

The whole config has about 70 keys, most of them plumbing (checkpoint paths, `_target_`s); the table, parallel
coordinates and scatter views compare runs only if they show the few that differ between experiments.

Both are written to their own event file (`*.dashboard`) in the run's TensorBoard directory, when training starts
(no metrics yet) and again, replaced, when the run ends: TensorBoard keeps the first hparams summary it finds for a run, so after
`resume=<run> trainer.max_epochs=10` an appended one would still show the first session's `max_epochs: 5`.
(Lightning's `TensorBoardLogger.log_hyperparams` can only append to the run's event file.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Final metrics the run does not log as scalars itself; TensorBoard's HParams tab shows every scalar of a run (test/acc,
# test/loss, val/acc_best, samples/s, ...) beside its knobs, these included.
WRITTEN_HERE = ("memory/peak_mb", "time/fit_seconds", "time/wall_seconds")
DASHBOARD_SUFFIX = ".dashboard"

# TensorBoard's Custom Scalars tab: each chart overlays the tags its regexes match (train and validation loss together).
LAYOUT = {
    "compare": {
        "loss (train epoch mean, validation)": ["Multiline", [r"train/loss_epoch", r"val/loss"]],
        "accuracy (train, validation, best validation)": ["Multiline", [r"train/acc", r"val/acc"]],
        "learning rate": ["Multiline", [r"^lr$"]],
    },
    "precision": {
        "loss scale": ["Multiline", [r"precision/loss_scale"]],
        "skipped steps": ["Multiline", [r"precision/skipped_steps"]],
    },
}


def knobs(cfg: DictConfig) -> dict[str, Any]:
    """The settings that define an experiment, flattened, with class paths shortened to class names."""
    config = OmegaConf.to_container(cfg, resolve=True)
    scheduler = config["scheduler"]
    strategy = config["trainer"].get("strategy")
    chosen: dict[str, Any] = {
        "model": _short(config["model"]["_target_"]),
        **{f"model/{key}": value for key, value in config["model"].items() if not key.startswith("_")},
        "precision": config["precision"]["name"],
        **{f"precision/{key}": value for key, value in config["precision"].items() if key != "name"},
        "optimizer": _short(config["optimizer"]["_target_"]),
        **{f"optimizer/{key}": config["optimizer"][key] for key in ("lr", "weight_decay", "momentum", "betas") if key in config["optimizer"]},
        "scheduler": _short(scheduler["lr_scheduler"]["_target_"]) if scheduler.get("lr_scheduler") else "none",
        **{f"scheduler/{key}": value for key, value in (scheduler.get("lr_scheduler") or {}).items() if not key.startswith("_")},
        "data/batch_size": config["data"]["batch_size"],
        "data/normalize": config["data"].get("normalize"),
        "seed": config["seed"],
        "matmul_precision": config["matmul_precision"],
        **{f"trainer/{key}": config["trainer"].get(key) for key in ("max_epochs", "max_steps", "devices", "num_nodes",
                                                                     "accumulate_grad_batches", "gradient_clip_val")},
        "trainer/strategy": _short(strategy["_target_"]) if isinstance(strategy, dict) else strategy,
    }
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in chosen.items()}


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def write_dashboard(log_dir: str | Path, cfg: DictConfig, metrics: dict[str, float], step: int) -> None:
    """Replace the run's dashboard event file: the custom-scalars layout, the knobs, and the final metrics written here."""
    from torch.utils.tensorboard.summary import custom_scalars, hparams, scalar
    from torch.utils.tensorboard.writer import FileWriter

    log_dir = Path(log_dir)
    for old in log_dir.glob(f"*{DASHBOARD_SUFFIX}"):
        old.unlink()
    writer = FileWriter(str(log_dir), filename_suffix=DASHBOARD_SUFFIX)
    writer.add_summary(custom_scalars(LAYOUT))
    _experiment, session_start, session_end = hparams(knobs(cfg), {})
    writer.add_summary(session_start)  # no per-run experiment record: TensorBoard then builds the experiment from every
    writer.add_summary(session_end)    # run's session and shows first the knobs whose values differ between runs
    for name in WRITTEN_HERE:
        if name in metrics:
            writer.add_summary(scalar(name, metrics[name]), step)
    writer.close()


def write_mlflow(logger: Any, cfg: DictConfig, metrics: dict[str, float], step: int) -> None:
    """MLflow's side of the dashboard: the knobs as the run's params, and the final metrics the run does not log itself.

    MLflow params cannot change once logged: a resume that changes one (trainer/max_epochs) keeps its first value there,
    and logs only the knobs that are new.
    """
    logged = logger.experiment.get_run(logger.run_id).data.params
    logger.log_hyperparams({name: value for name, value in knobs(cfg).items() if name not in logged})
    final = {name: metrics[name] for name in WRITTEN_HERE if name in metrics}
    if final:
        logger.log_metrics(final, step)


def mlflow_run_to_resume(node: DictConfig, resume: str | None) -> dict[str, str]:
    """`run_id=` for an MLFlowLogger of a resumed run, so it logs into that run's MLflow run, not a new one. The store
    lives in the run's own directory (conf/logger/mlflow.yaml): its latest run is the one."""
    if not resume or not str(node.get("_target_", "")).endswith("MLFlowLogger"):
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(node.tracking_uri)
    experiment = client.get_experiment_by_name(node.experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"]) if experiment else []
    return {"run_id": runs[0].info.run_id} if runs else {}
