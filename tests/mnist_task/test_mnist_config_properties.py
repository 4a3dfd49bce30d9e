"""A property of every command line drawn from the MNIST task's config schemas and the machinery's: it trains normally,
or it is refused with one clear message and a non-zero exit; never a traceback, and nothing written outside its own run
directory."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_precision.cli import train as train_cli
from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.schema import MasterPrecisionConfig, SchedulerConfig
from mnist_precision.task.schema import DataConfig, MLPConfig

# The option each drawn group is set to, and its schema, whose fields are drawn.
OPTIONS = {"data": "mnist", "net": "mlp", "precision": "16-master", "scheduler": "step"}
SCHEMA_OF = {"data": DataConfig, "net": MLPConfig, "precision": MasterPrecisionConfig, "scheduler": SchedulerConfig}
# Values of every kind: right and wrong types, numbers in and out of range (small, so no draw is a huge run), null.
VALUES = ["0", "1", "2", "-1", "0.5", "1e-3", "abc", "true", "false", "null", "auto", "[1,2]", "dynamic", "epoch", "'32'"]
SIZES = ["data.val_size=128", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1"]


def schema_keys() -> list[str]:
    """Every field of the drawn options' schemas, as a config key (data.batch_size, precision.growth_interval, ...)."""
    return sorted(f"{group}.{field.name}" for group, schema in SCHEMA_OF.items() for field in dataclasses.fields(schema)
                  if not field.name.startswith("_"))


GROUPS = sorted(path.name for path in CONF_DIR.iterdir() if path.is_dir() and path.name not in ("hydra", "hparams_search"))

schema_value = st.builds(lambda key, value: f"{key}={value}", st.sampled_from(schema_keys()), st.sampled_from(VALUES))
valid = st.sampled_from(["data.batch_size=64", "net.hidden=16", "net.layers=2", "precision.growth_interval=3", "scheduler.interval=step",
                         "data.normalize=false", "precision.loss_scale=128", "data.on_device=false", "experiment=null"])
override = st.one_of(
    schema_value, schema_value, schema_value, valid, valid,  # types and ranges, and settings that train, drawn most often
    st.builds(lambda group, key: f"{group}.{key}=1", st.sampled_from(list(OPTIONS)), st.sampled_from(["bogus", "nonsense"])),  # unknown
    st.builds(lambda group: f"{group}=null", st.sampled_from(GROUPS)),  # null groups
)


def files_outside(root: Path, run_dirs: list[Path]) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and not any(run in path.parents for run in run_dirs)}


@pytest.mark.slow  # about 20 s: 30 short runs
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(override, min_size=1, max_size=2))
def test_every_drawn_command_line_trains_or_is_refused_in_one_message(run_main, overrides):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "before").write_text("a file that was here before the run")
        groups = [f"{group}={option}" for group, option in OPTIONS.items()]
        result = run_main(train_cli.main, *groups, *SIZES, f"paths.log_dir={root / 'logs'}", *overrides)

        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, (overrides, result.stderr)
        runs = sorted((root / "logs/train").iterdir()) if (root / "logs/train").is_dir() else []
        assert files_outside(root, runs) == {"before"}, overrides  # nothing written outside the run's own directory
        if result.code == 0:
            assert len(runs) == 1 and "test/acc" in json.loads((runs[0] / "metrics.json").read_text()), overrides
        else:
            assert result.stderr.strip(), overrides  # one message says why
            assert not runs or "error" in json.loads((runs[0] / "metrics.json").read_text()), overrides
