"""Overrides of a composed recipe: `GCUPIPE__a__b=c` variables, then `--set a.b=c`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from gcupipe.errors import Mark, RecipeError, did_you_mean
from gcupipe.recipe.source import KeyPath, Positions, format_path

ENV_PREFIX = "GCUPIPE__"


def environment_overrides(environ: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(dotted path, value, source label) for each `GCUPIPE__stages__x__with__y=v` variable."""
    found = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            path = ".".join(name[len(ENV_PREFIX) :].split("__"))
            found.append((path, environ[name], f"environment {name}"))
    return found


def parse_assignment(text: str) -> tuple[str, str]:
    """`a.b.c=value` -> ("a.b.c", "value")."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        raise RecipeError(
            "an override is KEY.PATH=VALUE, e.g. stages.quantize.with.method=gptq",
            Mark("--set"),
        )
    return path.strip(), value


def apply_override(
    data: dict[str, Any], positions: Positions, dotted: str, raw_value: str, source: str
) -> None:
    """Set one value (parsed as YAML, so `64` is a number and `[a, b]` a list) at `dotted`."""
    mark = Mark(source)
    parts = dotted.split(".")
    if any(not part for part in parts):
        raise RecipeError(f"bad key path '{dotted}': empty segment", mark)
    value = _yaml_value(raw_value)
    node: Any = data
    path: KeyPath = ()
    for index, part in enumerate(parts[:-1]):
        path = path + (part,)
        if isinstance(node, list):
            raise RecipeError(
                f"'{format_path(path[:-1])}' is a list; overrides set keys of mappings only",
                mark,
                dotted,
            )
        if index == 1 and parts[0] == "stages" and part not in node:
            raise RecipeError(
                f"no stage '{part}' in the recipe{did_you_mean(part, sorted(node))}",
                mark,
                dotted,
            )
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            kind = "list" if isinstance(child, list) else "single value"
            raise RecipeError(
                f"'{format_path(path)}' is a {kind}, not a mapping",
                mark,
                dotted,
            )
        node = child
    if not isinstance(node, dict):
        raise RecipeError(f"cannot set '{dotted}': its parent is not a mapping", mark, dotted)
    full: KeyPath = tuple(parts)
    node[parts[-1]] = value
    positions.drop(full)
    positions.keys[full] = mark
    positions.values[full] = mark


_NULLS = {"null", "Null", "NULL", "~"}


def _yaml_value(text: str) -> Any:
    """YAML-typed (`64` a number, `[a, b]` a list, `null` None); anything YAML would not read
    as a plain value (`?`, `...`, `a: b: c`) stays the string that was typed."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip() not in _NULLS:
        return text
    if isinstance(value, dict) and not all(isinstance(key, str) for key in value):
        return text  # `?` parses as {None: None}
    return value
