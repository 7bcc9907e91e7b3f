"""Config files read boundedly, with strict `key=value` overrides; errors name FILE:LINE.

YAML is read by `read_yaml`, bounded before anything expands: at most `MAX_YAML_BYTES`, no aliases
(a few hundred bytes of nested aliases expand to gigabytes), nesting at most `MAX_YAML_DEPTH` deep,
keys that are plain strings and given once.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import yaml

from clue_mtl.errors import ConfigError

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases, deep nesting, non-string and repeated keys."""

    where = "config"
    depth = 0

    def _fail(self, mark, message: str):
        raise ConfigError(f"{self.where}:{mark.line + 1}: {message}")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self._fail(event.start_mark, f"YAML aliases (*{event.anchor}) are not allowed in a config; "
                                         "write the value out")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                self._fail(self.peek_event().start_mark, f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag != "tag:yaml.org,2002:str":
                self._fail(key_node.start_mark, f"key {key_node.value!r} is not a name (YAML reads it as "
                                                f"{key_node.tag.rsplit(':', 1)[-1]}); quote it")
            if key_node.value in seen:
                self._fail(key_node.start_mark, f"key {key_node.value!r} is given twice")
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document read safely and boundedly; errors are `ConfigError`s naming `where` and the line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_YAML_BYTES:,} bytes; not a config")
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses unprintable characters here already
        loader.where = where
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({error.problem or error.context})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """A YAML file read as `parse_yaml` does, after checking it is a readable UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_YAML_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES:,} bytes; not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[error.start]:02x})") from None
    return parse_yaml(text, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-5` -> (["train", "lr"], 3e-05). Values are read as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    value = parse_yaml(raw, f"override {text!r:.80}") if raw.strip() else ""
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 3e-5 as a string
    return key.split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    values = copy.deepcopy(values) if values else {}
    for override in overrides:
        path, value = parse_override(override)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[path[-1]] = value
    return values


def read_values(path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """The values of a YAML config file (or none) with `key=value` overrides applied."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(path)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train: ...) at the top, "
                              f"got a {type(values).__name__}")
        values = _float_strings(values)
    return apply_overrides(values, list(overrides))


@contextlib.contextmanager
def naming_the_file(path: str | Path | None):
    """Errors in a config read from a file start with the file's name."""
    try:
        yield
    except ConfigError as error:
        if path is None or str(error).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {error}") from None


def _float_strings(values: Any) -> Any:
    """YAML 1.1 reads `3e-5` (no dot) as a string; read such strings as floats."""
    if isinstance(values, dict):
        return {k: _float_strings(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_float_strings(v) for v in values]
    if isinstance(values, str) and _looks_like_float(values) and "e" in values.lower():
        return float(values)
    return values
