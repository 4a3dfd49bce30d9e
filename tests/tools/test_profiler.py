"""Profilers: by default none, at no per-hook cost; debug=profiler: Lightning's PyTorchProfiler writes a per-layer table and a
trace into the run directory."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch.profilers import SimpleProfiler
from support import only_run_dir

from mnist_precision.cli import train as train_cli
from mnist_precision.kit.build import build_run
from mnist_precision.tools.profiling import LayerProfiler


def test_debug_profiler_writes_a_layer_table_and_a_perfetto_trace(run_main, tmp_path):
    result = run_main(train_cli.main, "debug=profiler", "net=quadrants_cnn")
    assert result.code == 0, result.stderr
    profile = only_run_dir(tmp_path / "logs") / "profile"
    rows = [line.split(" | ") for line in (profile / "layers-fit.md").read_text().splitlines()[2:]]
    kinds = {row[1] for row in rows}
    assert {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Linear"} <= kinds
    totals = [float(row[3]) for row in rows]
    assert totals == sorted(totals, reverse=True) and totals[0] > 0  # slowest first, measured
    assert rows[0][0] == "| `net`"  # the whole network's forward contains every layer's
    traces = list(profile.glob("*.pt.trace.json"))
    assert traces and "traceEvents" in json.loads(traces[0].read_text())


@pytest.mark.parametrize(("override", "kind"), [("debug=profiler", LayerProfiler), ("trainer.profiler=simple", SimpleProfiler)])
def test_a_chosen_profiler_replaces_it(make_config, override, kind):
    assert type(build_run(make_config(override)).trainer.profiler) is kind
