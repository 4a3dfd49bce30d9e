"""README.md against the code: every documented mnist-train / mnist-eval command runs (on the synthetic data, a few
batches each), and the output, tags and table columns the README shows are the ones the code produces."""

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

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FEW_BATCHES = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def documented_commands() -> list[str]:
    """The mnist-train / mnist-eval commands in README's bash blocks and its results table, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            found = re.search(r"\bmnist-(?:train|eval)\b.*", line.split("  #")[0].strip())
            if found:
                commands.append(found.group(0))
    return commands + re.findall(r"\| `(mnist-train [^`]*)` \|", README)


CLUSTER_MISSING = ("submits SLURM jobs with sbatch, which is not on this machine's PATH", "torch sees no CUDA GPU here",
                   "is not one of several nodes")


def needs_a_cluster(command: str) -> bool:
    """README's GPU, multi-node and SLURM commands: with no GPU and no sbatch here, each must be refused cleanly."""
    needs = ("hydra/launcher=slurm" in command and shutil.which("sbatch") is None) or "trainer.num_nodes=2" in command
    return needs or (("trainer=ddp " in command or "trainer=gpu" in command) and not torch.cuda.is_available())


def shape(text: str) -> str:
    """A line with its numbers and paths blanked: what must match between the README and a real run."""
    return re.sub(r"\d[\d,.]*", "N", re.sub(r"/\S+", "PATH", text.strip()))


def readme_block_after(marker: str) -> list[str]:
    """The lines of the first fenced block after `marker`."""
    return README[README.index(marker):].split("```")[1].strip("\n").splitlines()


@pytest.mark.slow  # about 45 s: every command, two of them on 2 DDP processes
def test_every_documented_command_runs_and_prints_what_the_readme_shows(run_main, run_cli, tmp_path):
    logs = tmp_path / "logs"
    outputs = {}
    for command in documented_commands():
        latest = lambda kind: sorted((logs / kind).iterdir())[-1]  # noqa: E731
        if "<run>" in command:
            command = command.replace("logs/train/<run>", str(latest("train")))
        if "<timestamp>" in command:
            command = command.replace("logs/multirun/<timestamp>", str(latest("multirun")))
        name, *args = command.split()
        main = train_cli.main if name == "mnist-train" else eval_cli.main
        if needs_a_cluster(command):  # here: refused before anything starts, in one message saying what is missing
            result = run_main(main, *args)
            assert result.code == 1 and "Traceback" not in result.stderr, (command, result.stderr[-2000:])
            assert any(reason in result.stderr for reason in CLUSTER_MISSING), (command, result.stderr[-2000:])
            continue
        if "ddp" in command:  # Lightning starts the other ranks by re-running the process's command: not pytest's
            result = run_cli(name.removeprefix("mnist-"), *args, *FEW_BATCHES, "trainer.enable_progress_bar=true", timeout=400)
        else:
            result = run_main(main, *args, *FEW_BATCHES, "trainer.enable_progress_bar=true")
        # Two commands end in a documented error here: the precision sweep's 16-true job, and resume=latest without a
        # new limit, because in this sequence the newest run has finished (the README says what that prints).
        failing = "16-true" in command or command == "mnist-train resume=latest"
        assert result.code == (1 if failing else 0), (command, result.stderr[-2000:])
        if command == "mnist-train resume=latest":
            assert "nothing is left to train. Train on with a larger limit" in result.stderr
        outputs[command] = result.stdout

    # The summary block and the epoch line, as the README shows them.
    first = outputs["mnist-train"].splitlines()
    assert [shape(line) for line in readme_block_after("ends with a summary block")] == [shape(line) for line in first[-3:]]
    epoch_line = readme_block_after("one line per epoch instead")[0]
    assert shape(epoch_line).replace("N/N", "N") in [shape(line).replace("N/N", "N") for line in first]


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
    paragraph = README[README.index("Each run logs `train/loss_step`"):README.index("The HParams tab")]
    named = [tag for tag in re.findall(r"`([a-z_]+(?:/[a-z_]+)?)`", paragraph) if "/" in tag or tag == "lr"]
    assert len(named) >= 12
    assert set(named) <= set(accumulator.Tags()["scalars"])
