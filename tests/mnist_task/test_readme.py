"""README.md and docs/ against the code: every documented mnist-train / mnist-eval command runs (on the synthetic data, a
few batches each), and the output, tags and table columns the README shows are the ones the code produces."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import tensorboard_events

from mnist_precision.cli import eval as eval_cli
from mnist_precision.cli import train as train_cli
from mnist_precision.kit.config import command_name

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
TRAIN, EVAL = command_name("train"), command_name("eval")  # mnist-train, mnist-eval: a renamed copy's own names
FEW_BATCHES = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Each fenced block of a Markdown page: its language (empty for a plain block) and its lines."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = (line[3:].strip(), [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[1].append(line)
    return blocks


def documented_commands(text: str) -> list[str]:
    """The mnist-train / mnist-eval commands in a page's bash blocks, in order."""
    commands = []
    for language, lines in fenced_blocks(text):
        if language != "bash":
            continue
        for line in lines:
            found = re.search(rf"\b(?:{re.escape(TRAIN)}|{re.escape(EVAL)})\b.*", line.split("  #")[0].strip())
            if found:
                commands.append(found.group(0))
    return commands


CLUSTER_MISSING = ("submits SLURM jobs with sbatch, which is not on this machine's PATH", "torch sees no CUDA GPU here",
                   "is not one of several nodes")


def needs_a_cluster(command: str) -> bool:
    """The GPU, multi-node and SLURM commands: with no GPU and no sbatch here, each must be refused cleanly."""
    needs = ("hydra/launcher=slurm" in command and shutil.which("sbatch") is None) or "trainer.num_nodes=2" in command
    return needs or (("trainer=ddp " in command or command.endswith("trainer=ddp") or "trainer=gpu" in command) and not torch.cuda.is_available())


def shape(text: str) -> str:
    """A line with its numbers and paths blanked: what must match between the README and a real run."""
    return re.sub(r"\d[\d,.]*", "N", re.sub(r"/\S+", "PATH", text.strip()))


def block_starting_with(text: str, prefix: str) -> list[str]:
    """The lines of the first plain fenced block whose first line starts with `prefix`."""
    return next(lines for language, lines in fenced_blocks(text) if not language and lines and lines[0].startswith(prefix))


def run_documented(run_main, run_cli, logs: Path, commands: list[str]) -> dict[str, str]:
    """Runs each command (refused cleanly where it needs a cluster); returns each one's stdout. A run directory the
    command names (`hydra.run.dir=/shared/...`, `logs/...`) is made under the test's own directory instead."""
    outputs = {}
    for command in commands:
        command = command.replace("hydra.run.dir=/", f"hydra.run.dir={logs}/").replace("hydra.run.dir=logs/", f"hydra.run.dir={logs}/")
        latest = lambda kind: sorted((logs / kind).iterdir())[-1]  # noqa: E731
        if "<run>" in command:
            command = command.replace("logs/train/<run>", str(latest("train")))
        if "<timestamp>" in command:
            command = command.replace("logs/multirun/<timestamp>", str(latest("multirun")))
        name, *args = command.split()
        main = train_cli.main if name == TRAIN else eval_cli.main
        if needs_a_cluster(command):  # here: refused before anything starts, in one message saying what is missing
            result = run_main(main, *args)
            assert result.code == 1 and "Traceback" not in result.stderr, (command, result.stderr[-2000:])
            assert any(reason in result.stderr for reason in CLUSTER_MISSING), (command, result.stderr[-2000:])
            continue
        if "ddp" in command:  # Lightning starts the other ranks by re-running the process's command: not pytest's
            result = run_cli("train" if name == TRAIN else "eval", *args, *FEW_BATCHES, "trainer.enable_progress_bar=true", timeout=400)
        else:
            result = run_main(main, *args, *FEW_BATCHES, "trainer.enable_progress_bar=true")
        # The precision sweep's 16-true job ends in the documented error, and so does resume=latest once the newest
        # run has finished (the docs say what that prints).
        failing = re.search(r"(?<![\w-])16-true", command) is not None or command == "mnist-train resume=latest"  # (not bf16-true)
        assert result.code == (1 if failing else 0), (command, result.stderr[-2000:])
        assert failing or result.stderr == "", (command, result.stderr[-2000:])  # nothing a user cannot act on
        if command == "mnist-train resume=latest":
            assert "nothing is left to train. Train on with a larger limit" in result.stderr
        outputs[command] = result.stdout
    return outputs


@pytest.mark.slow  # about 60 s: every README command, two of them on 2 DDP processes
def test_every_readme_command_runs_and_prints_what_the_readme_shows(run_main, run_cli, tmp_path):
    outputs = run_documented(run_main, run_cli, tmp_path / "logs", documented_commands(README))
    first = outputs["mnist-train"].splitlines()
    assert [shape(line) for line in block_starting_with(README, "test/")] == [shape(line) for line in first[-4:]]
    epoch_line = block_starting_with(README, "epoch 1/")[0]
    assert shape(epoch_line).replace("N/N", "N") in [shape(line).replace("N/N", "N") for line in first]


@pytest.mark.slow  # about 90 s for all pages: two DDP runs, two sweeps
@pytest.mark.parametrize("page", [name for name, text in DOCS.items() if documented_commands(text)])
def test_every_docs_command_runs(run_main, run_cli, tmp_path, page):
    """Each page's commands in order (a page's resume follows its own run); one the README runs already is not run again."""
    in_readme = set(documented_commands(README)) - {command for command in documented_commands(README) if "<run>" in command}
    commands = [command for command in documented_commands(DOCS[page]) if command not in in_readme or "resume" in command]
    run_documented(run_main, run_cli, tmp_path / "logs", commands)


NOISY_BEFORE = {  # documented commands whose libraries printed their own chatter on stderr
    "profiler": ["debug=profiler", "data.eval_batch_size=20"],  # (5 validation and test batches: the profiler's schedule)
    "max_steps": ["trainer.max_steps=5"],  # stops before any validation
    "mlflow": ["logger=mlflow", "trainer.max_epochs=1", *FEW_BATCHES],
    "optuna": ["hparams_search=mnist_optuna", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1", *FEW_BATCHES],
}


@pytest.mark.slow  # about 35 s: four runs, each in a process of its own, as a user starts them
@pytest.mark.parametrize("case", NOISY_BEFORE)
def test_documented_commands_print_nothing_on_stderr_in_a_users_own_process(run_cli, case):
    result = run_cli("train", *NOISY_BEFORE[case], env={"PYTHONWARNINGS": ""})  # warnings on, as a user has them
    assert result.code == 0 and result.stderr == "", result.stderr[-2000:]
    assert "\x1b[" not in result.stdout  # no terminal colour codes in output that goes to a file


@pytest.mark.slow  # about 4 s: a 2-job sweep, then the script in a process of its own
def test_the_precision_table_has_the_readmes_columns(run_main, tmp_path):
    assert run_main(train_cli.main, "-m", "precision=32,16-master", *FEW_BATCHES).code == 0
    sweep = next((tmp_path / "logs/multirun").iterdir())
    printed = subprocess.run([sys.executable, str(ROOT / "scripts/precision_table.py"), str(sweep)], capture_output=True, text=True, check=True)
    rows = printed.stdout.splitlines()
    readme_table = [line for line in README[README.index("python scripts/precision_table.py"):].splitlines() if line.startswith("|")]
    assert rows[0] == readme_table[0]
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| `32`", "| `16-master`"]


def test_the_tensorboard_tags_the_readme_names_are_logged(run_main, tmp_path):
    assert run_main(train_cli.main, "precision=16-master", "trainer.max_epochs=2").code == 0
    run_dir = next((tmp_path / "logs/train").iterdir())
    accumulator = tensorboard_events(run_dir)
    paragraph = README[README.index("Each run logs to TensorBoard"):README.index("The\nHParams tab")]
    named = [tag for tag in re.findall(r"`([A-Za-z_-]+(?:/[a-z_]+)?)`", paragraph) if "/" in tag or tag.startswith("lr-")]
    assert len(named) >= 11
    assert set(named) <= set(accumulator.Tags()["scalars"])
