"""Where the project's files live, and the resolvers its configs use.

Only Hydra and the standard library are imported here: the entry points import this before the command line is
parsed, and `--help` must not wait for torch.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
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


def override_pairs(override_dirname: str) -> list[str]:
    """Hydra's `override_dirname` (`key=value` pairs joined by commas) back into its pairs; a comma inside a list or
    dict value (`tags=[a,b]`) stays in its value."""
    pairs, depth, start = [], 0, 0
    for at, char in enumerate(override_dirname):
        depth += (char in "[{(") - (char in "]})")
        if char == "," and depth == 0 and re.match(r"[+~]*[\w./@-]+=", override_dirname[at + 1:]):
            pairs.append(override_dirname[start:at])
            start = at + 1
    return [pair for pair in [*pairs, override_dirname[start:]] if pair]


def swept_values() -> dict[str, list[str]]:
    """The keys this process's command line sweeps over (`precision=32,bf16-mixed`), each with the values it takes
    (none listed for an interval, which a sweeper such as Optuna samples), for Hydra's basic launcher, which names
    the jobs in this process."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([arg for arg in sys.argv[1:] if not arg.startswith("-")])
    except HydraException:
        return {}
    listed = (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP)
    return {override.key_or_group: list(override.sweep_string_iterator()) if override.value_type in listed else []
            for override in parsed if override.is_sweep_override()}


def run_name_suffix(override_dirname: str, limit: int = 80) -> str:
    """`_precision=16-master,net=cnn`: what a run's overrides change, appended to its directory's name, so TensorBoard's
    run list, legends and HParams say what differs. Empty without overrides; `/` becomes `-`, quotes go.

    A sweep's own keys come first, then the tags. Never cut inside a pair: past `limit`, keys lose their groups
    (`optimizer.lr` -> `lr`, where still unique), then whole pairs are dropped from the end and the name ends in
    `+<dropped>-<hash of all of them>`, so runs that differ only in the dropped pairs keep different names. Lengths are
    measured with each swept key's longest value, so every job of a sweep is named the same way.
    """
    pairs = override_pairs(override_dirname.replace("/", "-").replace("'", "").replace('"', ""))
    if not pairs:
        return ""
    sweep = swept_values()
    pairs = sorted(pairs, key=lambda pair: (_bare_key(pair) not in sweep, _bare_key(pair) != "tags"))
    # what the sweep's longest value of each pair's key adds to it: every job of a sweep is named the same way
    longer = [max([0, *(len(value) - len(pair.partition("=")[2]) for value in sweep.get(_bare_key(pair), []))]) for pair in pairs]

    def width(pairs: list[str]) -> int:
        return len(",".join(pairs)) + sum(longer[:len(pairs)])

    if width(pairs) <= limit:
        return "_" + ",".join(pairs)
    name = ",".join(pairs)
    keys = [pair.partition("=")[0] for pair in pairs]
    short = [key.rsplit(".", 1)[-1] for key in keys]
    if len(set(short)) == len(short):
        pairs = [f"{key}={pair.partition('=')[2]}" for key, pair in zip(short, pairs, strict=True)]
    if width(pairs) <= limit:
        return "_" + ",".join(pairs)
    digest = hashlib.sha1(name.encode()).hexdigest()[:6]
    kept = []
    for pair in pairs:
        tail = len(f",+{len(pairs) - len(kept) - 1}-{digest}") if len(kept) + 1 < len(pairs) else 0
        if width([*kept, pair]) + tail > limit:
            break
        kept.append(pair)
    return "_" + ",".join([*kept, f"+{len(pairs) - len(kept)}-{digest}"])


def _bare_key(pair: str) -> str:
    return pair.partition("=")[0].lstrip("+~")


OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("run_name_suffix", run_name_suffix, replace=True)  # run and sweep-job directory names
OmegaConf.register_new_resolver("command", command_name, replace=True)  # ${command:train} in the help texts
OmegaConf.register_new_resolver("basename", lambda path: Path(path).name, replace=True)  # the MLflow run's name
