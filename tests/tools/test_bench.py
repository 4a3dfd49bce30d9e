"""The benchmarks run on tiny sizes and write valid output (speed itself is measured by the commands, not tests)."""

from __future__ import annotations

import json
import operator
import re
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from support import QUIET, quadrants, task_env

from mnist_precision.kit.errors import UserError
from mnist_precision.kit.private_api import TRAINING_STEP_HOOKS
from mnist_precision.tools import bench as bench_cli

SCRIPTS = Path(__file__).parents[2] / "scripts"
QUADRANTS = [*quadrants().overrides, *QUIET]
NO_MATMUL = ["bench.matmul=null"]  # (the bf16/FP32 matmul measurement takes minutes on a CPU without bfloat16 units)


@pytest.mark.slow  # about 25 s: 5 worker processes
def test_the_bench_writes_json_markdown_chart_and_tensorboard(run_main, tmp_path):
    result = run_main(bench_cli.main, "bench.nets=[quadrants_mlp]", "bench.precisions=[32,16-master]", "bench.warmup_epochs=1",
                      "bench.epochs=1", "bench.rounds=1", *NO_MATMUL)
    assert result.code == 0, result.stderr[-3000:]
    assert "[1/4] quadrants_mlp" in result.stdout and "samples/s" in result.stdout  # progress
    run_dir = next((tmp_path / "logs/bench").iterdir())
    report = json.loads((run_dir / "bench.json").read_text())
    kinds = {(r["precision"], r["kind"]) for r in report["results"]}
    assert kinds == {("32", "template"), ("16-master", "template"), ("32", "bare lightning"), ("32", "plain loop")}
    for r in report["results"]:
        assert r["samples_per_sec"] > 0 and r["epoch_seconds"] > 0 and r["peak_memory_mb"] > 0
    assert report["results"][1]["skipped_steps"] == 0 and 0 <= report["results"][0]["test"]["test/acc"] <= 1
    assert report["ratios"][0]["template / plain loop (epoch time)"] > 0 and report["ratios"][0]["bare lightning / plain loop"] > 0
    assert report["ratios"][0]["template / bare lightning"] > 0
    assert "| quadrants_mlp | 16-master | template |" in (run_dir / "bench.md").read_text()
    assert (run_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob("*.ckpt"))  # written as a run writes them (they are part of an epoch's time), not kept


@pytest.mark.slow  # about 25 s: 4 worker processes, two of them compiling
def test_each_precision_against_fp32_and_compiled_against_eager_beside_the_matmul_limit(run_main, tmp_path):
    result = run_main(bench_cli.main, "bench.nets=[quadrants_mlp]", "bench.precisions=[32,bf16-kahan]", "bench.warmup_epochs=1",
                      "bench.epochs=2", "bench.rounds=1", "bench.baselines=false", "bench.compile=true", "bench.matmul=256")
    assert result.code == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "logs/bench").iterdir())
    report = json.loads((run_dir / "bench.json").read_text())
    assert [(r["precision"], r["kind"]) for r in report["results"]] == [
        ("32", "template"), ("32", "template, compiled"), ("bf16-kahan", "template"), ("bf16-kahan", "template, compiled")]
    speeds = {row["precision"]: row for row in report["speeds"]}
    for precision, row in speeds.items():
        assert row["compiled / eager (training speed)"] > 0
        assert ("training speed / FP32's" in row) == (precision != "32")
    kahan = {r["kind"]: r for r in report["results"] if r["precision"] == "bf16-kahan"}
    expected = statistics.median(mine / theirs for mine, theirs in zip(kahan["template"]["timed_samples_per_sec_by_round"][0],
                                                                      report["results"][0]["timed_samples_per_sec_by_round"][0], strict=True))
    assert speeds["bf16-kahan"]["training speed / FP32's"] == pytest.approx(expected)  # epochs paired in time
    assert report["bf16_matmul_speedup"] > 0 and "bf16 / FP32 matmul speed on this device (256 x 256)" in result.stdout


def test_baselines_run_on_the_device_mnist_train_uses(make_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, with trainer=cpu asked for
    assert bench_cli.bench_device(make_config("trainer=cpu")).type == "cpu"
    assert bench_cli.bench_device(make_config("trainer.accelerator=auto")).type == "cuda"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=120, env=task_env(quadrants()))


@pytest.mark.slow  # about 12 s: torch's Timer runs each dtype for 0.5 s, in a process of its own
def test_matmul_benchmark_prints_a_table_for_each_dtype():
    done = run_script("bench_matmul.py", "--sizes", "64")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 64 |")]
    assert {row.split("|")[2].strip() for row in rows} >= {"fp32", "fp16", "bf16"}
    assert all(float(row.split("|")[4]) > 0 for row in rows)


@pytest.mark.slow  # about 10 s: a two-epoch run in a process of its own
def test_time_calls_times_each_logged_value_logger_write_and_checkpoint():
    """scripts/time_calls.py (docs/performance.md): a row for each self.log key, the logger's write and flush, and
    the checkpoints with the torch.save and fsync inside them, each counted per epoch and timed."""
    done = run_script("time_calls.py", *QUADRANTS, "trainer.max_epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 epochs of 8 steps, logging every 1" in done.stdout  # 512 training images, batch 64
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in done.stdout.splitlines() if line.startswith("| ")]
    table = {name: (float(per_epoch), float(median)) for name, per_epoch, median, _ in rows[1:]}
    assert table["self.log('train/loss_step')"][0] == 8  # every step logs (the training monitor's)
    assert table["self.log('train/acc')"][0] == 8  # the quadrants module logs its metric object every step
    expected = {"TensorBoardLogger.log_metrics", "TensorBoardLogger.save (flush)", "trainer.save_checkpoint", "of which torch.save",
                "of which os.fsync"}
    assert expected <= set(table)
    assert table["trainer.save_checkpoint"][0] == table["of which torch.save"][0] >= 1  # last.ckpt each epoch, and the best
    assert all(median > 0 for _, median in table.values())


@pytest.mark.slow  # about 3 s each: a process of its own that imports torch
@pytest.mark.parametrize("script", ["bench_transfer.py", "bench_relu_kernel.py"])
def test_gpu_benchmarks_say_they_need_a_gpu_on_cpu(script):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark runs for real")
    done = run_script(script)
    assert done.returncode == 0 and "needs a CUDA GPU" in done.stdout


@pytest.mark.slow  # about 35 s: 8 worker processes (4 configurations, 2 rounds)
def test_limit_train_batches_limits_the_baselines_too_and_they_take_turns_epoch_by_epoch(run_main, tmp_path):
    """Every row trains on the same number of batches, so the ratios compare equal work; and the configurations run
    one epoch each in turn, never two at once, so a ratio pairs epochs run one right after the other (issue 8)."""
    result = run_main(bench_cli.main, *NO_MATMUL, "bench.nets=[quadrants_mlp]", "bench.precisions=[32]", "bench.rounds=2", "bench.warmup_epochs=1",
                      "bench.epochs=2", "bench.limit_train_batches=3")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads((next((tmp_path / "logs/bench").iterdir()) / "bench.json").read_text())
    assert {r["kind"]: r["steps_per_epoch"] for r in report["results"]} == {"template": 3, "bare lightning": 3, "plain loop": 3}
    assert all(r["epoch_seconds"] > 0 and len(r["epoch_seconds_by_round"]) == 2 for r in report["results"])
    in_turn = ["template", "bare lightning", "plain loop"]
    for round_number in range(2):
        epochs = sorted((start, end, r["kind"]) for r in report["results"] for start, end in r["epoch_spans_by_round"][round_number])
        assert all(end <= next_start for (_, end, _), (next_start, _, _) in pairwise(epochs))  # one at a time
        assert [kind for *_, kind in epochs] == in_turn * 3


@pytest.mark.slow  # 8-11 s: 2 worker processes, each importing torch and Lightning
def test_a_variant_runs_the_template_with_its_overrides_in_turn_and_is_compared_with_it(run_main, tmp_path):
    result = run_main(bench_cli.main, *NO_MATMUL, "bench.nets=[quadrants_mlp]", "bench.precisions=[32]", "bench.baselines=false", "bench.rounds=1",
                      "bench.warmup_epochs=1", "bench.epochs=1", "bench.limit_train_batches=3", "bench.variants={no_tensorboard:['logger=none']}")
    assert result.code == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "logs/bench").iterdir())
    report = json.loads((run_dir / "bench.json").read_text())
    assert [(r["kind"], r["precision"]) for r in report["results"]] == [("template", "32"), ("template: no_tensorboard", "32")]
    assert report["ratios"][0]["no_tensorboard / template"] > 0
    runs = run_dir / "runs"
    assert (runs / "quadrants_mlp_32_template_round1/tensorboard").is_dir()
    assert not (runs / "quadrants_mlp_32_template_no_tensorboard_round1/tensorboard").exists()  # its overrides applied
    assert "| quadrants_mlp | 32 | template: no_tensorboard |" in (run_dir / "bench.md").read_text()


@pytest.mark.parametrize(("override", "message"), [
    ("bench.variants={quiet:['logger=nope']}", r"the template: quiet configuration \(quadrants_mlp, precision 32\): In 'train': Could not find 'logger/nope'"),
    ("bench.nets=[nope]", r"the template configuration \(nope, precision 32\): In 'train': Could not find 'net/nope'"),
    ("bench.variants={quiet:['trainer.nope=1']}", r"the template: quiet configuration \(quadrants_mlp, precision 32\): Could not override 'trainer.nope'"),
])
def test_a_configuration_that_does_not_compose_is_one_message_before_any_worker_starts(run_main, tmp_path, override, message):
    result = run_main(bench_cli.main, *NO_MATMUL, "bench.nets=[quadrants_mlp]", "bench.precisions=[32]", "bench.baselines=false", override)
    assert result.code == 1 and "Traceback" not in result.stderr
    assert re.search("error: " + message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "logs/bench").exists() or not any((tmp_path / "logs/bench").iterdir())  # no run dir left


def test_a_refused_bench_in_a_directory_of_the_users_keeps_the_users_files(run_main, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    result = run_main(bench_cli.main, f"hydra.run.dir={mine}", "bench.nets=[nope]")
    assert result.code == 1 and "Could not find 'net/nope'" in result.stderr
    assert (mine / "keep.txt").read_text() == "precious"


def check_variants(variants: object, precisions: list[str] | None = None) -> dict[str, list[str]]:
    """`checked_variants` on a bench config holding these variants (and precision 32 unless told)."""
    from omegaconf import OmegaConf

    return bench_cli.checked_variants(OmegaConf.create({"precisions": precisions or ["32"], "variants": variants}))


@pytest.mark.parametrize(("variants", "message"), [
    ({"quiet": "logger=none"}, "must map names to lists of training overrides"),
    ({"quiet": [1]}, "must map names to lists of training overrides"),
    (["logger=none"], "must map names to lists of training overrides"),
])
def test_bench_variants_that_are_not_lists_of_overrides_are_one_message(variants, message):
    with pytest.raises(UserError, match=message):
        check_variants(variants)


@pytest.mark.parametrize(("variants", "message"), [
    ({"no tb": ["logger=none"]}, "the name 'no tb' may hold only letters, digits, _ and -"),
    ({"cnn": ["net=cnn"]}, r"bench.variants.cnn: net=cnn would change what it is compared on"),
    ({"bf16": ["precision=bf16-mixed"]}, "bench.variants.bf16: precision=bf16-mixed would change"),
    ({"short": ["trainer.max_epochs=1", "logger=none"]}, "bench.variants.short: trainer.max_epochs=1 would change"),
    ({"few": ["+trainer.limit_train_batches=5"]}, r"bench.variants.few: \+trainer.limit_train_batches=5 would change"),
])
def test_a_variant_may_not_change_what_it_is_compared_on_nor_have_an_odd_name(variants, message):
    with pytest.raises(UserError, match=message):
        check_variants(variants)


def test_a_variant_without_the_training_monitor_is_refused_before_any_worker_starts(run_main, tmp_path):
    result = run_main(bench_cli.main, *NO_MATMUL, "bench.nets=[quadrants_mlp]", "bench.precisions=[32]", "bench.variants={bare:['callbacks=none']}")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert "error: the template: bare configuration (quadrants_mlp, precision 32): mnist-bench times the template's epochs" in result.stderr


def test_a_variants_ratio_is_its_epochs_paired_with_the_templates_and_leaves_the_baselines_as_they_were():
    def run(kind: str, precision: str, seconds: list[float]) -> dict:
        return {"net": "mlp", "kind": kind, "precision": precision, "steps_per_epoch": 10, "timed_epoch_seconds_by_round": [seconds]}

    results = [run("template", "32", [2.0, 4.0, 2.0]), run("template", "bf16-mixed", [9.0, 9.0, 9.0]),
               run("template: quiet", "32", [1.0, 3.0, 1.5]), run("plain loop", "32", [1.0, 2.0, 1.0])]
    (row,) = bench_cli.ratios(results)
    assert list(row) == ["net", "template / plain loop (epoch time)", "template overhead (us/step)", "quiet / template"]
    assert row["quiet / template"] == 0.75  # median of 0.5, 0.75, 0.75: against the template at 32, not at bf16-mixed
    assert row["template / plain loop (epoch time)"] == 2.0


def test_bench_variants_need_the_template_at_precision_32_to_compare_with():
    with pytest.raises(UserError, match="keep 32 in bench.precisions"):
        check_variants({"quiet": ["logger=none"]}, precisions=["bf16-mixed"])


class SlowParent:
    """The parent's end of a worker's connection, as seen by the worker: every "go" comes WAIT seconds later."""

    WAIT = 0.5

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def send(self, message: tuple[str, object]) -> None:
        self.sent.append(message)

    def recv(self) -> str:
        time.sleep(self.WAIT)
        return "go"


def test_the_template_waits_for_its_turn_outside_its_clocks(tmp_path):
    """TakeTurns runs before the template's own epoch-start hooks: the wait is in neither the epoch nor samples/s."""
    parent = SlowParent()
    overrides = [*QUADRANTS, "trainer.max_epochs=2", "trainer.limit_train_batches=2"]
    result = bench_cli.measure_template(overrides, str(tmp_path / "run"), 0, bench_cli.Turns(parent))
    assert [what for what, _ in parent.sent] == ["ready", "epoch", "epoch"]
    assert all(end - start < SlowParent.WAIT for start, end in result["epoch_spans"])
    assert result["samples_per_sec"] > 2 * 64 / SlowParent.WAIT  # 2 batches of 64 trained in less than one wait


def test_the_benchs_clock_adds_no_hook_call_to_the_templates_steps(tmp_path, monkeypatch):
    """The bench's TakeTurns callback must not cost the template's steps the six training-step hooks it inherits empty."""
    made = []

    class Recorded(bench_cli.TakeTurns):
        def __init__(self, turns, samples_per_epoch=0):
            super().__init__(turns, samples_per_epoch)
            made.append(self)

    class Parent(SlowParent):
        WAIT = 0.0

    monkeypatch.setattr(bench_cli, "TakeTurns", Recorded)
    overrides = [*QUADRANTS, "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    bench_cli.measure_template(overrides, str(tmp_path / "run"), 0, bench_cli.Turns(Parent()))
    assert len(made) == 1 and all(getattr(made[0], name) is None for name in TRAINING_STEP_HOOKS)


def test_without_the_training_monitor_the_bench_says_what_it_times_with(tmp_path):
    overrides = [*QUADRANTS, "callbacks=none"]
    with pytest.raises(UserError, match="keep callbacks.training_monitor"):
        bench_cli.measure_template(overrides, str(tmp_path / "run"), 0, bench_cli.Turns(SlowParent()))


def test_a_ratio_is_the_median_of_epochs_paired_in_time():
    run = {"timed_epoch_seconds_by_round": [[2.0, 9.0], [3.0]]}  # the machine was slow for the second epoch of round 1
    reference = {"timed_epoch_seconds_by_round": [[1.0, 6.0], [2.0, 2.5]]}
    assert bench_cli.paired(run, reference, operator.truediv) == 1.5  # median of 2.0, 1.5, 1.5: not 3.0 / 2.25
    assert bench_cli.paired(run, reference, operator.sub) == 1.0


def test_instruction_count_without_valgrind_is_one_message(tmp_path):
    """scripts/step_instructions.py (docs/performance.md) needs valgrind; without it: one line, exit 1, no traceback."""
    python_only = tmp_path / "bin"
    python_only.mkdir()
    (python_only / "python").symlink_to(sys.executable)
    done = subprocess.run([str(python_only / "python"), str(SCRIPTS / "step_instructions.py"), "trainer=cpu"], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(python_only)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "valgrind and callgrind_control not found: this count needs valgrind (Debian/Ubuntu: apt install valgrind)."
