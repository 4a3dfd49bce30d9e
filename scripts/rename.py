#!/usr/bin/env python3
"""The renaming copier runs in a new copy of this template (copier.yml's task), in the copy's directory:

    python <template>/scripts/rename.py NAME <template>

NAME is the copy's Python package (`digits`, `cifar_lab`; copier.yml checks it before anything is written). In the
files the template has (a file of your own is left alone) it replaces

    mnist_precision              -> NAME               (the package: src/, conf/ _target_s, tests, pyproject)
    mnist-precision              -> NAME with - for _  (the distribution and the README's title)
    mnist-train, -eval, -bench, -export -> NAME-train, ... (the console scripts)

and moves src/mnist_precision into src/NAME. "MNIST" on its own, the dataset, stays. The README says where the copy
came from. Copier runs this after every render, a copy and both sides of the difference an update applies, so a
template change arrives in a copy under the copy's names.

(A rewrite rather than copier's Jinja templating: a Jinja package directory and `{{ package_name }}` in every import
would leave the template repository itself unable to run.)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

OLD_PACKAGE = "mnist_precision"
OLD_DIST = "mnist-precision"
OLD_COMMAND_PREFIX = "mnist-"
COMMANDS = ("train", "eval", "bench", "export")
NOT_THE_TEMPLATES = {".git", ".venv", "venv", "logs", "data", ".pytest_cache", ".ruff_cache"}  # top-level folders
ORIGIN = ("\nMade from the {dist} template. `.copier-answers.yml` records the template and its version; "
          "`copier update --trust` brings in\nthe template's later changes ([docs/adapting.md](docs/adapting.md)).\n")


def replacements(name: str) -> list[tuple[str, str]]:
    dist = name.replace("_", "-")
    commands = [(f"{OLD_COMMAND_PREFIX}{command}", f"{dist}-{command}") for command in COMMANDS]
    return [(OLD_PACKAGE, name), (OLD_DIST, dist), *commands]


def template_files(template: Path) -> list[Path]:
    """The template's files, relative to it (its git directory, environments and run outputs left out)."""
    files = []
    for folder, subfolders, names in os.walk(template):
        subfolders[:] = [sub for sub in subfolders if sub != "__pycache__" and not sub.endswith(".egg-info")
                         and not (Path(folder) == template and sub in NOT_THE_TEMPLATES)]
        files += [Path(folder, name).relative_to(template) for name in names]
    return files


def rename(copy: Path, template: Path, name: str) -> None:
    """Rewrites the copy's files that came from the template, then moves the package into src/NAME."""
    if name == OLD_PACKAGE:
        return
    for relative in template_files(template):
        path = copy / relative
        if path.is_symlink() or not path.is_file():
            continue  # left out of the copy
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file (a figure): holds no name to rename
        new = text
        for old, replacement in replacements(name):
            new = new.replace(old, replacement)
        if relative == Path("README.md") and ORIGIN.format(dist=OLD_DIST) not in new:
            title, _, rest = new.partition("\n")
            new = title + "\n" + ORIGIN.format(dist=OLD_DIST) + rest
        if new != text:
            path.write_text(new, encoding="utf-8")
    package, target = copy / "src" / OLD_PACKAGE, copy / "src" / name
    for path in sorted(package.rglob("*")) if package.is_dir() else []:
        if path.is_file() and "__pycache__" not in path.parts:
            (target / path.relative_to(package)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target / path.relative_to(package))  # over an older copy's file: an update's render
    shutil.rmtree(package, ignore_errors=True)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    rename(Path.cwd(), Path(sys.argv[2]), sys.argv[1])


if __name__ == "__main__":
    main()
