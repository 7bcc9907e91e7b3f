"""Loading and saving configs: a file and overrides read, built, checked and resolved; a run's saved config.

`load_config` and `load_pretrain_config` read a YAML file (or none) with `key=value` overrides;
`load_run_config` reads a run folder's config as that run ran; `save_config` writes one back.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from clue_mtl.config.building import build
from clue_mtl.config.checks import validate, validate_pretrain
from clue_mtl.config.compat import ADDED_KEYS
from clue_mtl.config.policy import resolved_encoder_pass
from clue_mtl.config.reading import naming_the_file, read_values
from clue_mtl.config.schema import PretrainConfig, RunConfig


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    values = read_values(path, list(overrides))
    with naming_the_file(path):
        return config_from_dict(values)


def load_run_config(path: str | Path) -> RunConfig:
    """A run folder's saved config as that run ran: a key added since it was saved (`ADDED_KEYS`)
    takes the value that does what runs did before it, not today's default."""
    values = read_values(path, [])
    for dotted, value in ADDED_KEYS.items():
        *sections, key = dotted.split(".")
        node = values
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):  # anything else is left for validation to name
            node.setdefault(key, copy.deepcopy(value))
    with naming_the_file(path):
        return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    config = build(RunConfig, values, "")
    validate(config)
    # `auto` is resolved as the config is read, so the saved config, the checkpoint's fingerprint
    # and the resume check hold the pass that runs: a run saved before the key existed (one pass
    # per task) resumes wherever auto still gives that, and is refused where it now gives joint.
    config.train.encoder_pass = resolved_encoder_pass(config)
    return config


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] = ()) -> PretrainConfig:
    values = read_values(path, list(overrides))
    with naming_the_file(path):
        config = build(PretrainConfig, values, "")
        validate_pretrain(config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True),
                          encoding="utf-8")
