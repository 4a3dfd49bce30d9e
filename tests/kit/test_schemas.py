"""Every config option that names a typed schema (conf/*/*.yaml, the task's and the machinery's) names a registered one,
sets only its fields, and a schema with a `_target_` has exactly the target's arguments."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from hydra.utils import get_object

from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.schema import load_schemas

OPTIONS = sorted(str(path.relative_to(CONF_DIR)) for path in CONF_DIR.glob("*/*.yaml"))
NAMES_A_SCHEMA = [option for option in OPTIONS
                  if str((yaml.safe_load((CONF_DIR / option).read_text()) or {}).get("defaults", [""])[0]).endswith("_schema@_here_")]


def test_the_groups_with_schemas_are_found():
    assert {Path(option).parent.name for option in NAMES_A_SCHEMA} >= {"precision", "scheduler"}


@pytest.mark.parametrize("option", NAMES_A_SCHEMA)
def test_an_option_names_a_registered_schema_that_matches_its_target(option):
    load_schemas()
    config = yaml.safe_load((CONF_DIR / option).read_text())
    name = config["defaults"][0].removeprefix("/").removesuffix("@_here_")
    stored = ConfigStore.instance().repo.get(f"{name}.yaml")
    assert stored is not None, f"{option} names {name}, which no schema module registers"
    schema = stored.node._metadata.object_type
    fields = {field.name for field in dataclasses.fields(schema)}
    assert set(config) - {"defaults"} <= fields  # (Hydra refuses the rest too)
    if "_target_" in config:
        target = get_object(config["_target_"])
        parameters = set(inspect.signature(target).parameters)
        assert {name for name in fields if not name.startswith("_")} == parameters, option
