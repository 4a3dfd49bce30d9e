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

# Final metrics the run does not log as scalars itself, written here as scalars; TensorBoard's HParams tab shows every
# scalar of a run (test/acc, samples/s, ... and these) beside its knobs.
WRITTEN_HERE = ("memory/peak_mb", "time/fit_seconds", "time/wall_seconds")  # and the monitored metric's best
DASHBOARD_SUFFIX = ".dashboard"

# TensorBoard's Custom Scalars tab: each chart overlays the tags its regexes match. The training and validation values
# of one metric share a chart (`train/loss_epoch` with `val/loss`, `train/acc` with `val/acc`), whatever the task
# logs: `layout` makes one chart per metric name from the run's scalars, and these come after.
MACHINERY_CHARTS = {
    "training": {
        "learning rate": ["Multiline", [r"^lr-"]],
        "samples/s": ["Multiline", [r"^train/samples_per_sec$"]],
    },
    "precision": {
        "loss scale": ["Multiline", [r"^train/loss_scale$"]],
        "skipped steps": ["Multiline", [r"^train/skipped_steps$"]],
    },
}
KNOB_GROUPS = ("model", "net", "optimizer", "scheduler", "precision", "data")  # their leaves, flattened
TRAINER_KNOBS = ("max_epochs", "max_steps", "devices", "num_nodes", "accumulate_grad_batches", "gradient_clip_val")


def layout(metric_names: list[str]) -> dict[str, dict[str, list]]:
    """One chart per metric logged for both training and validation (`train/<name>` and `val/<name>`, the training
    monitor's `train/loss_epoch` paired with `val/loss`), then the machinery's own charts."""
    stem = {name: name.split("/", 1)[1].removesuffix("_epoch") for name in metric_names if name.startswith(("train/", "val/"))}
    charts = {}
    for name in sorted(set(stem.values())):
        tags = sorted(tag for tag, base in stem.items() if base == name and not tag.endswith("_step"))
        if len(tags) > 1:
            charts[f"{name} (training, validation)"] = ["Multiline", [f"^{tag}$" for tag in tags]]
    return {"compare": charts, **MACHINERY_CHARTS} if charts else dict(MACHINERY_CHARTS)


def knobs(cfg: DictConfig) -> dict[str, Any]:
    """The settings that define an experiment, flattened to the keys an override names (`net.hidden`, `optimizer.lr`),
    with class paths shortened to class names and paths left out: what TensorBoard's HParams tab compares runs by.
    (Dotted, so that no knob shares a column name with a metric such as `train/loss_scale`.)"""
    config = OmegaConf.to_container(cfg, resolve=True)
    chosen: dict[str, Any] = {}
    for group in KNOB_GROUPS:
        node = config.get(group)
        if isinstance(node, dict):
            chosen.update(_flatten(group, node))
    chosen.update({"seed": config["seed"], "matmul_precision": config["matmul_precision"], "tags": ",".join(tags(cfg))})
    chosen.update({f"trainer.{key}": config["trainer"].get(key) for key in TRAINER_KNOBS})
    strategy = config["trainer"].get("strategy")
    chosen["trainer.strategy"] = _short(strategy["_target_"]) if isinstance(strategy, dict) else strategy
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in chosen.items()}


def tags(cfg: DictConfig) -> list[str]:
    """The run's `tags=[...]` (lightning-hydra-template's habit), as strings."""
    return [str(tag) for tag in cfg.get("tags") or []]


def _flatten(prefix: str, node: dict[str, Any]) -> dict[str, Any]:
    """`{_target_: torch.optim.Adam, lr: 0.001}` under `optimizer` -> `{optimizer: Adam, optimizer.lr: 0.001}`; the
    model's copies of other groups (its `net: ${net}`) and anything that names a file or directory are left out."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if key == "_target_":
            flat[prefix] = _short(value)
        elif key == "name" and "." not in prefix:  # a group's own name for its choice (precision.name: 16-master)
            flat[prefix] = value
        elif key.startswith("_") or key in KNOB_GROUPS or key.endswith(("_dir", "_path", "_root")):
            continue
        elif isinstance(value, dict):
            flat.update(_flatten(f"{prefix}.{key}", value))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def final_metrics(cfg: DictConfig, metrics: dict[str, float]) -> list[str]:
    """The final metrics the run does not log as scalars itself, of those it has."""
    return [name for name in (*WRITTEN_HERE, f"{cfg.monitor.metric}_best") if name in metrics]


def write_dashboard(log_dir: str | Path, cfg: DictConfig, metrics: dict[str, float], step: int, status: str = "finished") -> None:
    """Replace the run's dashboard event file: the custom-scalars layout, the knobs with the run's `status` (running,
    finished, or `failed: <reason>` / `stopped: <reason>`), and the final metrics written here."""
    from torch.utils.tensorboard.summary import custom_scalars, hparams, scalar, text
    from torch.utils.tensorboard.writer import FileWriter

    log_dir = Path(log_dir)
    for old in log_dir.glob(f"*{DASHBOARD_SUFFIX}"):
        old.unlink()
    writer = FileWriter(str(log_dir), filename_suffix=DASHBOARD_SUFFIX)
    writer.add_summary(custom_scalars(layout(list(metrics))))
    _experiment, session_start, session_end = hparams({**knobs(cfg), "status": status}, {})
    writer.add_summary(session_start)  # no per-run experiment record: TensorBoard then builds the experiment from every
    if status != "running":            # run's session and shows first the knobs whose values differ between runs
        writer.add_summary(with_session_status(session_end, status))
    for name in final_metrics(cfg, metrics):
        writer.add_summary(scalar(name, metrics[name]), step)
    if tags(cfg):
        writer.add_summary(text("tags", ", ".join(tags(cfg))), step)  # the Text tab
    writer.close()


def with_session_status(session_end: Any, status: str) -> Any:
    """torch's session-end summary (always STATUS_SUCCESS) with the run's own status, which HParams' status filter reads:
    success, failure for a run an error stopped, unknown for one a signal stopped (it resumes)."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    value = session_end.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    data.session_end_info.status = {"finished": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE}.get(
        status.split(":")[0], api_pb2.STATUS_UNKNOWN)
    value.metadata.plugin_data.content = data.SerializeToString()
    return session_end


def write_mlflow(logger: Any, cfg: DictConfig, metrics: dict[str, float], step: int) -> None:
    """MLflow's side of the dashboard: the knobs as the run's params, and the final metrics the run does not log itself.

    MLflow params cannot change once logged: a resume that changes one (trainer/max_epochs) keeps its first value there,
    and logs only the knobs that are new.
    """
    logged = logger.experiment.get_run(logger.run_id).data.params
    logger.log_hyperparams({name: value for name, value in knobs(cfg).items() if name not in logged})
    for tag in tags(cfg):  # each tag an MLflow tag, so `tags.<tag> = 'true'` finds the runs that carry it
        logger.experiment.set_tag(logger.run_id, tag, "true")
    final = {name: metrics[name] for name in final_metrics(cfg, metrics)}
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


def log_dashboard(trainer: Any, cfg: DictConfig, metrics: dict[str, float], status: str = "finished") -> None:
    """Write the dashboard of every logger that has one (TensorBoard, MLflow), from rank 0."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # (the Trainer knows its rank only once fitting)
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            write_dashboard(logger.log_dir, cfg, metrics, trainer.global_step, status)
        elif isinstance(logger, MLFlowLogger):
            write_mlflow(logger, cfg, metrics, trainer.global_step)
