#!/usr/bin/env python3
"""Rename this template in place: `python scripts/rename.py NAME` (run it once, in your copy, then reinstall).

NAME is your project's Python package (letters, digits, underscores: `digits`, `cifar_lab`). It replaces

    mnist_precision              -> NAME               (the package: src/, conf/ _target_s, tests, pyproject)
    mnist-precision              -> NAME with - for _  (the distribution and the README's title)
    mnist-train, -eval, -bench, -export -> NAME-train, ... (the console scripts)

in every file git tracks, and moves src/mnist_precision to src/NAME. "MNIST" on its own, the dataset, stays.
Then: `pip install -e ".[dev]" && pytest`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

OLD_PACKAGE = "mnist_precision"
OLD_DIST = "mnist-precision"
OLD_COMMAND_PREFIX = "mnist-"
COMMANDS = ("train", "eval", "bench", "export")


def replacements(name: str) -> list[tuple[str, str]]:
    dist = name.replace("_", "-")
    commands = [(f"{OLD_COMMAND_PREFIX}{command}", f"{dist}-{command}") for command in COMMANDS]
    return [(OLD_PACKAGE, name), (OLD_DIST, dist), *commands]


def tracked_files(root: Path) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True).stdout
    return [root / path for path in listed.split("\0") if path]


def rename(root: Path, name: str) -> list[Path]:
    """Rewrites every tracked text file that holds an old name, then moves the package; returns the changed files."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == OLD_PACKAGE:
        raise SystemExit(f"error: NAME must be a new Python package name (lowercase letters, digits, _), got {name!r}")
    changed = []
    for path in tracked_files(root):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file (a figure): holds no name to rename
        new = text
        for old, replacement in replacements(name):
            new = new.replace(old, replacement)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    package = root / "src" / OLD_PACKAGE
    if package.is_dir():
        subprocess.run(["git", "mv", str(package), str(root / "src" / name)], cwd=root, check=True)
    return changed


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = Path(__file__).resolve().parents[1]
    changed = rename(root, sys.argv[1])
    print(f"renamed the package to {sys.argv[1]} ({len(changed)} files rewritten). Now: pip install -e \".[dev]\" && pytest")


if __name__ == "__main__":
    main()
