"""`gcupipe show`: the composed recipe, interpolated as far as it can be before a run, with the
file:line each value was written at (extends < include < recipe < environment < --set)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from gcupipe.errors import RecipeError
from gcupipe.recipe.interpolate import Deferred, environment_lookup, interpolate, lookup_in
from gcupipe.recipe.planned import Recipe
from gcupipe.recipe.source import KeyPath, format_path
from gcupipe.secrets import is_secret_name


def shown_document(recipe: Recipe, environ: Mapping[str, str]) -> dict[str, Any]:
    """The recipe after composition and overrides, `${vars.*}` and `${env:*}` filled in; what
    only a run knows (`${stages.*}`, `${matrix.*}`), unset variables and secrets stay as
    written."""
    from_environment = environment_lookup(environ)

    def lookup(expression: str) -> Any:
        expression = expression.strip()
        if expression.startswith("vars."):
            return lookup_in(recipe.vars, expression[len("vars.") :], "vars")
        if expression.startswith("env:"):
            name = expression[len("env:") :].partition(",")[0].strip()
            if not is_secret_name(name):
                try:
                    return from_environment(expression)
                except RecipeError:
                    pass
        raise Deferred

    shown: dict[str, Any] = interpolate(
        recipe.document, lookup, recipe.positions, (), unescape=False
    )
    return shown


def origins(recipe: Recipe, document: dict[str, Any]) -> dict[str, str]:
    """Key path -> where its value was written, for every value shown on one line."""
    found: dict[str, str] = {}

    def walk(value: Any, path: KeyPath) -> None:
        entries = _entries(value)
        if entries is None:
            mark = recipe.positions.value_mark(path)
            found[format_path(path)] = str(mark) if mark else "?"
        for key, item in entries or []:
            walk(item, path + (key,))

    walk(document, ())
    return found


def annotated_yaml(recipe: Recipe, environ: Mapping[str, str]) -> str:
    """The shown document as YAML, every value followed by `# file:line:col`."""
    document = shown_document(recipe, environ)
    where = origins(recipe, document)
    lines: list[str] = []

    def emit(value: Any, path: KeyPath, indent: str) -> None:
        for key, item in _entries(value) or []:
            if isinstance(key, int):  # a list item: a mapping starts on the dash's line
                lead, deeper = f"{indent}- ", indent + "  "
            else:
                lead, deeper = f"{indent}{_scalar(key)}:", indent + "  "
            dotted = format_path(path + (key,))
            if dotted in where:
                lines.append(f"{lead.rstrip()} {_scalar(item)}  # {where[dotted]}")
            elif isinstance(key, int):
                start = len(lines)
                emit(item, path + (key,), deeper)
                lines[start] = lead + lines[start].lstrip()
            else:
                lines.append(lead)
                emit(item, path + (key,), deeper)

    emit(document, (), "")
    return "\n".join(lines) + "\n"


def _entries(value: Any) -> list[tuple[str | int, Any]] | None:
    """What `show` writes one per line (a mapping's keys, a list holding mappings or lists),
    or None for a value written on one line (a scalar, a list of scalars, `{}`, `[]`)."""
    if isinstance(value, dict) and value:
        return list(value.items())
    if isinstance(value, list) and any(isinstance(v, dict | list) and v for v in value):
        return list(enumerate(value))
    return None


def _scalar(value: Any) -> str:
    """One value in YAML flow style (a list of plain values on one line)."""
    text: str = yaml.safe_dump([value], default_flow_style=True, width=2**31, sort_keys=False)
    return text.strip()[1:-1]
