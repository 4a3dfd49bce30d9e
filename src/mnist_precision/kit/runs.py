"""Run directories: `resume=<run_dir>|latest` and `mnist-eval ckpt_path=...` replay a run's saved overrides.

A run directory is what Hydra made for one training job: `.hydra/overrides.yaml` (the command-line
overrides that composed its config) and `checkpoints/`. Re-composing the config from those
overrides plus the new ones gives the run's config with the new values on top, and pointing
`hydra.run.dir` at the run directory keeps every output, TensorBoard events included, in one place.
Everything here runs before Hydra starts, so a bad argument is reported before anything is written.
"""

from __future__ import annotations

import difflib
import fcntl
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from omegaconf import OmegaConf

from mnist_precision.kit.config import CONF_DIR, DEFAULT_LOG_DIR, PACKAGE, command_name
from mnist_precision.kit.errors import RunRefused, UserError, first_line

SAVED_OVERRIDES = Path(".hydra") / "overrides.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
REPLACED_ON_REPLAY = ("resume", "ckpt_path")  # per-invocation keys, never taken from a saved run


PATH_SUFFIXES = ("_dir", "_path", "_root", "_file")  # a key naming a file or directory (data.data_dir, paths.log_dir, ...)


def is_path_key(key: str | None) -> bool:
    return key is not None and (key == "resume" or key.rsplit(".", 1)[-1].endswith(PATH_SUFFIXES))


OPTIONAL_GROUPS = ("experiment", "debug", "hparams_search")  # null by default (conf/train.yaml): null means none


def quote_values(argv: list[str]) -> list[str]:
    """Quote what Hydra's override grammar would misread.

    `precision=32` -> `precision='32'`: Hydra reads a bare 32 as an int, which it refuses as a config name.
    `resume=logs/train/<time>_precision=16-master,net=cnn` -> quoted: run directories are named after their
    overrides, and a bare `=` or `,` in a value is a parse error or a sweep to Hydra.
    `experiment=null` -> `~experiment`: no experiment, as by default.
    """

    def quote(option: str) -> str:
        return f"'{option}'" if option.isdigit() else option

    def quoted(arg: str) -> str:
        key = override_key(arg)
        if key in OPTIONAL_GROUPS and arg == f"{key}=null":  # Hydra's own answer to experiment=null is a ValueError traceback
            return f"~{key}"
        if key == "precision" and arg.startswith("precision="):
            return "precision=" + ",".join(quote(option) for option in arg.split("=", 1)[1].split(","))
        if is_path_key(key) and "=" in arg:
            name, value = arg.split("=", 1)
            return arg if value[:1] in ("'", '"') or value in ("", "null") else f"{name}='{value}'"
        return arg

    return [quoted(arg) for arg in argv]


def override_key(arg: str) -> str | None:
    """`trainer.max_epochs` for `trainer.max_epochs=10` (also `+key=`, `++key=`, `~key`); None for flags."""
    if arg.startswith("-"):
        return None
    key = arg.split("=", 1)[0]
    return key.lstrip("+~") or None


def override_value(argv: list[str], key: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in argv if "=" in arg and override_key(arg) == key]
    value = values[-1].strip("'\"") if values else None
    return None if value in (None, "", "null") else value


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """Saved overrides, with any key given again in `new` replaced by the new value (order kept)."""
    new_keys = {override_key(arg) for arg in new}
    kept = [arg for arg in saved if override_key(arg) not in new_keys and override_key(arg) not in REPLACED_ON_REPLAY]
    return kept + list(dict(((override_key(arg) or arg), arg) for arg in new).values())


def saved_overrides(run_dir: Path) -> list[str]:
    """The overrides that composed a run's config, with the config search path it was given (`hydra.searchpath`:
    where a task's configs outside conf/ were found)."""
    overrides = list(yaml.safe_load((run_dir / SAVED_OVERRIDES).read_text()) or [])
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        hydra_overrides = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("overrides", {}).get("hydra", [])
        overrides += [arg for arg in hydra_overrides if override_key(arg) == "hydra.searchpath"]
    return overrides


def check_checkpoint(path: Path, what: str, log_dir: Path | None = None) -> None:
    """A clear error unless `path` is a readable Lightning checkpoint (a missing one names the runs nearest to it)."""
    import torch  # here, not at the top: `mnist-train --help` must not wait for torch

    if not path.is_file():
        raise UserError(f"{what}: {path} does not exist.{nearest_runs(path, log_dir)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise UserError(f"{what}: {path} is not a readable checkpoint (truncated or corrupt?): {first_line(error)}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{what}: {path} is a torch file but not a Lightning checkpoint (no state_dict).")


def nearest_runs(path: Path, log_dir: Path | None) -> str:
    """` Runs with a close name: ...`, or ` The latest runs: ...`: the training runs under `log_dir` that have a last.ckpt,
    for a path that does not exist (a mistyped or cut run name)."""
    runs = runs_with_last_checkpoint(log_dir) if log_dir else []
    if not runs:
        return ""
    run_part = next((part for part in reversed(path.parts) if part not in ("checkpoints", LAST_CHECKPOINT.name) and not part.endswith(".ckpt")), "")
    close = difflib.get_close_matches(run_part, [run.name for run in runs], n=3, cutoff=0.6)
    if close:
        return " Runs with a close name: " + ", ".join(str(run) for name in close for run in runs if run.name == name)
    latest = sorted(runs, key=lambda run: (run / LAST_CHECKPOINT).stat().st_mtime, reverse=True)[:3]
    return " The latest runs: " + ", ".join(map(str, latest))


def is_run_dir(path: Path) -> bool:
    return (path / SAVED_OVERRIDES).is_file()


def runs_with_last_checkpoint(log_dir: Path) -> list[Path]:
    """The training runs under `log_dir` (single runs and sweep jobs) that have a last.ckpt."""
    return [ckpt.parent.parent for ckpt in (*log_dir.glob(f"train/*/{LAST_CHECKPOINT}"), *log_dir.glob(f"multirun/*/*/{LAST_CHECKPOINT}"))]


def find_latest_run(log_dir: Path) -> Path:
    """The training run (single or multirun job) whose last.ckpt was written most recently."""
    runs = runs_with_last_checkpoint(log_dir)
    if not runs:
        raise UserError(f"resume=latest: no run under {log_dir} has a {LAST_CHECKPOINT} to resume from.")
    return max(runs, key=lambda run: (run / LAST_CHECKPOINT).stat().st_mtime)


def log_dir_from(argv: list[str]) -> Path:
    value = override_value(argv, "paths.log_dir")
    return Path(value).expanduser().resolve() if value else DEFAULT_LOG_DIR


def check_writable(directory: Path, key: str) -> None:
    """Runs can be written under `directory` (it, or the nearest part of its path that exists, takes a file): else one
    message, before Hydra tries to make a run directory there (whose error is a chain of tracebacks)."""
    import tempfile

    existing = next(path for path in (directory, *directory.parents) if path.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{key}={directory}: runs cannot be written there ({error.strerror or error}).") from None


def group_options(group: str) -> list[str]:
    """The options of a config group of conf/: `precision` -> ["16-master", "16-mixed", ...]."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> None:
    """`callbacks=null` (or ~callbacks... as a group choice): Hydra's own error is a traceback; say what works."""
    for arg in argv:
        group, _, value = arg.partition("=")
        if value == "null" and (CONF_DIR / group).is_dir() and group not in OPTIONAL_GROUPS:
            none = (CONF_DIR / group / "none.yaml").is_file()
            fix = f"use {group}=none" if none else "choose one of: " + ", ".join(group_options(group))
            one = f" (or ~{group}.<name> to drop one)" if group in ("callbacks", "logger") else "."
            raise UserError(f"{arg}: a config group takes an option, not null; {fix}{one}")


# Lightning's spellings of a precision (Trainer(precision=...)) -> this template's option that means the same.
LIGHTNING_PRECISIONS = {"16": "16-mixed", "bf16": "bf16-mixed", "32-true": "32"}


def precision_option(value: str) -> str | None:
    """The `conf/precision/` option for a precision as Lightning spells it (`16` -> `16-mixed`), or None."""
    options = group_options("precision")
    option = value if value in options else LIGHTNING_PRECISIONS.get(value)
    return option if option in options else None


def use_precision(value: str) -> str:
    option = precision_option(value)
    if option is None:
        return f"precision={value} is not offered; choose one of: {', '.join(group_options('precision'))}"
    return f"use precision={option}" + (f" (Lightning's {value})" if option != value else "")


def check_lightning_spellings(argv: list[str]) -> None:
    """What a Lightning or lightning-hydra-template user types, answered with the key to use in one step:
    `trainer.precision=16` and `precision=16`/`bf16` (precision is a config group of its own here, named as Lightning
    names the recipe: `16-mixed`), and `model.compile=true` (compiling is the machinery's, for any module: `compile=true`)."""
    for arg in argv:
        key, value = override_key(arg), arg.partition("=")[2].strip("'\"")
        if key == "trainer.precision" and value:
            raise UserError(f"{arg}: trainer.precision is not read here: precision is its own config group; {use_precision(value)}.")
        for option in value.split(",") if key == "precision" else ():  # (a sweep's values too)
            if option in LIGHTNING_PRECISIONS and precision_option(option) != option:
                raise UserError(f"{arg}: {use_precision(option)}.")
        if key == "model.compile":
            raise UserError(f"{arg}: the machinery compiles any module; use compile={value or 'true'} (a top-level key).")


INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info")


def asks_hydra_only(argv: list[str]) -> bool:
    """`--help`, `--cfg job` and the like: Hydra prints and exits, nothing runs (so nothing is checked or replayed)."""
    return any(arg.split("=")[0] in INFO_FLAGS for arg in argv)


SUBMITIT_LAUNCHERS = ("slurm", "submitit_slurm", "submitit_local")  # conf/hydra/launcher/slurm.yaml and the plugin's own


def check_launcher(argv: list[str]) -> None:
    """`hydra/launcher=slurm`: Hydra uses a launcher only for a sweep, and the submitit one needs its plugin and sbatch."""
    launcher = override_value(argv, "hydra/launcher")
    if launcher is None or launcher == "basic" or asks_hydra_only(argv):
        return
    if not any(arg in ("-m", "--multirun") for arg in argv):
        raise UserError(f"hydra/launcher={launcher} launches the jobs of a sweep, and this is a single run: add -m (a sweep of one job).")
    if launcher not in SUBMITIT_LAUNCHERS:
        return
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        raise UserError(f"hydra/launcher={launcher} needs Hydra's submitit launcher: pip install '{PACKAGE.replace('_', '-')}[slurm]'") from None
    if launcher != "submitit_local" and shutil.which("sbatch") is None:
        raise UserError(f"hydra/launcher={launcher} submits SLURM jobs with sbatch, which is not on this machine's PATH. Run it where "
                        "sbatch works (the cluster's login node), or try the same sweep here with hydra/launcher=submitit_local.")


def checkpoint_file(value: str) -> Path:
    """The checkpoint `ckpt_path=<value>` names: a file; a run directory or its checkpoints/, for its last.ckpt (said on
    the console); a directory without one is refused with what it holds."""
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        return path
    for candidate in (path / LAST_CHECKPOINT, path / LAST_CHECKPOINT.name):
        if candidate.is_file():
            print(f"ckpt_path={value}: taking {candidate}", flush=True)
            return candidate
    held = ", ".join(sorted(entry.name for entry in path.iterdir())[:12]) or "nothing"
    raise UserError(f"ckpt_path={value}: {path} is a directory without a {LAST_CHECKPOINT} (it holds: {held}). "
                    "Name a checkpoint file, or a run directory.")


def train_argv(argv: list[str]) -> list[str]:
    """Checks `ckpt_path=` (a file, or a run directory for its last.ckpt); turns `resume=<run_dir>|latest` into the run's
    saved overrides + the new ones, run dir pinned."""
    check_group_overrides(argv)
    check_lightning_spellings(argv)
    check_launcher(argv)
    if not asks_hydra_only(argv):
        check_writable(log_dir_from(argv), "paths.log_dir")
    argv = quote_values(argv)
    resume, ckpt = override_value(argv, "resume"), override_value(argv, "ckpt_path")
    if resume and ckpt:
        raise UserError("give either resume=<run_dir> (continue a run) or ckpt_path=<file> (new run from a checkpoint), not both.")
    if ckpt:
        path = checkpoint_file(ckpt)
        check_checkpoint(path, f"ckpt_path={ckpt}", log_dir_from(argv))
        argv = [arg for arg in argv if override_key(arg) != "ckpt_path"] + [f"ckpt_path='{path}'"]
    if resume is None:
        return argv
    if any(arg in ("-m", "--multirun") for arg in argv):
        raise UserError("resume= continues one run; it cannot be combined with -m/--multirun.")
    run_dir = find_latest_run(log_dir_from(argv)) if resume == "latest" else Path(resume).expanduser().resolve()
    if not run_dir.is_dir():
        raise UserError(f"resume={resume}: {run_dir} is not a directory.{nearest_runs(run_dir, log_dir_from(argv))}")
    if not is_run_dir(run_dir):
        raise UserError(f"resume={resume}: {run_dir} is not a training run directory (it has no {SAVED_OVERRIDES}).")
    check_checkpoint(run_dir / LAST_CHECKPOINT, f"resume={resume}")
    pinned = [f"resume='{run_dir}'", f"hydra.run.dir='{run_dir}'"]
    return merge_overrides(saved_overrides(run_dir), [arg for arg in argv if override_key(arg) != "resume"] + pinned)


def eval_argv(argv: list[str]) -> list[str]:
    """`ckpt_path=<file|run dir> ...` -> the overrides of the run that wrote the checkpoint + the new ones."""
    argv = quote_values(argv)
    if asks_hydra_only(argv):
        return argv
    ckpt = override_value(argv, "ckpt_path")
    if ckpt is None:
        raise UserError(f"{command_name('eval')} needs a checkpoint: {command_name('eval')} ckpt_path=logs/train/<run>/checkpoints/last.ckpt")
    path = checkpoint_file(ckpt)
    check_checkpoint(path, f"ckpt_path={ckpt}", log_dir_from(argv))
    run_dir = path.parent.parent
    saved = saved_overrides(run_dir) if is_run_dir(run_dir) else []
    return merge_overrides(saved, [arg for arg in argv if override_key(arg) != "ckpt_path"] + [f"ckpt_path='{path}'"])


TRAINING_STATE = ("state_dict", "optimizer_states", "loops", "global_step", "epoch", "callbacks")  # what Lightning resumes from


def check_layout(checkpoint: dict, trainer: Any, how: str) -> None:
    """A checkpoint from an older layout of the module or the precision plugin: say what is missing, instead of a
    KeyError from deep inside Lightning's restore. (A model whose weights differ: errors.explain_checkpoint_mismatch.)"""
    missing = [key for key in TRAINING_STATE if key not in checkpoint]
    plugin = trainer.precision_plugin
    expected = getattr(plugin, "STATE_KEYS", ())  # MasterCopyPrecision's: masters, loss scaler, skipped steps
    name = type(plugin).__qualname__
    if expected and name not in checkpoint:
        missing.append(f"the {name} state ({', '.join(expected)})")
    elif expected:
        missing += [f"{name}.{key}" for key in expected if key not in checkpoint[name]]
    if missing:
        raise UserError(f"{how}: the checkpoint has no {'; no '.join(missing)}. It was written by another layout of this "
                        "project's module or precision plugin (an older version?), so its training state cannot be resumed "
                        "exactly: continue it with the version that wrote it.")


def check_training_left(trainer: Any, ckpt_path: str, how: str) -> None:
    """A clear error when the checkpoint has already reached the run's limits, instead of Lightning's
    MisconfigurationException (checkpoint past max_epochs) or a run that silently trains nothing and re-tests.

    `how` is the option that gave the checkpoint (`resume=<run>` or `ckpt_path=<file>`), for the message.
    """
    import torch
    from lightning.pytorch.callbacks import Timer

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    check_layout(checkpoint, trainer, how)
    from mnist_precision.kit.private_api import epochs_trained

    epochs = epochs_trained(checkpoint)
    steps = checkpoint["global_step"]
    done = f"{how}: the checkpoint has trained {epochs} epoch(s), {steps} step(s)"
    train = command_name("train")
    if trainer.max_steps != -1 and steps >= trainer.max_steps:
        raise UserError(f"{done}, and trainer.max_steps={trainer.max_steps}: nothing is left to train. "
                        f"Train on with a larger limit: {train} {how} trainer.max_steps={steps + trainer.max_steps}")
    if trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
        raise UserError(f"{done}, and trainer.max_epochs={trainer.max_epochs}: nothing is left to train. "
                        f"Train on with a larger limit: {train} {how} trainer.max_epochs={epochs + trainer.max_epochs}")
    timer = next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)
    if timer is not None and "Timer" in checkpoint.get("callbacks", {}):
        timer.load_state_dict(checkpoint["callbacks"]["Timer"])
        if timer.time_remaining() <= 0:
            raise UserError(f"{done}, in {timer.time_elapsed():.0f} s of training: trainer.max_time is used up "
                            f"(it counts every session of a run). Give a larger trainer.max_time to train on.")


RUN_LOCK = ".lock"


def job_entries(run_dir: Path) -> set[str]:
    """What a job's directory holds when the job starts: Hydra's `.hydra/` and the job's log, and anything that was
    there before (`hydra.run.dir` may name an existing directory)."""
    return {entry.name for entry in run_dir.iterdir()} if run_dir.is_dir() else set()


def remove_refused_run(run_dir: Path, at_start: set[str], job_log: str) -> None:
    """Undo what a refused command wrote in its run dir, and nothing else. If the directory held only Hydra's files for
    this job when it started, it was made for it: all of it goes. Otherwise (a directory of the user's) only what the
    job added since its start goes; the rest, and Hydra's files written over it, stay."""
    if at_start <= {".hydra", job_log}:  # made for this job
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in run_dir.iterdir():
        if entry.name not in at_start:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One process at a time writes a run directory (two `resume=` of one run, or a resume of a run still training).

    An exclusive `flock` on `<run>/.lock`, which the kernel releases when the holder ends, however it ends (SIGKILL
    included): a crashed run never leaves its directory locked.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{run_dir} is in use by another process (pid {holder}): two processes must not write one run. "
                            "Wait for it to finish, or stop it (its state is saved on SIGTERM).") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def resume_guard(argv: list[str]) -> Iterator[None]:
    """For a `resume=` command line: the run's lock, taken before Hydra rewrites the run's .hydra/ files, and those
    files put back as they were if the resume is refused (RunRefused). Without resume=: nothing."""
    resume = override_value(argv, "resume")
    if not resume:
        yield
        return
    run_dir = Path(resume)
    saved = {path: path.read_bytes() for path in (run_dir / ".hydra").glob("*.yaml")}
    with run_lock(run_dir):
        try:
            yield
        except RunRefused:
            for path, content in saved.items():
                path.write_bytes(content)
            raise


@contextmanager
def suggest_close_matches(argv: list[str], config_name: str) -> Iterator[None]:
    """Beside Hydra's message for an unknown key or option, the close match a typo missed:
    `trainer.max_epoch: did you mean trainer.max_epochs?`, `model=mpl: did you mean net=mlp?`.

    Hydra prints its message and exits 1 before any job starts; the config is composed again, only after a failure,
    to find which override it was (a job that failed composes fine, and gets no hint)."""
    try:
        yield
    except RunRefused:
        raise
    except SystemExit as stop:
        if stop.code == 1 and (hint := close_match_hint(argv, config_name)):
            print(hint, file=sys.stderr, flush=True)
        raise


def close_match_hint(argv: list[str], config_name: str) -> str | None:
    """`<override>: did you mean <close match>?` for the override Hydra could not apply, or None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    try:  # a sweep's values are not composed: its other overrides are
        parsed = OverridesParser.create().parse_overrides([arg for arg in argv if not arg.startswith("-")])
    except HydraException:
        return None
    overrides = [o for o in parsed if not o.is_sweep_override()
                 and (o.key_or_group == "hydra.searchpath" or not o.key_or_group.startswith(("hydra.", "hydra/")))]
    GlobalHydra.instance().clear()  # (hydra.main leaves its own instance behind)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            try:
                compose(config_name, overrides=[o.input_line for o in overrides])
                return None
            except MissingConfigException as error:  # model=mpl: an option the group does not have
                group, _, option = str(error.missing_cfg_file).rpartition("/")
                searched = [CONF_DIR, *(Path(str(entry).removeprefix("file://")) for o in overrides if o.key_or_group == "hydra.searchpath"
                                        for entry in o.value() if str(entry).startswith("file://"))]
                groups: dict[str, list[str]] = {group: list(error.options or [])}
                for path in sorted(path for root in searched if root.is_dir() for path in root.iterdir() if path.is_dir()):
                    groups.setdefault(path.name, []).extend(p.stem for p in path.glob("*.yaml"))
                own = difflib.get_close_matches(option, groups.pop(group), n=1)  # the group's own options first
                others = {choice: name for name, options in groups.items() for choice in options}
                match = (group, own[0]) if own else next(((others[c], c) for c in difflib.get_close_matches(option, others, n=1)), None)
                return f"{group}={option}: did you mean {match[0]}={match[1]}?" if match else None
            except ConfigCompositionException as error:  # trainer.max_epoch=3: a key the config does not have
                key = re.search(r"Could not override '([^']+)'", str(error))
                if key is None:
                    return None
                key = key.group(1)
                parent, _, leaf = key.rpartition(".")
                try:
                    cfg = compose(config_name, overrides=[o.input_line for o in overrides if o.key_or_group != key])
                except HydraException:
                    return None
                node = OmegaConf.select(cfg, parent) if parent else cfg
                keys = [str(name) for name in node] if OmegaConf.is_dict(node) else []
                if not parent:
                    keys += [path.name for path in CONF_DIR.iterdir() if path.is_dir()]
                match = difflib.get_close_matches(leaf, keys, n=1)
                return f"{key}: did you mean {parent + '.' if parent else ''}{match[0]}?" if match else None
    except HydraException:
        return None
    finally:
        GlobalHydra.instance().clear()
