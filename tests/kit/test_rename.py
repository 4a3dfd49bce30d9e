"""`scripts/rename.py NAME` on a copy of this checkout: no old name is left, and the copy works under its new names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OLD_NAMES = ("mnist_precision", "mnist-precision", "mnist-train", "mnist-eval", "mnist-bench", "mnist-export")


def copy_of_this_checkout(target: Path) -> Path:
    """The files git tracks (or would: new files not yet committed) copied into a new git repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for command in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *command], cwd=target, check=True)
    return target


@pytest.mark.slow  # about 10 s: a copy of the checkout, then part of its test suite
def test_rename_leaves_no_old_name_and_the_copy_runs_under_its_new_names(tmp_path):
    copy = copy_of_this_checkout(tmp_path / "digits")
    renamed = subprocess.run([sys.executable, "scripts/rename.py", "digits"], cwd=copy, capture_output=True, text=True)
    assert renamed.returncode == 0, renamed.stderr

    left = [(path, old) for path in copy.rglob("*") if path.is_file() and ".git" not in path.parts
            for old in OLD_NAMES if old in path.read_text(encoding="utf-8", errors="ignore")]
    assert left == []
    assert (copy / "src/digits/cli/train.py").is_file() and not (copy / "src/mnist_precision").exists()

    # Not reinstalled: the copy's package from its src/, its command names from its pyproject.toml.
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONWARNINGS": "ignore"}
    helped = subprocess.run([sys.executable, "-m", "digits.cli.train", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("digits-train: train the task's model"), helped.stderr
    assert "digits-eval ckpt_path=" in helped.stdout and not any(old in helped.stdout for old in OLD_NAMES)
    refused = subprocess.run([sys.executable, "-m", "digits.cli.eval"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith("error: digits-eval needs a checkpoint: digits-eval ckpt_path=")

    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kit/test_cli.py", "-k", "help or bad_training_input"],
                            cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stdout[-3000:]
