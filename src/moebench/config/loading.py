"""Reading configs: strict YAML (no repeated keys, YAML 1.2 floats, no empty file),
`--set a.b=v` overrides and the run config a command reads (`load_run_config`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moebench.config.errors import format_validation_error, shown
from moebench.config.run import RunConfig


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `over` into a copy of `base` (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        merge = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if merge else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `a.b=1` strings into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = read_yaml(raw, f"--set {item!r}")
    return out


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently) and reads `1e-3` as a number, as YAML 1.2 does (PyYAML reads it as a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} is given twice (lines {seen[key]} and {line}); "
                    "allowed: each key once per mapping", key_node.start_mark,
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str, where: str) -> Any:
    """Parse YAML strictly (`_StrictLoader`); a syntax error or a repeated key becomes a
    ValueError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{where} is not valid YAML{at}: {reason}") from None


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a config or study file holds; ValueError if it is missing, not YAML, empty
    or not a mapping (an empty file would otherwise run every default)."""
    where = f"{what} {path}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist")
    raw = read_yaml(path.read_text(), where)
    if raw is None:
        raise ValueError(f"{where} is empty; allowed: a YAML mapping of settings")
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must hold a mapping, got {type(raw).__name__}")
    return raw



def load_run_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML (or defaults) and apply `--set` overrides; ValueError if bad."""
    raw = read_yaml_mapping(Path(path), "config file") if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        where = f"run config {path or '(defaults)'}"
        raise ValueError(format_validation_error(err, RunConfig, where)) from None
