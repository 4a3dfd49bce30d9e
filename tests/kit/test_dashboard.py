"""TensorBoard's HParams tab, read back through TensorBoard's own event reader: the knobs and the final metrics of
the latest session of each run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import only_run_dir, tensorboard_events
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from mnist_precision.cli import train as train_cli


def hparams_of(run_dir: Path) -> tuple[dict, list[str], set[str]]:
    """As TensorBoard reads a run: its session's hparams values, its plugin tags, and its scalar tags (the metrics)."""
    accumulator = tensorboard_events(run_dir)
    content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    session = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    values = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for name, value in session.hparams.items()}
    return values, list(content), set(accumulator.Tags()["scalars"])


def test_hparams_hold_the_knobs_and_final_metrics_of_the_latest_session(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=1", "precision=bf16-mixed", "optimizer.lr=0.002").code == 0
    assert run_main(train_cli.main, "resume=latest", "trainer.max_epochs=2").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    values, tags, scalars = hparams_of(run_dir)

    assert values["trainer.max_epochs"] == 2  # the resumed session's, not the first one's
    assert values["status"] == "finished" and session_status(run_dir) == api_pb2.STATUS_SUCCESS
    assert values["precision"] == "bf16-mixed" and values["optimizer.lr"] == 0.002 and values["optimizer"] == "Adam"
    assert values["model"] == "QuadrantsClassifier" and values["net"] == "mlp" and values["net.hidden"] == 32
    assert values["data.batch_size"] == 64 and values["scheduler.lr_scheduler"] == "None" and values["seed"] == 42
    assert len(values) <= 30 and not [name for name in values if "_target_" in name or "dirpath" in name]
    assert not set(values) & scalars  # no knob shares a column with a metric
    assert {"test/acc", "val/acc_best", "train/samples_per_sec", "memory/peak_mb", "time/wall_seconds"} <= scalars
    # No per-run experiment record: TensorBoard builds the experiment from all the runs' sessions, marks the knobs
    # whose values differ between runs, and shows those first (its table shows five knobs until more are ticked).
    assert hparams_metadata.EXPERIMENT_TAG not in tags
    assert len(list((run_dir / "tensorboard").glob("*.dashboard"))) == 1


def session_status(run_dir: Path) -> int:
    """The session's end status as HParams' status filter reads it."""
    content = tensorboard_events(run_dir).PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    return hparams_metadata.parse_session_end_info_plugin_data(content[hparams_metadata.SESSION_END_INFO_TAG]).status


def test_a_failed_runs_row_carries_its_status_and_the_one_line_reason(run_main, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))  # fault_injection, for Hydra's instantiate
    result = run_main(train_cli.main, "trainer.max_epochs=2", "+callbacks.poison._target_=fault_injection.PoisonInputAtSteps",
                      "+callbacks.poison.steps=[3]")
    assert result.code == 1
    run_dir = only_run_dir(tmp_path / "logs")
    values, _, _ = hparams_of(run_dir)
    assert values["status"].startswith("failed: the training loss is nan at step 3 (epoch 0, batch 3)"), values["status"]
    assert session_status(run_dir) == api_pb2.STATUS_FAILURE


def test_tags_are_recorded_in_hparams_the_text_tab_metrics_json_and_the_run_name(run_main, tmp_path):
    import json

    assert run_main(train_cli.main, "trainer.max_epochs=1", "tags=[baseline,ablation]").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    assert json.loads((run_dir / "metrics.json").read_text())["tags"] == ["baseline", "ablation"]
    assert "tags=[baseline,ablation]" in run_dir.name
    values, _, _ = hparams_of(run_dir)
    assert values["tags"] == "baseline,ablation"
    accumulator = tensorboard_events(run_dir)
    text = [tag for tag in accumulator.Tags()["tensors"] if tag.startswith("tags")]
    assert text and accumulator.Tensors(text[0])[-1].tensor_proto.string_val[0].decode() == "baseline, ablation"


def test_a_custom_scalars_layout_overlays_each_metrics_training_and_validation_values(run_main, tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    assert run_main(train_cli.main, "trainer.max_epochs=1", "precision=16-master").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    accumulator = tensorboard_events(run_dir)
    assert metadata.CONFIG_SUMMARY_TAG in accumulator.Tags()["tensors"]  # what the Custom Scalars tab reads
    layout = layout_pb2.Layout.FromString(accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["loss (training, validation)"] == ["^train/loss_epoch$", "^val/loss$"]
    assert charts["acc (training, validation)"] == ["^train/acc$", "^val/acc$"]
    scalars = accumulator.Tags()["scalars"]
    for tags in charts.values():  # every chart draws something in a 16-master run
        assert any(re.search(pattern, tag) for pattern in tags for tag in scalars), tags


def test_hparams_columns_read_apart_and_tensorboard_has_no_epoch_chart(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=1", "precision=16-master").code == 0
    values, _, scalars = hparams_of(only_run_dir(tmp_path / "logs"))
    columns = [name.replace("/", ".") for name in [*values, *scalars]]  # the knob precision.loss_scale, the metric
    assert len(set(columns)) == len(columns)                             # train/loss_scale: no two read alike
    assert {"train/loss_scale", "train/skipped_steps", "train/samples_per_sec"} <= scalars
    assert "epoch" not in scalars  # Lightning's step-to-epoch line was the first chart of Scalars and Time Series


def test_logger_many_writes_tensorboard_and_a_csv_with_the_same_metrics(run_main, tmp_path):
    import csv

    assert run_main(train_cli.main, "logger=many", "trainer.max_epochs=2").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    with open(run_dir / "csv/metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    val_acc = [float(row["val/acc"]) for row in rows if row.get("val/acc")]
    accumulator = tensorboard_events(run_dir)
    assert len(val_acc) == 2 and val_acc == [event.value for event in accumulator.Scalars("val/acc")]
    assert any(row.get("test/acc") for row in rows) and any(row.get("train/loss_step") for row in rows)
    assert any(row.get("epoch") for row in rows)  # the CSV keeps Lightning's epoch column


@pytest.mark.slow  # about 8 s: a run and its resume, with MLflow's SQLite store
def test_logger_mlflow_keeps_one_mlflow_run_in_the_run_dir_that_a_resume_continues(run_main, tmp_path):
    from mlflow.tracking import MlflowClient

    first = run_main(train_cli.main, "logger=mlflow", "precision=bf16-mixed", "trainer.max_epochs=2", "tags=[baseline]")
    assert first.code == 0, first.stderr
    run_dir = only_run_dir(tmp_path / "logs")
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    assert f"MLflow: mlflow ui --backend-store-uri {store}" in first.stdout
    assert run_main(train_cli.main, f"resume={run_dir}", "trainer.max_epochs=3").code == 0

    client = MlflowClient(store)  # as `mlflow ui` reads it
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == run_dir.name
    run = runs[0]
    assert run.data.params["precision"] == "bf16-mixed" and run.data.params["net"] == "mlp"
    assert run.data.tags["baseline"] == "true"
    assert not [name for name in run.data.params if "_target_" in name or "dirpath" in name] and len(run.data.params) <= 30
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 3  # both sessions, in one run
    for name in ("test/acc", "val/acc_best", "train/samples_per_sec", "memory/peak_mb", "time/wall_seconds"):
        assert name in run.data.metrics, name
