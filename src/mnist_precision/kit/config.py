"""Where the project's files live, and the resolvers its configs use.

Only Hydra and the standard library are imported here: the entry points import this before the command line is
parsed, and `--help` must not wait for torch.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE = __package__.split(".")[0]  # mnist_precision, or whatever a renamed copy is called
PROJECT_ROOT = Path(__file__).resolve().parents[3]  # src/<package>/kit/config.py -> project root (editable install)
CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_LOG_DIR = PROJECT_ROOT / "logs"


@functools.cache
def command_name(task: str) -> str:
    """The console script that runs `<package>.cli.<task>:main`: `mnist-train` here, whatever a renamed copy calls it.

    From the installed entry points, else from this checkout's pyproject.toml (a copy not yet reinstalled), else
    `python -m <package>.cli.<task>`. The help texts and messages use it, so a renamed template names its own commands.
    """
    target = f"{PACKAGE}.cli.{task}:main"
    for entry_point in entry_points(group="console_scripts"):
        if entry_point.value == target:
            return entry_point.name
    try:
        import tomllib

        scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        return next(name for name, value in scripts.items() if value == target)
    except (ImportError, OSError, KeyError, StopIteration):
        return f"python -m {PACKAGE}.cli.{task}"


def run_name_suffix(override_dirname: str, limit: int = 80) -> str:
    """`_precision=16-master,net=cnn`: what a run's overrides change, appended to its directory's name, so TensorBoard's
    run list and legends say what differs. Empty without overrides; `/` becomes `-`, quotes go, cut at `limit`."""
    name = override_dirname.replace("/", "-").replace("'", "").replace('"', "")[:limit]
    return f"_{name}" if name else ""


OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("run_name_suffix", run_name_suffix, replace=True)  # run and sweep-job directory names
OmegaConf.register_new_resolver("command", command_name, replace=True)  # ${command:train} in the help texts
OmegaConf.register_new_resolver("basename", lambda path: Path(path).name, replace=True)  # the MLflow run's name
