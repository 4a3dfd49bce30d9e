"""mnist-export: torch.export programs in every format, loadable without this package, with the figures it reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import QUIET, only_run_dir, quadrants

from mnist_precision.cli import train as train_cli
from mnist_precision.tools import export as export_cli

LOAD_ELSEWHERE = """
import sys, torch
import torchao  # registers the quantize/dequantize ops the int8 graph calls (the float programs need nothing)
for path in sys.argv[1:]:
    program = torch.export.load(path).module()
    for batch in (1, 5):
        logits = program(torch.rand(batch, 1, 8, 8))
        assert logits.shape == (batch, 4) and logits.dtype == torch.float32, (path, logits.shape, logits.dtype)
assert not [name for name in sys.modules if name.startswith("mnist_precision")]
print("ok")
"""


def call(monkeypatch: pytest.MonkeyPatch, main, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["mnist", *argv])
    try:
        main()
    except SystemExit as exit_:
        assert exit_.code in (0, None), exit_.code


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One 16-master run of the quadrants task (its FP32 masters are what is exported), exported in every format."""
    logs = tmp_path_factory.mktemp("export") / "logs"
    with pytest.MonkeyPatch.context() as monkeypatch:
        call(monkeypatch, train_cli.main, *quadrants().overrides, *QUIET, f"paths.log_dir={logs}", "precision=16-master",
             "trainer.max_epochs=3", "optimizer.lr=0.01")
        run_dir = only_run_dir(logs)
        call(monkeypatch, export_cli.main, f"ckpt_path={run_dir / 'checkpoints/last.ckpt'}", "export.latency_runs=2")
    return run_dir / "export"


def test_every_format_is_saved_with_its_size_the_tasks_test_metrics_and_latency(exported):
    results = json.loads((exported / "export.json").read_text())
    assert list(results) == ["fp32", "fp16", "bf16", "int8"]
    for fmt, row in results.items():
        assert (exported / row["file"]).stat().st_size == row["bytes"]
        assert 0 <= row["test/acc"] <= 1 and row["latency_ms_batch_1"] > 0 and row["latency_ms_batch_64"] > 0, fmt
    assert results["fp32"]["test/acc"] > 0.9  # the trained model, scored by the quadrants module's own test_step
    assert results["fp16"]["bytes"] < results["fp32"]["bytes"]  # (int8 is smaller for a network of real size: mnist_task)
    for fmt in ("fp16", "bf16", "int8"):  # the same network: near-identical predictions
        assert abs(results[fmt]["test/acc"] - results["fp32"]["test/acc"]) <= 0.02, fmt
    assert (exported / "export.md").read_text().startswith("| format | file | size (KB) | test/acc (%) | ms, batch 1 | ms, batch 64 |")


@pytest.mark.slow  # about 6 s: a Python process of its own that imports torch and torchao
def test_every_program_runs_in_a_process_that_never_imports_this_package(exported):
    files = [str(exported / f"{fmt}.pt2") for fmt in ("fp32", "fp16", "bf16", "int8")]
    done = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, *files], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_an_unknown_format_and_a_platform_without_int8_are_refused(exported, monkeypatch):
    with pytest.raises(export_cli.UserError, match=r"unknown format\(s\) int4x; choose from fp32, fp16, bf16, int8"):
        export_cli.check_formats(["fp32", "int4x"])
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    with pytest.raises(export_cli.UserError, match="int8 uses the x86 quantizer .* this machine is aarch64"):
        export_cli.check_formats(["int8"])


def test_a_missing_checkpoint_is_one_message(run_main, tmp_path):
    result = run_main(export_cli.main, f"ckpt_path={tmp_path / 'nope.ckpt'}", f"paths.log_dir={tmp_path / 'logs'}", fast=False)
    assert result.code == 1 and result.stderr == f"error: ckpt_path={tmp_path / 'nope.ckpt'}: {tmp_path / 'nope.ckpt'} does not exist.\n"


def test_a_truncated_checkpoint_is_one_message(run_main, tmp_path):
    bad = tmp_path / "run/checkpoints/last.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = run_main(export_cli.main, f"ckpt_path={bad}", fast=False)
    assert result.code == 1 and "is not a readable checkpoint (truncated or corrupt?)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run/export").exists()
