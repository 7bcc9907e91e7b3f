"""Dataclasses built from read values, strictly: unknown keys and values of the wrong type raise
`ConfigError` naming the key, so a typo fails loudly; every number must be finite.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from clue_mtl.errors import ConfigError


def build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """A `cls` (a config dataclass) from `values`, each checked against its field's type; `prefix`
    is the section's dotted name in messages (`train.`; empty at the top)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r:.60}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: key {bad_keys[0]!r} is not a name; quote it")
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''}{where}: "
                          f"{', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if annotation is Any:
        return _checked_any(value, key)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_type(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(annotation)
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{key}: key {bad_keys[0]!r} is not a name; quote it")
        return {k: _check_type(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value, key)
    if annotation is str and isinstance(value, bool):
        # YAML 1.1 reads an unquoted `no` as False; for a text setting, the word was meant.
        return "yes" if value else "no"
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _finite(value: int | float, key: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r:.40}")
    return number


def _checked_any(value: Any, key: str) -> Any:
    """A free-form value (method parameters, config overrides): finite numbers, names as keys."""
    if isinstance(value, float):
        _finite(value, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: key {k!r} is not a name; quote it")
            _checked_any(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _checked_any(v, f"{key}[{i}]")
    return value


def check_finite(config: Any, prefix: str = "") -> None:
    """Every number of a config finite, also where the config was built in code rather than read."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{prefix}{item.name}.")
        elif isinstance(value, dict) and all(dataclasses.is_dataclass(v) for v in value.values()):
            for key, entry in value.items():  # model.heads, model.private
                check_finite(entry, f"{prefix}{item.name}.{key}.")
        elif isinstance(value, (float, dict, list)):
            _checked_any(value, prefix + item.name)
