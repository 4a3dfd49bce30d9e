"""Making a project from this template with copier, and bringing the template's later changes into it.

The template is a git repository made from this checkout (its tracked files and the new ones git would track), as a
user's `copier copy` would clone it. Not in a copy itself: copier.yml leaves this file out.
"""

from __future__ import annotations

import importlib.metadata
import keyword
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OLD_NAMES = ("mnist_precision", "mnist-precision", "mnist-train", "mnist-eval", "mnist-bench", "mnist-export")
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main",
       "-c", "commit.gpgsign=false"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def copier(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "copier", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def template_repository(target: Path) -> Path:
    """This checkout's files (tracked, and new ones git would track) committed into a new repository, tagged v1."""
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    git(target, "init", "-q")
    git(target, "add", "-A")
    git(target, "commit", "-qm", "template v1")
    git(target, "tag", "v1")
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow  # about 15 s: a copy of the checkout, copier, then part of the copy's test suite
def test_a_copy_is_renamed_runs_under_its_names_and_gets_none_of_the_templates_own_files(tmp_path):
    template = template_repository(tmp_path / "template")
    made = copier(tmp_path, "copy", "--trust", "--defaults", "--data", "package_name=digits", str(template), "digits")
    assert made.returncode == 0, made.stderr
    copy = tmp_path / "digits"

    left = [(path.relative_to(copy), line) for path in copy.rglob("*") if path.is_file()
            for line in path.read_text(encoding="utf-8", errors="ignore").splitlines() if any(old in line for old in OLD_NAMES)]
    assert left == [(Path("README.md"), next(line for line in (copy / "README.md").read_text().splitlines() if "Made from" in line))]
    assert "Made from the mnist-precision template" in left[0][1]  # the README's one line of where it came from
    assert (copy / "src/digits/cli/train.py").is_file() and not (copy / "src/mnist_precision").exists()
    pyproject = (copy / "pyproject.toml").read_text()
    assert all(f'digits-{command} = "digits.cli.{command}:main"' in pyproject for command in ("train", "eval", "bench", "export"))
    assert yaml.safe_load((copy / ".copier-answers.yml").read_text()) == {"_commit": "v1", "_src_path": str(template), "package_name": "digits"}
    # the template's own: its CI runner, the renaming and this test; no run outputs
    for own in (".ci", "scripts/rename.py", "tests/kit/test_copier.py", "copier.yml"):
        assert not (copy / own).exists(), own
    assert [path.name for path in (copy / "logs").iterdir()] == [".gitkeep"]

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


@pytest.mark.slow  # about 20 s: a copy, a user's commit, a template change, and copier's update
def test_copier_update_brings_a_template_change_into_a_copy_and_keeps_the_users_changes(tmp_path):
    template = template_repository(tmp_path / "template")
    assert copier(tmp_path, "copy", "--trust", "--defaults", "--data", "package_name=digits", str(template), "digits").returncode == 0
    copy = tmp_path / "digits"
    git(copy, "init", "-q")
    git(copy, "add", "-A")
    git(copy, "commit", "-qm", "from the template")
    # the user edits the task: a docstring, and a network of their own
    mlp_doc = '"""784 -> `layers` x (hidden, ReLU) -> 10: the Flux tutorial\'s network (hidden=128, one layer)."""'
    edit(copy / "src/digits/task/nets.py", mlp_doc, '"""My own MLP."""')
    (copy / "src/digits/task/nets.py").write_text((copy / "src/digits/task/nets.py").read_text() + "\n\ndef mine() -> nn.Module:\n    return nn.Identity()\n")
    edit(copy / "conf/net/mlp.yaml", "hidden: 128", "hidden: 256")
    git(copy, "commit", "-qam", "my task")
    # the template changes its machinery (naming itself, as its code does), and the line the user changed
    runs = template / "src/mnist_precision/kit/runs.py"
    edit(runs, "from __future__ import annotations\n", "from __future__ import annotations\n\nUPDATED = 'mnist_precision.kit.runs, for mnist-train'\n")
    edit(template / "src/mnist_precision/task/nets.py", mlp_doc, '"""The template\'s better MLP docstring."""')
    git(template, "commit", "-qam", "template v2")
    git(template, "tag", "v2")

    updated = copier(copy, "update", "--trust", "--defaults")
    assert updated.returncode == 0, updated.stderr
    assert "UPDATED = 'digits.kit.runs, for digits-train'" in (copy / "src/digits/kit/runs.py").read_text()  # arrived, renamed
    assert not (copy / "src/mnist_precision").exists()
    assert "hidden: 256" in (copy / "conf/net/mlp.yaml").read_text()  # the user's change, untouched
    nets = (copy / "src/digits/task/nets.py").read_text()
    assert "def mine() -> nn.Module:" in nets
    conflict = re.search(r"<<<<<<< before updating\n(.*)\n=======\n(.*)\n>>>>>>> after updating", nets)  # copier's inline
    assert conflict and conflict.groups() == ('    """My own MLP."""', '    """The template\'s better MLP docstring."""')
    status = git(copy, "status", "--porcelain").splitlines()
    assert sorted(status) == sorted([" M .copier-answers.yml", " M src/digits/kit/runs.py", "UU src/digits/task/nets.py"])
    assert yaml.safe_load((copy / ".copier-answers.yml").read_text())["_commit"] == "v2"


def copier_questions() -> dict:
    return yaml.safe_load((ROOT / "copier.yml").read_text())


@pytest.mark.parametrize(("name", "message"), [
    ("my-pkg", "package_name must be a Python package name, lowercase letters, digits and _ starting with a letter, got "
               "'my-pkg' (did you mean my_pkg?)"),
    ("torch", "package_name 'torch' is already a module (of the standard library or a dependency of this project)"),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [  # (about a second each: copier's start)
        ("2bad", "lowercase letters, digits and _ starting with a letter, got '2bad'"),
        ("class", "package_name 'class' is a Python keyword"),
        ("json", "package_name 'json' is already a module")]),
])
def test_a_bad_package_name_is_refused_before_anything_is_written(tmp_path, name, message):
    template = tmp_path / "template"  # the questions are all that copier reads before it writes
    template.mkdir()
    shutil.copy(ROOT / "copier.yml", template)
    refused = copier(tmp_path, "copy", "--trust", "--defaults", "--data", f"package_name={name}", str(template), "project")
    assert refused.returncode == 1
    # copier prints its own traceback above the message (copier-org/copier#1436): the message is the last line
    last_line = refused.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: Validation error for question 'package_name': ") and message in last_line
    assert not (tmp_path / "project").exists()


def test_the_package_name_defaults_to_the_destination_folders_name(tmp_path):
    from copier import run_copy

    template = tmp_path / "template"
    template.mkdir()
    shutil.copy(ROOT / "copier.yml", template)
    worker = run_copy(str(template), tmp_path / "My-Digits", defaults=True, pretend=True, unsafe=True, quiet=True)
    assert worker.answers.combined["package_name"] == "my_digits"


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_the_refused_names_cover_keywords_the_standard_library_the_dependencies_and_the_test_helpers():
    questions = copier_questions()
    keywords, taken = set(questions["python_keywords"]["default"].split()), set(questions["taken_module_names"]["default"].split())
    assert {word for word in keyword.kwlist if word.islower()} <= keywords
    assert {name for name in sys.stdlib_module_names if re.fullmatch(r"[a-z][a-z0-9_]*", name)} - taken == set()
    requirements = importlib.metadata.requires("mnist-precision")  # the installed project's, its extras' included
    distributions = {normalized(re.split(r"[<>=\[ ;]", req, maxsplit=1)[0]) for req in requirements} - {"mnist-precision"}
    imported = {name for name, dists in importlib.metadata.packages_distributions().items()
                if {normalized(dist) for dist in dists} & distributions and re.fullmatch(r"[a-z][a-z0-9_]*", name)}
    assert imported and imported - taken == set(), "copier.yml's taken_module_names misses a dependency's module"
    helpers = {path.stem for path in (ROOT / "tests").iterdir() if path.suffix == ".py" or (path / "__init__.py").is_file()}
    assert helpers - taken == set()
